"""The multi-scale gate (``msvit.models.tree_gate``): decisions in the ScaleTree order, learned
sampling with gradient to every level, APT's entropy thresholds per level on real photos (Triton ==
reference, and APT's own selection rule), the exact-k budget (ancestor-closed, top-k semantics),
mask checks, the loss input, and agreement with the two-scale gates at S = 2."""

from types import SimpleNamespace

import pytest
import torch

from msvit.data import IMAGENET_MEAN, IMAGENET_STD, normalize, sample_photos
from msvit.host_reads import count_host_reads
from msvit.models.entropy_gate import EntropyGate
from msvit.models.gate import MixedScaleGate, gumbel_sigmoid
from msvit.models.tree_gate import (
    TreeGate,
    budget_splits,
    effective_scores,
    finest_share,
    tree_budget_mask,
)
from msvit.train.gate_training import gate_loss_input
from msvit_kernels.reference import entropy_reference
from msvit_kernels.scale_tree import ScaleTree

from helpers import needs_triton

TOL = 1e-5


@pytest.fixture(scope="module")
def photos():
    """The bundled photos at 128 px, ImageNet-normalised: [8, 3, 128, 128] (p=16, r=2, S=3: 8x8 /
    4x4 / 2x2 nodes, D = 20)."""
    return normalize(sample_photos(128)[1])


def learned_gate(scales=3, fine_patch=8, fine_grid=(8, 8), seed=0, **options):
    torch.manual_seed(seed)
    gate = TreeGate.learned(fine_patch, 2, scales, fine_grid, hidden=8, **options)
    for level in gate.levels:  # spread the logits around 0 so both decisions occur
        torch.nn.init.normal_(level.fc4.weight, std=0.5)
        torch.nn.init.zeros_(level.fc4.bias)
    return gate.eval()


def chosen_is_ancestor_closed(mask, tree):
    """Every chosen node's parent is chosen, or the node is a root."""
    levels = tree.per_scale(mask)
    for s in range(1, tree.scales - 1):
        parent = tree.parents(s)
        has = parent >= 0
        up = levels[s + 1][:, parent.clamp_min(0)]
        if not bool((levels[s] & has & ~up).logical_not().all()):
            return False
    return True


def token_count(mask, tree):
    return sum(w.sum(1) for w in tree.token_weights(mask))


