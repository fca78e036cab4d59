"""More than two scales (docs/design.md section 10): a quadtree of patch sizes p, 2p, 4p (8p).

The layout's consequences, on re-drawn parameters: all-finest equals the timm ViT, all-coarsest
equals it on the image pooled to the coarsest size, and any split mask gives the same logits
packed, dense-masked and trimmed; two scales through ``scales=`` are today's model; the task
gradient reaches the gate decisions of every level; static shapes; MACs.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import msvit
from msvit.host_reads import count_host_reads
from msvit.models.flops import count_macs
from msvit_kernels.scale_tree import ScaleTree

from helpers import TINY, half_resolution_twin, needs_triton, redraw_parameters, rel_err, tiny_vit

MODES = ("packed", "masked", "trimmed")


def converted(size, scales=(8, 16, 32), **kwargs):
    vit = redraw_parameters(tiny_vit(size))
    return vit, msvit.from_timm(vit, scales=scales, **kwargs).eval()


def split_mask(model, images, kind: str, seed: int = 0) -> torch.Tensor:
    tree = model.tokenizer.tree(model.tokenizer.grids(images)[0])
    if kind in ("all", "none"):
        return torch.full((images.shape[0], tree.decisions), kind == "all")
    return torch.rand(images.shape[0], tree.decisions, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize(
    "size, scales",
    [((64, 64), (8, 16, 32)), ((80, 48), (8, 16, 32)), ((64, 64), (8, 16, 32, 64))],
    ids=["3-scales", "3-scales-border-roots", "4-scales"],
)
def test_all_finest_equals_timm(size, scales):
    vit, model = converted(size, scales)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = vit(images)
        for mode in MODES:
            assert rel_err(model(images, mask=split_mask(model, images, "all"), mode=mode), expected) <= 1e-4, mode


@pytest.mark.parametrize("scales", [(8, 16, 32), (8, 16, 32, 64)])
def test_all_coarsest_equals_timm_on_the_pooled_image(scales):
    vit, model = converted((64, 64), scales)
    factor = scales[-1] // scales[0]
    twin = half_resolution_twin(vit, (64, 64), factor=factor, **TINY)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = twin(torch.nn.functional.avg_pool2d(images, factor))
        for mode in MODES:
            assert rel_err(model(images, mask=split_mask(model, images, "none"), mode=mode), expected) <= 1e-4, mode


@pytest.mark.parametrize(
    "size, scales", [((80, 48), (8, 16, 32)), ((64, 64), (8, 16, 32, 64))], ids=["3-scales", "4-scales"]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_masks_packed_equals_masked_equals_trimmed(size, scales, seed):
    _, model = converted(size, scales)
    images = torch.randn(3, 3, *size)
    mask = split_mask(model, images, "random", seed)
    with torch.no_grad():
        packed = model(images, mask=mask, return_gate=True)
        for mode in ("masked", "trimmed"):
            assert rel_err(model(images, mask=mask, mode=mode), packed.logits) <= 1e-4, mode
    assert torch.equal(packed.tokens, model.tokens_per_image(mask, images=images))
    assert packed.logits.std() > 0.05


def test_two_scales_through_scales_is_todays_model():
    vit = redraw_parameters(tiny_vit(64))
    images = torch.randn(2, 3, 64, 64)
    today = msvit.from_timm(vit).eval()
    torch.manual_seed(0)
    via_scales = msvit.from_timm(vit, scales=(8, 16)).eval()
    via_scales.load_state_dict(today.state_dict())
    mask = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        assert torch.equal(via_scales(images, mask=mask), today(images, mask=mask))


def test_tokens_follow_the_tree():
    _, model = converted((64, 64))
    images = torch.randn(1, 3, 64, 64)
    tree = model.tokenizer.tree((8, 8))
    assert tree.grids == ((8, 8), (4, 4), (2, 2)) and tree.decisions == 4 + 16
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 0] = True  # split the first 32px region into four 16px tokens
    mask[0, 4] = True  # and its first 16px node into four 8px tokens
    mask[0, 4 + 2] = True  # not reached: (0, 2) at 16px belongs to the unsplit second region
    assert model.tokens_per_image(mask, images=images).tolist() == [1 + 4 + 3 + 3]
    features = model.forward_features(images, mask=mask)
    index = features.index
    # packed order: region 0's subtree in pre-order (its 16px children, the first split into 8px
    # cells in raster order), then regions 1..3
    assert index.scale.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    fine_cells = index.position[:4].tolist()
    assert fine_cells == [0, 1, 8, 9]


def test_gradients_reach_every_level():
    _, model = converted((64, 64))
    images = torch.randn(2, 3, 64, 64)
    tree = model.tokenizer.tree((8, 8))
    hard = split_mask(model, images, "random", 3)
    hard[:, :4] = True  # every region splits: the 16px level is reached
    st = hard.to(images.dtype).requires_grad_()
    x, index = model.tokenizer.pack(images, hard, st)
    (x * torch.randn_like(x)).sum().backward()
    levels = tree.per_scale(st.grad)
    assert levels[2].abs().sum() > 0 and levels[1].abs().sum() > 0
    model.train()  # the learned gate samples: the task loss reaches each level's MLP through the tokens
    model.zero_grad()
    model(images).square().mean().backward()
    for level in model.gate.levels:
        assert level.fc1.weight.grad is not None and level.fc1.weight.grad.abs().sum() > 0


def test_static_shapes_equal_the_dynamic_forward():
    _, model = converted((80, 48))
    images = torch.randn(3, 3, 80, 48)
    mask = split_mask(model, images, "random", 5)
    tree = model.tokenizer.tree((10, 6))
    with torch.no_grad():
        dynamic = model(images, mask=mask)
        capacity = 3 * (1 + tree.counts[0])
        padded = model(images, mask=mask, capacity=capacity)
    assert rel_err(padded, dynamic) <= 1e-6
    shape = model.static_shape(3, (80, 48), budget=2)
    assert shape.capacity == 3 * (1 + tree.tokens(2)) and shape.padding_sequences == 0
    with pytest.raises(ValueError, match="capacity must be between"):
        model(images, mask=mask, capacity=2)


def test_mask_of_the_wrong_shape_is_refused_with_the_expected_shape():
    _, model = converted((64, 64))
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[B, D\] = \[2, 20\]"):
        model(images, mask=torch.ones(2, 16, dtype=torch.bool))


def test_image_smaller_than_the_coarsest_patch_is_refused():
    _, model = converted((64, 64))
    with pytest.raises(ValueError, match="coarsest"):
        model(torch.randn(1, 3, 24, 24), mask=torch.ones(1, 0, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["all", "random", "none"])
def test_macs_match_the_flop_counter(kind):
    _, model = converted((64, 64))
    images = torch.randn(2, 3, 64, 64)
    mask = split_mask(model, images, kind, 2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, mask=mask)
    counted = counter.get_total_flops() / 2
    ours = count_macs(model, images, mask=mask, include_gate=False).sum().item()
    assert abs(ours / counted - 1) < 1e-3


def test_scales_argument_errors():
    vit = tiny_vit(64)
    with pytest.raises(ValueError, match="start at the model's patch size 8"):
        msvit.from_timm(vit, scales=(16, 32, 64))
    with pytest.raises(ValueError, match="one integer ratio"):
        msvit.from_timm(vit, scales=(8, 16, 48))
    with pytest.raises(ValueError, match="contradicts"):
        msvit.from_timm(vit, scales=(8, 16, 32), coarse_patch_size=24)
    assert msvit.from_timm(vit, scales=(8, 16, 32), aggregate="zero_conv").tokenizer.aggregate == "zero_conv"
    assert ScaleTree.of((8, 8), 2, 3).roots == 4


def _family_cases():
    from model_families import cases

    return cases(refused=False)


@pytest.mark.parametrize(
    "family, name, kwargs, feature", _family_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_supported_family_at_three_scales(family, name, kwargs, feature):
    """Every family from_timm supports: all-finest equals timm, and a random split mask gives the
    same logits packed, masked and trimmed."""
    import re

    import timm

    found = re.search(r"patch(\d+)", name)
    patch = int(found.group(1)) if found else 16  # flexivit_small: patch 16
    if "img_size" in kwargs:  # at least one coarsest patch per side (a 4x4 finest grid)
        kwargs = {**kwargs, "img_size": max(kwargs["img_size"], 4 * patch)}
    torch.manual_seed(0)
    vit = redraw_parameters(timm.create_model(name, pretrained=False, depth=2, **kwargs).eval())
    patch = msvit.from_timm(vit).tokenizer.fine_patch  # names without "patch<N>": DeepSeek's 14, FlexiViT's 16
    model = msvit.from_timm(vit, scales=(patch, 2 * patch, 4 * patch)).eval()
    size = kwargs.get("img_size", model.pretrained_cfg["input_size"][-1])
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = vit(images)
        assert rel_err(model(images, mask=split_mask(model, images, "all")), expected) <= 1e-4
        mask = split_mask(model, images, "random", 1)
        packed = model(images, mask=mask)
        for mode in ("masked", "trimmed"):
            assert rel_err(model(images, mask=mask, mode=mode), packed) <= 1e-4, mode


def test_pruning_and_segmentation_take_three_scales():
    _, model = converted((64, 64))
    images = torch.randn(2, 3, 64, 64)
    mask = split_mask(model, images, "random", 4)
    with torch.no_grad():
        logits = model(images, mask=mask)
        kept_all = msvit.PrunedMSViT(model, keep_ratio=1.0, layers=(1,))(images, mask=mask)
        assert rel_err(kept_all, logits) <= 1e-6
        features = model.forward_features(images, mask=mask)
        grid = msvit.unpack_to_grid(features).grid  # [B, 8, 8, C]: every finest cell takes its covering token
        segmenter = msvit.MSSegmenter(model, num_classes=3).eval()
        assert segmenter(images, mask=mask).shape == (2, 3, 64, 64)
    tree = model.tokenizer.tree((8, 8))
    for b in range(2):  # as many distinct vectors on the grid as the image has patch tokens
        distinct = torch.unique(grid[b].reshape(64, -1), dim=0).shape[0]
        assert distinct == model.tokens_per_image(mask[b : b + 1]).item() - 1
    assert tree.tokens(0) == 4


def test_msvit_train_takes_three_scales(tmp_path):
    from msvit.train import parse_args, train

    from helpers import TINY_MODEL

    flags = [
        *"--train-size 128 --val-size 32 --batch-size 32 --image-size 32 --scales 8 16 32 --gate-hidden 16".split(),
        *"--epochs 2 --lr 2e-3 --gate-lr 0.05 --gate-target 0.25 --gate-loss l0 --warmup-epochs 0.5".split(),
        *"--gate-warmup-epochs 0.5 --model-kwargs".split(),
        TINY_MODEL,
        "--out",
        str(tmp_path / "learned"),
    ]
    train(parse_args(flags))
    import json

    rows = [json.loads(line) for line in (tmp_path / "learned" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and 0 <= rows[-1]["train_fine"] <= 1
    model = msvit.load_checkpoint(tmp_path / "learned")
    assert model.tokenizer.patch_sizes == (8, 16, 32) and len(model.gate.levels) == 2
    entropy = [*flags[:-1], str(tmp_path / "entropy")]
    for flag in ("--gate-hidden", "--gate-lr", "--gate-target", "--gate-loss", "--gate-warmup-epochs"):
        at = entropy.index(flag)
        del entropy[at : at + 2]
    entropy += ["--gate", "entropy", "--entropy-threshold", "6.0", "4.0", "--max-steps", "2", "--epochs", "1"]
    train(parse_args(entropy))
    rebuilt = msvit.load_checkpoint(tmp_path / "entropy")
    assert rebuilt.gate.kind == "entropy" and rebuilt.gate.thresholds == (6.0, 4.0)
    with pytest.raises(SystemExit):
        parse_args([*entropy[:-6], "--entropy-threshold", "5.5", "--max-steps", "1"])  # one value for 3 scales
    from PIL import Image

    from msvit.visualize.cli import main as visualize

    picture = tmp_path / "photo.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(picture)
    visualize([str(picture), "--checkpoint", str(tmp_path / "entropy"), "--out", str(tmp_path / "pictures")])
    assert (tmp_path / "pictures" / "photo_mask.png").stat().st_size > 0


def test_compile_packed_at_three_scales():
    """torch.compile of the static forward (aot_eager), with the default buckets and with a budget:
    equal to the eager model whatever the gate decides, no graph break."""
    import torch._dynamo

    _, model = converted((64, 96))  # 8 x 12 cells: 2 x 3 regions of 32 px
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 64, 96, generator=gen) for _ in range(3)]
    torch._dynamo.reset()
    options = {"backend": "aot_eager"}
    runner = msvit.compile_packed(model, 2, (64, 96), mode="torch_compile", compile_options=options)
    tree = model.tokenizer.tree((8, 12))
    assert runner.buckets[-1] == 2 * (1 + tree.counts[0]) and runner.buckets[0] > 2 * (1 + tree.roots)
    for images in batches:
        with torch.no_grad():
            assert rel_err(runner(images), model(images)) <= 1e-5
    assert runner.fallbacks == 0
    budget = msvit.compile_packed(model, 2, (64, 96), budget=5, mode="torch_compile", compile_options=options)
    assert budget.buckets == [2 * (1 + tree.tokens(5))]
    with torch.no_grad():
        assert rel_err(budget(batches[0]), model(batches[0], budget=5)) <= 1e-5


@needs_triton
def test_fused_kernels_equal_the_reference_and_read_nothing_back_with_a_budget():
    """kernels="triton" (entropy gate, tree index, pack; the interpreter on CPU) equals the torch
    path at three scales, border roots included; a budget or a capacity makes 0 host reads, the
    dynamic forward exactly 1."""
    size = (40, 48)  # 5 x 6 cells of 8 px: a 1 x 1 top grid, border roots at 16 px and at 8 px
    vit = redraw_parameters(tiny_vit(size))
    kwargs = dict(scales=(8, 16, 32), gate="entropy", entropy_thresholds=(4.0, 3.0), entropy_mean=(0.5,) * 3)
    reference = msvit.from_timm(vit, kernels="reference", **kwargs).eval()
    fused = msvit.from_timm(vit, kernels="triton", attention_backend="triton", **kwargs).eval()
    images = torch.rand(2, 3, *size) * 2 - 1
    images[0, :, :16, :16] = 0.1  # a flat corner: some nodes stay whole
    with torch.no_grad():
        expected = reference(images, return_gate=True)
        got = fused(images, return_gate=True)
        assert torch.equal(got.gate.hard, expected.gate.hard) and torch.equal(got.tokens, expected.tokens)
        assert rel_err(got.logits, expected.logits) <= 1e-4
        tree = fused.tokenizer.tree((5, 6))
        for options in ({"budget": 2}, {"capacity": 2 * (1 + tree.counts[0])}, {}):
            with count_host_reads() as reads:
                out = fused(images, **options)
            assert reads.count == (0 if options else 1), (options, reads.report())
            assert rel_err(out, reference(images, **options)) <= 1e-4
