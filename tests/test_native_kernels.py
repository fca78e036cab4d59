"""Native resolution, one pass per list (issue 27 item 2, docs/design.md section 11): the entropy
kernel's LIST mode == its reference, and every gate (entropy and learned, two and three scales)
decides a list of images of different sizes exactly as it decides each image alone, with no
loop over images: no host read with a budget, and as many kernel launches for 4 images as for 2.
"""

import pytest
import timm
import torch

import msvit
from msvit.host_reads import count_host_reads
from msvit.models.list_gates import list_decision
from msvit_kernels.entropy_kernel import list_patch_entropy
from msvit_kernels.reference import entropy_flat_reference, entropy_levels_reference
from msvit_kernels.tree_batch import TreeBatch

from helpers import counted_launches, needs_triton, redraw_parameters

P, R = 4, 2  # a 4 px fine patch keeps the interpreter fast
# odd grids, border cells (not whole 8 / 16 px nodes), 1:5
SIZES = {2: [(36, 20), (8, 40), (28, 28)], 3: [(36, 20), (16, 80), (48, 44)]}
MEAN, STD = (0.4, 0.5, 0.45), (0.25, 0.2, 0.3)


def list_images(sizes, chans=3, seed=0, nan=True):
    """Pixels near [0, 1] after un-normalising (MEAN, STD), with a NaN pixel in the middle of the
    last image and a flat node of scale 1 (entropy 0) in the first: both ends of the threshold."""
    generator = torch.Generator().manual_seed(seed)
    images = [(torch.rand(chans, h, w, generator=generator) - 0.4) / 0.25 for h, w in sizes]
    images[0][:, : P * R, : P * R] = 0.0
    if nan:
        h, w = sizes[-1]
        images[-1][0, h // 2, w // 2] = float("nan")
    return images


def reference_levels(images, batch, chans, bins, binning):
    """Entropies per scale in global node order, from ``entropy_flat_reference``."""
    flat = torch.cat([image.reshape(-1) for image in images])
    starts, layout = batch.scale_starts, batch.layout()
    merges = [
        (layout.parent[starts[s] : starts[s + 1]], starts[s + 2] - starts[s + 1]) for s in range(1, batch.scales - 1)
    ]
    cells = torch.arange(starts[1], starts[2])
    mean, std = MEAN[:chans], STD[:chans]
    return flat, entropy_flat_reference(
        flat, batch.node_pixels(P, chans), cells, P * R, chans, mean, std, bins, binning, merges, R
    )


@pytest.mark.parametrize("scales", [2, 3])
@pytest.mark.parametrize("binning", ["apt", "continuous"])
@pytest.mark.parametrize("count", [1, 3])
def test_flat_reference_equals_each_images_entropy(scales, binning, count):
    """The list reference, node by node, == the tensor reference of each image alone (exactly)."""
    images = list_images(SIZES[scales][-count:])
    batch = TreeBatch.of([(h // P, w // P) for h, w in SIZES[scales][-count:]], R, scales)
    _, levels = reference_levels(images, batch, 3, 64, binning)
    for s, level in zip(range(1, scales), levels):
        alone = [entropy_levels_reference(im[None], (P * R**s,), MEAN, STD, 64, binning)[0][0] for im in images]
        assert torch.equal(level, torch.cat(alone)), s
    assert torch.isinf(levels[-1]).any() and (levels[0] == 0).any()  # the NaN pixel and the flat region


@needs_triton
@pytest.mark.parametrize("scales", [2, 3])
@pytest.mark.parametrize("binning", ["apt", "continuous"])
@pytest.mark.parametrize("count, chans", [(1, 3), (3, 3), (3, 1)])
def test_list_entropy_kernel_equals_the_reference(scales, binning, count, chans):
    """One launch over every node of scales 1 .. S-1 of the list == ``entropy_flat_reference``."""
    sizes = SIZES[scales][-count:]
    images = list_images(sizes, chans)
    batch = TreeBatch.of([(h // P, w // P) for h, w in sizes], R, scales)
    flat, levels = reference_levels(images, batch, chans, 64, binning)
    starts = batch.scale_starts
    got = list_patch_entropy(
        flat,
        batch.node_pixels(P, chans),
        range(starts[1], starts[-1]),
        P,
        chans,
        largest=R ** (scales - 1),
        mean=MEAN[:chans],
        std=STD[:chans],
        bins=64,
        binning=binning,
    )
    expected = torch.cat(levels)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and torch.isinf(got).any()
    finite = torch.isfinite(expected)
    assert (got[finite] - expected[finite]).abs().max() <= 1e-5


@needs_triton
def test_list_entropy_kernel_refuses_bad_arguments():
    batch = TreeBatch.of([(4, 6)], R, 2)
    flat, nodes = torch.rand(3 * 16 * 24), batch.node_pixels(P, 3)
    with pytest.raises(TypeError, match="flat float pixel buffer"):
        list_patch_entropy(flat.view(3, -1), nodes, range(24, 30), P, 3, largest=2)
    with pytest.raises(ValueError, match="node_pixels must be int64"):
        list_patch_entropy(flat, nodes.int(), range(24, 30), P, 3, largest=2)
    with pytest.raises(ValueError, match="nodes must be a range"):
        list_patch_entropy(flat, nodes, range(24, 31), P, 3, largest=2)
    with pytest.raises(ValueError, match="bins must be a power of two"):
        list_patch_entropy(flat, nodes, range(24, 30), P, 3, largest=2, bins=100)


def model_of(gate, scales, kernels="reference"):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        depth=1,
        embed_dim=24,
        num_heads=2,
        num_classes=3,
        patch_size=P,
        img_size=32,
    )
    sizes = [P * R**s for s in range(scales)]
    kwargs = (
        {"gate": "entropy", "entropy_thresholds": (4.0, 3.0)[: scales - 1], "entropy_bins": 64}
        if gate == "entropy"
        else {}
    )
    model = msvit.from_timm(redraw_parameters(vit), scales=sizes, kernels=kernels, **kwargs).eval()
    redraw_parameters(model.gate, seed=2)
    return model


def per_image(model, images, budget):
    """The old loop: the gate's decisions for each image alone."""
    return [model.gate.decide(image[None], sample=False, budget=budget) for image in images]


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("gate, scales", [("entropy", 2), ("entropy", 3), ("learned", 3)])
def test_list_decisions_equal_each_images_decisions(kernels, gate, scales):
    """Flat list decisions == the gate's decisions image by image (thresholds, a fraction, an int
    budget), NaN region included (+inf entropy: fine, first under a budget)."""
    model = model_of(gate, scales, kernels)
    images = list_images(SIZES[scales], nan=gate == "entropy")
    counts = model.batch_of(images).decisions
    with torch.no_grad():
        for budget in (None, 0.3, 2):
            decision = model.decide(images, budget=budget)
            for b, (alone, logits, hard) in enumerate(
                zip(per_image(model, images, budget), decision.logits.split(counts), decision.hard.split(counts))
            ):
                torch.testing.assert_close(logits, alone.logits[0], rtol=1e-6, atol=1e-6)
                assert torch.equal(hard, alone.hard[0]), (budget, b)
                assert decision.st.dtype == alone.st.dtype
    if gate == "entropy":  # the NaN region: +inf, fine, kept first under any budget > 0
        last = decision.logits.split(counts)[-1]
        assert torch.isinf(last).any() and decision.hard.split(counts)[-1][torch.isinf(last)].all()


def test_an_int_budget_too_large_is_refused_naming_the_image():
    model = model_of("entropy", 3)
    images = list_images(SIZES[3], nan=False)
    too_many = model.batch_of(images).decisions[0] + 1
    with pytest.raises(ValueError, match=r"images\[0\]: budget must be between 0 and"):
        model.decide(images, budget=too_many)


def test_list_tree_budget_ties_follow_the_tree_rule():
    """Equal logits everywhere: the tie rule (coarse before fine, raster order) picks each image's
    nodes as ``tree_budget_mask`` does alone."""
    model = model_of("learned", 3)
    images = list_images(SIZES[3], nan=False)
    with torch.no_grad():
        for level in model.gate.levels:
            level.fc4.weight.zero_()
        decision = model.decide(images, budget=0.4)
    for hard, alone in zip(decision.hard.split(model.batch_of(images).decisions), per_image(model, images, 0.4)):
        assert torch.equal(hard, alone.hard[0])


def test_gradients_reach_every_images_learned_gate_at_three_scales():
    model = model_of("learned", 3).train()
    images = list_images(SIZES[3], nan=False)
    out = model(images, return_gate=True)
    counts = model.batch_of(images).decisions
    for b in range(len(images)):
        grads = torch.autograd.grad(out.logits[b].square().sum(), list(model.gate.parameters()), retain_graph=True)
        for level, (name, _) in enumerate(model.gate.named_parameters()):
            if name.endswith("fc1.weight"):
                assert grads[level].abs().sum() > 0, f"image {b}: {name} got no gradient"
        (st,) = torch.autograd.grad(out.logits[b].square().sum(), out.gate.st, retain_graph=True)
        assert st.split(counts)[b].abs().sum() > 0
    assert out.gate.soft is not None and out.gate.soft.shape == (sum(counts),)


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("gate, scales", [("entropy", 2), ("entropy", 3), ("learned", 3)])
def test_no_host_read_with_a_budget(kernels, gate, scales):
    model = model_of(gate, scales, kernels)
    model.attention_backend = "triton" if kernels == "triton" else "auto"
    images = list_images(SIZES[scales], nan=False)
    with torch.no_grad():
        model(images, budget=0.5)  # builds the layout maps (host metadata) once
        with count_host_reads() as reads:
            model(images, budget=0.5)
    assert reads.count == 0, reads.report()


@needs_triton
@pytest.mark.parametrize("gate, scales", [("entropy", 2), ("entropy", 3), ("learned", 3)])
def test_launches_do_not_grow_with_the_number_of_images(monkeypatch, gate, scales):
    """A list forward launches the same kernels for 2 images as for 4 (the entropy gate: one launch)."""
    model = model_of(gate, scales, "triton")
    model.attention_backend = "triton"
    images = list_images(SIZES[scales] + SIZES[scales][:1], nan=False)
    names = counted_launches(monkeypatch)
    launches = []
    with torch.no_grad():
        for count in (2, 4):
            names.clear()
            model(images[:count], budget=0.5)
            launches.append(list(names))
    assert launches[0] == launches[1], launches
    assert launches[0].count("_entropy_kernel") == (gate == "entropy"), launches


def test_an_unknown_gate_is_refused_by_name():
    batch = TreeBatch.of([(8, 8)], R, 2)
    with pytest.raises(NotImplementedError, match="Identity gate"):
        list_decision(torch.nn.Identity(), [torch.rand(3, 32, 32)], batch, P, False, None)


@needs_triton
def test_the_list_op_traces_under_torch_compile():
    sizes = SIZES[3]
    images = list_images(sizes, nan=False)
    batch = TreeBatch.of([(h // P, w // P) for h, w in sizes], R, 3)
    flat, nodes = torch.cat([image.reshape(-1) for image in images]), batch.node_pixels(P, 3)
    starts = batch.scale_starts

    def entropies(pixels):
        return list_patch_entropy(pixels, nodes, range(starts[1], starts[-1]), P, 3, largest=R * R, bins=64)

    compiled = torch.compile(entropies, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(flat), entropies(flat))