# ---- shapes and order ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (80, 112)])  # 80x112: border nodes at every scale
def test_decisions_are_levels_in_the_tree_order(size):
    gate = learned_gate()
    images = torch.randn(2, 3, *size)
    tree = gate.tree_of(images)
    assert tree.grids == ScaleTree.of((size[0] // 8, size[1] // 8), 2, 3).grids
    with torch.no_grad():
        decision = gate.decide(images, sample=False)
        for name in ("logits", "soft", "hard", "st"):
            assert getattr(decision, name).shape == (2, tree.decisions)
        per_scale = tree.per_scale(decision.logits)
        for level, s in zip(gate.levels, (2, 1)):
            p = 8 * 2**s
            crop = images[..., : size[0] // p * p, : size[1] // p * p]
            assert level.region_size == p and torch.equal(per_scale[s], level(crop))
    assert torch.equal(decision.hard, decision.logits > 0) and 0 < decision.hard.sum() < decision.hard.numel()
    assert torch.allclose(decision.soft, torch.sigmoid(decision.logits), rtol=0, atol=1e-6)
    assert torch.equal(decision.st, decision.hard.float())
    assert gate.grid == (2, 2) and gate.region_size == 32 and gate.level_scales == (2, 1)


def test_four_scales():
    gate = learned_gate(scales=4, fine_patch=4, fine_grid=(16, 16))
    images = torch.randn(2, 3, 64, 64)
    tree = gate.tree_of(images)
    assert tree.decisions == 4 + 16 + 64 and gate.region_size == 32 and gate.grid == (2, 2)
    with torch.no_grad():
        logits = gate(images)
    assert logits.shape == (2, 84)
    for level, s, part in zip(gate.levels, (3, 2, 1), (logits[:, :4], logits[:, 4:20], logits[:, 20:])):
        assert level.region_size == 4 * 2**s and torch.equal(part, level(images))


# ---- learned: sampling, gradient, noise ------------------------------------------------------


def test_learned_sampling_reaches_every_level_with_gradient():
    gate = learned_gate().train()
    images = torch.randn(3, 3, 64, 64)
    decision = gate.decide(images, sample=True)
    assert torch.equal(decision.st.detach(), decision.hard.float())  # exactly hard in the forward
    decision.st.sum().backward()
    for level in gate.levels:
        assert level.fc1.weight.grad is not None and level.fc1.weight.grad.abs().sum() > 0
    # through the token weights too: every level of the path carries the gradient
    gate.zero_grad()
    decision = gate.decide(images, sample=True)
    tree = gate.tree_of(images)
    weights = tree.token_weights(decision.st)
    sum((w * torch.arange(w.shape[1]).float()).sum() for w in weights).backward()
    assert all(level.fc1.weight.grad.abs().sum() > 0 for level in gate.levels)


def test_learned_sample_uses_the_given_noise_per_level():
    gate = learned_gate()
    images = torch.randn(2, 3, 64, 64)
    tree = gate.tree_of(images)
    noise = torch.randn(2, tree.decisions)
    with torch.no_grad():
        decision = gate.decide(images, sample=True, noise=noise)
        soft, hard, _ = gumbel_sigmoid(gate(images), gate.levels[0].temperature, noise)
    assert torch.allclose(decision.soft, soft, atol=1e-6) and torch.equal(decision.hard, hard)
    with pytest.raises(ValueError, match=r"noise must have shape \[B, D\] = \[2, 20\]"):
        gate.decide(images, sample=True, noise=noise[:, :4])


def test_budget_wins_over_sampling_and_eval_is_deterministic():
    gate = learned_gate().train()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = gate.decide(images, sample=False), gate.decide(images, sample=False)
        budgeted = gate.decide(images, sample=True, budget=7)
    assert torch.equal(a.hard, b.hard)
    assert budgeted.hard.sum(1).tolist() == [7, 7] and torch.equal(budgeted.st, budgeted.hard.float())


# ---- entropy: per-level thresholds on real photos -------------------------------------------


def reference_logits(images, thresholds, p=16, r=2):
    """[B, D] entropy - threshold, coarsest scale first, thresholds[s - 1] at scale s."""
    parts = []
    for s in range(len(thresholds), 0, -1):
        size = p * r**s
        crop = images[..., : images.shape[-2] // size * size, : images.shape[-1] // size * size]
        parts.append(entropy_reference(crop, size, IMAGENET_MEAN, IMAGENET_STD, 512) - thresholds[s - 1])
    return torch.cat(parts, 1)


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("thresholds", [(6.0, 4.0), (7.0, 7.6)])
def test_entropy_decisions_are_per_level_thresholds(photos, kernels, thresholds):
    gate = TreeGate.entropy(16, 2, 3, (8, 8), thresholds)
    gate.kernels = kernels
    assert all(level.kernels == kernels for level in gate.levels)
    assert [level.thresholds for level in gate.levels] == [(thresholds[1],), (thresholds[0],)]  # 64 px, 32 px
    decision = gate.decide(photos, sample=True)  # nothing is random
    ref = reference_logits(photos, thresholds)
    assert (decision.logits - ref).abs().max() <= TOL
    clear = ref.abs() > TOL
    assert torch.equal(decision.hard[clear], (ref > 0)[clear])
    assert decision.hard[:, 4:].any() and not decision.hard[:, 4:].all()  # 32 px: both outcomes
    assert decision.soft is None and not decision.st.requires_grad
    assert torch.equal(decision.st, decision.hard.float())


@needs_triton
def test_entropy_triton_equals_reference_with_borders():
    images = normalize(sample_photos((144, 112))[1][[0, 2, 5]])  # 9x7 / 4x3 / 2x1 nodes
    gate = TreeGate.entropy(16, 2, 3, (9, 7), (7.0, 7.6))
    decisions = {}
    for kernels in ("reference", "triton"):
        gate.kernels = kernels
        decisions[kernels] = gate.decide(images)
        assert decisions[kernels].hard.shape == (3, 12 + 2)
    ref, tri = decisions["reference"], decisions["triton"]
    assert (ref.logits - tri.logits).abs().max() <= TOL
    clear = ref.logits.abs() > TOL
    assert torch.equal(ref.hard[clear], tri.hard[clear])


def apt_select(entropy_maps, thresholds):
    """APT's selection rule as its code states it (``select_patches_by_threshold``, written afresh):
    patch sizes ascending; size ``sizes[i]`` (i >= 1) is kept whole where ``entropy <
    thresholds[i - 1]``; the smallest size is kept everywhere; a kept patch removes every smaller
    patch under it. Returns {size: bool [B, h, w]}: the patches that are tokens."""
    sizes = sorted(entropy_maps)
    keep = {sizes[0]: torch.ones_like(entropy_maps[sizes[0]], dtype=torch.bool)}
    for i in range(1, len(sizes)):
        keep[sizes[i]] = entropy_maps[sizes[i]] < thresholds[i - 1]
    for i in range(len(sizes) - 1, 0, -1):
        for j in range(i):
            k = sizes[i] // sizes[j]
            up = keep[sizes[i]].repeat_interleave(k, 1).repeat_interleave(k, 2)
            keep[sizes[j]] = keep[sizes[j]] & ~up
    return keep


@pytest.mark.parametrize("thresholds", [(6.0, 4.0), (7.0, 7.6), (6.5, 8.0)])
def test_entropy_tokens_are_apts(photos, thresholds):
    """With thresholds in APT's order, the tokens are the patches APT's rule keeps."""
    gate = TreeGate.entropy(16, 2, 3, (8, 8), thresholds)
    gate.kernels = "reference"
    decision = gate.decide(photos)
    tree = gate.tree_of(photos)
    maps = {
        p: entropy_reference(photos, p, IMAGENET_MEAN, IMAGENET_STD, 512).view(-1, 128 // p, 128 // p) for p in (32, 64)
    }
    maps[16] = torch.zeros(8, 8, 8)  # the finest size needs no entropy
    assert (maps[32] - thresholds[0]).abs().min() > TOL and (maps[64] - thresholds[1]).abs().min() > TOL
    apt = apt_select(maps, thresholds)
    ours = tree.token_weights(decision.hard)
    for s, p in enumerate((16, 32, 64)):
        assert torch.equal(ours[s], apt[p].flatten(1)), p
    assert ours[1].any() and ours[0].any() and ours[2].any() == (thresholds[1] > 7)


# ---- budget ----------------------------------------------------------------------------------


def sorted_reference(logits, tree, k):
    """The documented rule with Python's sort: key (effective score desc, scale desc, own logit
    desc, position), effective score = min over the path of the logits."""
    scale = torch.cat([torch.full((tree.counts[s],), s) for s in range(tree.scales - 1, 0, -1)])
    parent_entry = torch.full((tree.decisions,), -1)
    starts = tree.decision_offsets
    for s in range(1, tree.scales - 1):
        parent = tree.parents(s)
        entries = torch.arange(tree.counts[s]) + starts[s]
        parent_entry[entries] = torch.where(parent >= 0, parent + starts[s + 1], -1)
    chosen = torch.zeros_like(logits, dtype=torch.bool)
    for b in range(logits.shape[0]):
        eff = []
        for i in range(tree.decisions):  # parents come first in the [B, D] order
            own = logits[b, i].item()
            eff.append(own if parent_entry[i] < 0 else min(own, eff[parent_entry[i]]))
        key = sorted(range(tree.decisions), key=lambda i: (-eff[i], -scale[i].item(), -logits[b, i].item(), i))
        chosen[b, key[:k]] = True
    return chosen


@pytest.mark.parametrize("scales,fine_grid", [(3, (8, 8)), (3, (9, 7)), (4, (8, 8)), (4, (11, 9))])
def test_budget_splits_exactly_k_ancestor_closed(scales, fine_grid):
    tree = ScaleTree.of(fine_grid, 2, scales)
    g = torch.Generator().manual_seed(scales * 100 + fine_grid[1])
    continuous = torch.randn(4, tree.decisions, generator=g)
    tied = torch.randint(-2, 3, (4, tree.decisions), generator=g).float()  # many ties
    for logits in (continuous, tied):
        for k in sorted({0, 1, 2, tree.decisions // 3, tree.decisions - 1, tree.decisions}):
            mask = tree_budget_mask(logits, tree, k)
            assert mask.sum(1).tolist() == [k] * 4
            assert chosen_is_ancestor_closed(mask, tree)
            assert token_count(mask, tree).tolist() == [tree.tokens(k)] * 4
            assert torch.equal(mask, sorted_reference(logits, tree, k))


def test_budget_top_k_on_a_hand_made_tree():
    tree = ScaleTree.of((4, 4), 2, 3)  # one 4x4-cell root, four children: D = 5
    logits = torch.tensor([[1.0, 3.0, 0.5, 5.0, -1.0]])
    assert effective_scores(logits, tree).tolist() == [[1.0, 1.0, 0.5, 1.0, -1.0]]
    picks = [tree_budget_mask(logits, tree, k)[0].tolist() for k in range(6)]
    assert picks == [
        [False, False, False, False, False],
        [True, False, False, False, False],  # the root first: a tie at 1.0 goes coarse before fine
        [True, False, False, True, False],  # then the children capped at 1.0, highest own logit first
        [True, True, False, True, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    assert chosen_is_ancestor_closed(torch.tensor([[True, True, False, True, False]]), tree)
    assert not chosen_is_ancestor_closed(torch.tensor([[False, True, False, False, False]]), tree)
    # a child never outranks its parent, however high its own logit
    low_root = torch.tensor([[-3.0, 9.0, 8.0, 7.0, 6.0]])
    assert tree_budget_mask(low_root, tree, 1)[0].tolist() == [True, False, False, False, False]
    # NaN counts as -inf and does not break the closure
    nan_root = torch.tensor([[float("nan"), 9.0, 8.0, 7.0, 6.0], [2.0, float("nan"), 1.0, 0.0, -1.0]])
    mask = tree_budget_mask(nan_root, tree, 2)
    assert mask.tolist() == [[True, True, False, False, False], [True, False, True, False, False]]


def test_budget_fraction_rounds_and_bad_budgets_are_refused():
    tree = ScaleTree.of((8, 8), 2, 3)  # D = 20
    assert budget_splits(0.23, tree) == 5 and budget_splits(0.0, tree) == 0 and budget_splits(1.0, tree) == 20
    assert budget_splits(0.5, tree) == 10 and budget_splits(7, tree) == 7
    logits = torch.randn(2, 20)
    assert tree_budget_mask(logits, tree, 0.23).sum(1).tolist() == [5, 5]
    with pytest.raises(ValueError, match=r"between 0 and 20 splits per image.*got 21"):
        tree_budget_mask(logits, tree, 21)
    with pytest.raises(ValueError, match="between 0 and 20"):
        tree_budget_mask(logits, tree, -1)
    with pytest.raises(ValueError, match=r"fraction .* must be in \[0, 1\]"):
        tree_budget_mask(logits, tree, 1.5)
    with pytest.raises(ValueError, match=r"fraction"):
        tree_budget_mask(logits, tree, float("nan"))
    with pytest.raises(TypeError, match="budget must be an int"):
        tree_budget_mask(logits, tree, True)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, 20\]"):
        tree_budget_mask(logits[:, :4], tree, 2)


def test_budget_path_has_no_host_read(photos):
    gate = learned_gate(fine_patch=16)
    tree = gate.tree_of(photos)
    logits = torch.randn(8, tree.decisions)
    with torch.no_grad(), count_host_reads() as reads:
        tree_budget_mask(logits, tree, 6)
        gate.decide(photos, sample=False, budget=0.3)
    assert reads.count == 0, reads.report()


@pytest.mark.parametrize("kind", ["learned", "entropy"])
def test_gate_budget_gives_every_image_the_same_token_count(photos, kind):
    if kind == "learned":
        gate = learned_gate(fine_patch=16)
    else:
        gate = TreeGate.entropy(16, 2, 3, (8, 8), (6.0, 4.0))
        gate.kernels = "reference"
    tree = gate.tree_of(photos)
    with torch.no_grad():
        decision = gate.decide(photos, sample=False, budget=9)
    assert decision.hard.sum(1).tolist() == [9] * 8 and chosen_is_ancestor_closed(decision.hard, tree)
    assert token_count(decision.hard, tree).tolist() == [tree.roots + 9 * 3] * 8
    assert torch.equal(decision.hard, tree_budget_mask(decision.logits, tree, 9))
    assert (decision.soft is None) == (kind == "entropy")


# ---- masks -----------------------------------------------------------------------------------


def test_a_callers_mask_is_checked_against_the_tree_of_the_images():
    gate = learned_gate()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 20) > 0.5
    decision = gate.decision(images, mask, sample=True)
    assert decision.logits is None and decision.soft is None
    assert torch.equal(decision.hard, mask) and torch.equal(decision.st, mask.float())
    with pytest.raises(ValueError, match=r"mask must have shape \[B, D\] = \[2, 20\].*2x2, 4x4 grids.*got \(2, 4\)"):
        gate.decision(images, mask[:, :4], sample=False)
    with pytest.raises(ValueError, match=r"\[B, D\] = \[2, 20\]"):
        gate.decision(images, mask[:1], sample=False)
    with pytest.raises(TypeError, match="mask must be bool"):
        gate.decision(images, mask.float(), sample=False)
    with pytest.raises(TypeError, match=r"bool torch.Tensor \[B, D\]"):
        gate.decision(images, mask.tolist(), sample=False)
    bigger = torch.randn(2, 3, 128, 96)  # 16x12 / 8x6 / 4x3: D = 60
    with pytest.raises(ValueError, match=r"\[B, D\] = \[2, 60\]"):
        gate.decision(bigger, mask, sample=False)
    assert gate.decision(bigger, torch.zeros(2, 60, dtype=torch.bool), sample=False).hard.shape == (2, 60)


# ---- losses ----------------------------------------------------------------------------------


def test_finest_share_is_the_soft_weight_of_finest_cells():
    tree = ScaleTree.of((8, 8), 2, 3)
    soft = torch.rand(3, 20, requires_grad=True)
    share = finest_share(soft, tree)
    assert share.shape == (3, 64) and 0 <= share.min() and share.max() <= 1
    root, child = soft[:, :4], soft[:, 4:]  # 2x2 roots over 4x4 children over 8x8 cells
    expected = (root.view(3, 2, 1, 2, 1) * child.view(3, 2, 2, 2, 2)).view(3, 4, 4)
    expected = expected.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)
    assert torch.allclose(share, expected)
    share.sum().backward()
    assert (soft.grad != 0).all()
    hard = torch.rand(3, 20) > 0.4  # hard values: the finest-token mask
    assert torch.equal(finest_share(hard.float(), tree).bool(), tree.token_weights(hard)[0])


def test_gate_loss_input_takes_the_finest_share_past_two_scales():
    args = SimpleNamespace(gate_loss_input="samples")
    soft = torch.rand(2, 20, dtype=torch.float64)
    decision = SimpleNamespace(logits=torch.randn(2, 20), soft=soft)
    assert torch.equal(gate_loss_input(args, decision), soft.float())  # two scales: unchanged
    assert torch.equal(gate_loss_input(args, decision, ScaleTree.of((2, 40), 2, 2)), soft.float())
    three = ScaleTree.of((8, 8), 2, 3)
    share = gate_loss_input(args, decision, three)
    assert share.dtype == torch.float32 and torch.equal(share, finest_share(soft, three).float())
    probs = gate_loss_input(SimpleNamespace(gate_loss_input="probs"), decision, three)
    assert torch.equal(probs, finest_share(torch.sigmoid(decision.logits), three))


# ---- S = 2 agrees with the two-scale gates ---------------------------------------------------


def test_two_scales_learned_equals_mixed_scale_gate():
    torch.manual_seed(1)
    gate = MixedScaleGate(16, (4, 4), hidden=8)
    torch.nn.init.normal_(gate.fc4.weight, std=0.5)
    torch.nn.init.zeros_(gate.fc4.bias)
    tree_gate = TreeGate.learned(8, 2, 2, (8, 8), hidden=8)
    tree_gate.levels[0].load_state_dict(gate.state_dict())
    images = torch.randn(3, 3, 64, 64)
    noise = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(tree_gate(images), gate(images))
        for kwargs in (dict(sample=False), dict(sample=True, noise=noise), dict(sample=False, budget=5)):
            a, b = tree_gate.decide(images, **kwargs), gate.decide(images, **kwargs)
            for name in GATE_FIELDS:
                assert torch.equal(getattr(a, name), getattr(b, name)), (kwargs, name)
        torch.manual_seed(5)
        a = tree_gate.decide(images, sample=True)
        torch.manual_seed(5)
        b = gate.decide(images, sample=True)
    assert torch.equal(a.hard, b.hard) and torch.equal(a.soft, b.soft)
    assert tree_gate.macs_per_region() == gate.macs_per_region()


GATE_FIELDS = ("logits", "soft", "hard", "st")


def test_two_scales_entropy_equals_entropy_gate(photos):
    gate = EntropyGate(32, (4, 4), (7.0,))
    tree_gate = TreeGate.entropy(16, 2, 2, (8, 8), (7.0,))
    gate.kernels = tree_gate.kernels = "reference"
    a, b = tree_gate.decide(photos), gate.decide(photos)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hard, b.hard) and a.soft is b.soft is None
    assert 0 < a.hard.sum() < a.hard.numel()


# ---- records, costs, errors ------------------------------------------------------------------


def test_macs_descriptions_and_kwargs():
    gate = learned_gate()  # p=8: 32 px and 16 px levels, hidden 8
    per_node = {s: 3 * (8 * 2**s) ** 2 * 8 + 2 * 8 * 8 + 8 for s in (1, 2)}
    assert gate.macs_per_region() == per_node[2] + 4 * per_node[1]
    tree = ScaleTree.of((9, 7), 2, 3)  # border nodes: 4x3 at scale 1, 2x1 at scale 2
    assert gate.macs(tree) == 2 * per_node[2] + 12 * per_node[1]
    description = gate.describe_architecture()
    assert description["type"] == "tree" and description["scales"] == 3 and description["hidden"] == 8
    assert [lv["region_size"] for lv in description["levels"]] == [32, 16]
    assert gate.from_timm_kwargs() == {"gate": "learned", "scales": [8, 16, 32], "hidden": 8, "temperature": 0.3}
    entropy = TreeGate.entropy(16, 2, 3, (8, 8), [6.0, 4.0], bins=256)
    assert entropy.macs_per_region() == 0 and entropy.thresholds == (6.0, 4.0)
    assert entropy.from_timm_kwargs() == {
        "gate": "entropy",
        "scales": [16, 32, 64],
        "entropy_thresholds": [6.0, 4.0],
        "entropy_bins": 256,
        "entropy_binning": "apt",
        "entropy_mean": list(IMAGENET_MEAN),
        "entropy_std": list(IMAGENET_STD),
    }
    assert entropy.describe_architecture()["thresholds"] == [6.0, 4.0]
    assert "thresholds=(6.0, 4.0)" in repr(entropy) and "patch_sizes=16/32/64" in repr(entropy)
    rebuilt = TreeGate.entropy(16, 2, 3, (8, 8), entropy.from_timm_kwargs()["entropy_thresholds"], bins=256)
    assert rebuilt.describe_architecture() == entropy.describe_architecture()


def test_bad_constructions_are_refused():
    with pytest.raises(ValueError, match=r"2 for 3 scales, finest boundary first"):
        TreeGate.entropy(16, 2, 3, (8, 8), (5.5,))
    with pytest.raises(ValueError, match="scales must be an integer >= 2"):
        TreeGate.learned(16, 2, 1, (8, 8))
    with pytest.raises(ValueError, match="ratio"):
        TreeGate.learned(16, 1, 3, (8, 8))
    with pytest.raises(ValueError, match="fine_patch"):
        TreeGate.learned(0, 2, 3, (8, 8))
