"""Native resolution: a list of images of different sizes in one packed forward (docs/design.md
section 11, docs/native_resolution.md).

Every image of a mixed list must give the logits it gives alone, and, every region fine, timm's
at its own size (timm with ``dynamic_img_size=True``, parameters re-drawn). Sizes cover the aspect
ratios 1:1, 1:2, 10:3 and 1:5 and sizes with border cells (not whole coarse regions).
"""

import pytest
import timm
import torch

import msvit
from msvit.host_reads import count_host_reads
from msvit_kernels.pack_kernel import gather_embed_pack
from msvit_kernels.reference import gather_flat_patches_reference, gather_patches_reference, pack_reference
from msvit_kernels.scale_tree import ScaleTree, tree_index
from msvit_kernels.tree_batch import TreeBatch, batch_index

from helpers import needs_triton, redraw_parameters, rel_err

# (H, W) in pixels for a 16 px patch: 1:1, 1:2, 10:3 (border column), 1:5, 3:5 (border row and column)
SIZES_16 = [(64, 64), (32, 64), (160, 48), (32, 160), (48, 80)]
# three scales (16/32/64 px) need one whole 64 px patch per side
SIZES_16_TREE = [(64, 64), (64, 128), (320, 96), (64, 320), (96, 160)]
TOL = 1e-5

FAMILIES = {
    "vit": lambda: timm.create_model(
        "vit_small_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=3, num_classes=5
    ),
    "rope": lambda: timm.create_model(
        "vit_small_patch16_rope_224", pretrained=False, depth=2, embed_dim=48, num_heads=3, num_classes=5
    ),
    "map": lambda: timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, depth=1, embed_dim=48, num_heads=3, num_classes=5
    ),
}


def timm_model(family: str):
    torch.manual_seed(0)
    return redraw_parameters(FAMILIES[family]()).eval()


def converted(family: str, **kwargs):
    """The MSViT of a family, gate re-drawn too (its init keeps every region fine) and a learned
    two-scale gate's last bias set to the median logit of the test images: mixed decisions."""
    model = msvit.from_timm(timm_model(family), kernels="reference", **kwargs).eval()
    redraw_parameters(model.gate, seed=2)
    if isinstance(model.gate, msvit.models.gate.MixedScaleGate):
        with torch.no_grad():
            logits = torch.cat([model.gate(image[None])[0] for image in images_of(SIZES_16)])
            model.gate.fc4.bias -= logits.median()
    return model


def dynamic(family: str):
    """The timm model with ``dynamic_img_size=True``: it runs each image at its own size."""
    torch.manual_seed(0)
    builders = {
        "vit": ("vit_small_patch16_224", dict(depth=2, embed_dim=48, num_heads=3)),
        "rope": ("vit_small_patch16_rope_224", dict(depth=2, embed_dim=48, num_heads=3)),
        "map": ("vit_base_patch16_siglip_224", dict(depth=1, embed_dim=48, num_heads=3)),
    }
    name, kwargs = builders[family]
    model = timm.create_model(name, pretrained=False, num_classes=5, dynamic_img_size=True, **kwargs)
    return redraw_parameters(model).eval()


def images_of(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


def random_masks(model, images, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(d, generator=generator) < 0.5 for d in model.batch_of(images).decisions]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_fine_list_equals_timm_at_each_image_size(family):
    vit = dynamic(family)
    model = msvit.from_timm(vit, kernels="reference").eval()
    images = images_of(SIZES_16)
    fine = [torch.ones(d, dtype=torch.bool) for d in model.batch_of(images).decisions]
    with torch.no_grad():
        out = model(images, mask=fine, return_gate=True)
        for b, image in enumerate(images):
            assert rel_err(out.logits[b : b + 1], vit(image[None])) <= TOL, (family, SIZES_16[b])
    assert out.logits.shape == (len(images), 5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_image_of_a_list_equals_itself_alone(family):
    model = converted(family)
    images = images_of(SIZES_16)
    masks = random_masks(model, images)
    with torch.no_grad():
        mixed = model(images, mask=masks, return_gate=True)
        for b, (image, mask) in enumerate(zip(images, masks)):
            alone = model(image[None], mask=mask[None], return_gate=True)
            assert rel_err(mixed.logits[b : b + 1], alone.logits) <= TOL, (family, SIZES_16[b])
            assert mixed.tokens[b] == alone.tokens[0]
        # the gate's own decisions (re-drawn: a mix of fine and coarse regions), budgets per image
        gated = model(images, return_gate=True)
        assert 0 < gated.gate.hard.float().mean() < 1
        budgeted = model(images, budget=0.5)
        for b, image in enumerate(images):
            assert rel_err(gated.logits[b : b + 1], model(image[None])) <= TOL
            assert rel_err(budgeted[b : b + 1], model(image[None], budget=0.5)) <= TOL


def test_packed_equals_masked_and_trimmed_per_image():
    model = msvit.from_timm(timm_model("rope"), kernels="reference").eval()
    images = images_of(SIZES_16)
    masks = random_masks(model, images, seed=3)
    with torch.no_grad():
        packed = model(images, mask=masks)
        for mode in ("masked", "trimmed"):
            assert rel_err(model(images, mask=masks, mode=mode), packed) <= TOL, mode


@pytest.mark.parametrize("gate", ["learned", "entropy"])
def test_three_scales_list_equals_each_image_alone(gate):
    kwargs = {} if gate == "learned" else {"gate": "entropy", "entropy_thresholds": (4.0, 3.0)}
    model = converted("vit", scales=(16, 32, 64), **kwargs)
    images = images_of(SIZES_16_TREE)
    masks = random_masks(model, images, seed=2)
    with torch.no_grad():
        for kwargs_b in ({"mask": masks}, {}, {"budget": 0.3}):
            mixed = model(images, return_gate=True, **kwargs_b)
            for b, image in enumerate(images):
                one = {k: (v[b][None] if k == "mask" else v) for k, v in kwargs_b.items()}
                alone = model(image[None], return_gate=True, **one)
                assert rel_err(mixed.logits[b : b + 1], alone.logits) <= TOL, (kwargs_b.keys(), SIZES_16_TREE[b])
                assert mixed.tokens[b] == alone.tokens[0]
        packed = model(images, mask=masks)
        assert rel_err(model(images, mask=masks, mode="masked"), packed) <= TOL


def test_all_fine_three_scales_equals_timm():
    vit = dynamic("vit")
    model = msvit.from_timm(vit, scales=(16, 32, 64), kernels="reference").eval()
    images = images_of(SIZES_16_TREE)
    fine = [torch.ones(d, dtype=torch.bool) for d in model.batch_of(images).decisions]  # split everything
    with torch.no_grad():
        logits = model(images, mask=fine)
        for b, image in enumerate(images):
            assert rel_err(logits[b : b + 1], vit(image[None])) <= TOL


def test_gradients_reach_every_images_gate():
    model = converted("vit").train()
    images = images_of(SIZES_16)
    out = model(images, return_gate=True)
    # st is the hard decision in value and the soft output's gradient path (straight-through)
    (grad,) = torch.autograd.grad(out.logits.square().sum(), out.gate.st, retain_graph=True)
    for b, part in enumerate(grad.split(model.batch_of(images).decisions)):
        assert part.abs().sum() > 0, f"image {b}'s gate got no gradient"
    out.logits.sum().backward()
    assert model.gate.fc1.weight.grad.abs().sum() > 0


def test_list_api_outputs():
    model = converted("vit")
    images = images_of(SIZES_16)
    batch = model.batch_of(images)
    with torch.no_grad():
        out = model(images, return_gate=True)
        masks = model.gate_mask(images)
        assert [tuple(m.shape) for m in masks] == [(d,) for d in batch.decisions]
        assert out.gate.hard.shape == (sum(batch.decisions),)  # flat, image by image
        assert torch.equal(torch.cat(masks), out.gate.hard)
        assert torch.equal(model.tokens_per_image(masks, images=images), out.tokens)
        features = model.forward_features(images)
        assert torch.equal(model.forward_head(features), out.logits)
        assert features.fine_grid == tuple((h // 16, w // 16) for h, w in SIZES_16)
        # a budget fraction: k_b = round(fraction * regions_b) per image, a known (static) length
        budgeted = model(images, budget=0.5, return_gate=True)
        for b, part in enumerate(budgeted.gate.hard.split(batch.decisions)):
            assert part.sum() == round(0.5 * batch.decisions[b])
        assert budgeted.tokens.sum() == batch.static_shape(1, splits=[round(0.5 * d) for d in batch.decisions])[0]
        # a capacity pads the packed rows after the real ones: the same logits
        padded = model(images, capacity=int(out.tokens.sum()) + 7, return_gate=True)
        assert rel_err(padded.logits, out.logits) <= TOL
        assert torch.equal(padded.tokens, out.tokens)


def test_list_of_equal_sizes_equals_the_tensor_batch():
    model = msvit.from_timm(timm_model("vit"), kernels="reference").eval()
    batch = torch.randn(3, 3, 48, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(model(list(batch)), model(batch)) <= TOL


@pytest.mark.parametrize("scales", [2, 3])
def test_batch_layout_of_equal_sizes_is_the_tree_layout(scales):
    grid = (7, 5) if scales == 2 else (9, 8)
    tree = ScaleTree.of(grid, 2, scales)
    mask = torch.rand(3, tree.decisions, generator=torch.Generator().manual_seed(0)) < 0.5
    batch = TreeBatch.of([grid] * 3, 2, scales)
    for shape in (None, batch.static_shape(1, 3 * (1 + tree.counts[0]) - 3)):
        expected, got = tree_index(mask, tree, 1, shape), batch_index(mask.flatten(), batch, 1, shape)
        for field in ("cu_seqlens", "rows", "source", "region", "is_fine", "row_image", "prefix_rows", "scale"):
            assert torch.equal(getattr(expected, field), getattr(got, field)), field
        assert torch.equal(expected.fine_to_row.flatten(), got.fine_to_row)
        assert (expected.total, expected.max_seqlen) == (got.total, got.max_seqlen)


def test_mixed_batch_layout_is_each_images_layout_offset():
    sizes = [(4, 4), (2, 7), (5, 3)]
    batch = TreeBatch.of(sizes, 2, 2)
    mask = torch.rand(sum(batch.decisions), generator=torch.Generator().manual_seed(5)) < 0.5
    index = batch_index(mask, batch, 1)
    at = 0
    for b, (tree, part) in enumerate(zip(batch.trees, mask.split(batch.decisions))):
        alone = tree_index(part[None], tree, 1)
        length = alone.total
        assert index.cu_seqlens[b + 1] - index.cu_seqlens[b] == length
        own = (index.rows >= at) & (index.rows < at + length)
        assert torch.equal(index.rows[own] - at, alone.rows)
        assert torch.equal(index.scale[own], alone.scale)
        at += length


def test_bad_lists_are_refused_naming_the_image():
    model = msvit.from_timm(timm_model("vit"), kernels="reference").eval()
    good = torch.randn(3, 32, 64)
    cases = [
        ([], ValueError, "empty"),
        ([good, torch.randn(3, 40, 64)], ValueError, r"images\[1\].*multiple of the patch size"),
        ([good, torch.randn(1, 32, 32)], ValueError, r"images\[1\].*3 channels"),
        ([good, good.double()], TypeError, r"images\[1\] is torch.float64"),
        ([good, torch.empty(3, 32, 32, device="meta")], ValueError, r"images\[1\] is on meta"),
        ([good, good[None]], ValueError, r"images\[1\].*drop the batch dimension"),
        ([good, torch.randn(3, 16, 64)], ValueError, r"images\[1\].*coarsest"),
    ]
    for images, error, message in cases:
        with pytest.raises(error, match=message):
            model(images)
    images = [good, torch.randn(3, 64, 64)]
    with pytest.raises(ValueError, match=r"mask has 1 entries for 2 images"):
        model(images, mask=[torch.ones(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"mask\[1\] must have shape \[4\]"):
        model(images, mask=[torch.ones(2, dtype=torch.bool), torch.ones(5, dtype=torch.bool)])
    with pytest.raises(TypeError, match=r"mask\[0\] must be a bool"):
        model(images, mask=[torch.ones(2), torch.ones(4, dtype=torch.bool)])
    with pytest.raises(TypeError, match="list of per-image bool masks"):
        model(images, mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"images\[0\]: budget must be between 0 and 2"):
        model(images, budget=3)  # an int budget is refused for an image with fewer regions
    with pytest.raises(ValueError, match=r"capacity 5 is too small.*image 1"):
        model(images, capacity=5)  # image 0 takes 3 rows at the least, image 1 5
    with pytest.raises(RuntimeError, match="exceed the static capacity"):
        model(images, capacity=8, mask=[torch.ones(2, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])


@needs_triton
def test_list_host_reads():
    """0 host reads with a budget or a capacity, 1 without (the layout's T and max_seqlen)."""
    model = msvit.from_timm(timm_model("vit"), kernels="reference", attention_backend="triton").eval()
    images = images_of(SIZES_16[1:4])
    with torch.no_grad():
        model(images, budget=0.5)  # compile (interpret) and build the layout once outside the count
        with count_host_reads() as reads:
            model(images, budget=0.5)
        assert reads.count == 0, reads.report()
        with count_host_reads() as reads:
            model(images, capacity=90)  # past the all-fine total (64 rows): padding sequences
        assert reads.count == 0, reads.report()
        with count_host_reads() as reads:
            model(images)
        assert reads.count == 1, reads.report()


@pytest.mark.parametrize("scales, sizes", [(2, [(32, 48), (24, 40), (16, 72)]), (3, [(32, 48), (40, 32), (48, 16)])])
def test_flat_pixel_gather_equals_the_per_image_patches(scales, sizes):
    """The flat-buffer gather (the pack kernel's backward and geometry) == patchify per image."""
    p, r, chans = 4, 2, 3
    images = images_of(sizes)
    batch = TreeBatch.of([(h // p, w // p) for h, w in sizes], r, scales)
    nodes = torch.arange(batch.scale_starts[-1])
    flat = torch.cat([image.reshape(-1) for image in images])
    expected = gather_patches_reference(images, nodes, p, r, scales)
    got = gather_flat_patches_reference(flat, batch.node_pixels(p, chans), nodes, p, chans, r ** (scales - 1))
    assert rel_err(got, expected) <= 1e-6


@needs_triton
@pytest.mark.parametrize("scales, sizes", [(2, [(32, 48), (24, 40), (16, 72)]), (3, [(32, 48), (40, 32), (48, 16)])])
def test_pack_kernel_on_a_list_equals_the_reference(scales, sizes):
    """One launch over the flat pixel buffer == pack_reference over the list, forward and backward,
    with a static shape's padding rows too."""
    p, r, chans, d = 4, 2, 3, 20
    images = images_of(sizes)
    batch = TreeBatch.of([(h // p, w // p) for h, w in sizes], r, scales)
    n = batch.scale_starts[-1]
    generator = torch.Generator().manual_seed(6)
    mask = torch.rand(sum(batch.decisions), generator=generator) < 0.5
    weight, bias, pos, prefix = (
        torch.randn(*s, generator=generator) for s in ((d, chans * p * p), (d,), (n, d), (1, d))
    )
    st = torch.rand(n, generator=generator)
    flat = torch.cat([image.reshape(-1) for image in images])
    for shape in (None, batch.static_shape(1, capacity=sum(1 + t.counts[0] for t in batch.trees) + 9)):
        index = batch_index(mask, batch, 1, shape)
        params = [t.clone().requires_grad_() for t in (weight, bias, pos, st, prefix)]
        expected = pack_reference(images, index, *params[:4], params[4], p, r, scales=scales)
        kernel_params = [t.clone().requires_grad_() for t in (weight, bias, pos, st, prefix)]
        got = gather_embed_pack(
            flat, index, *kernel_params, p, r, scales=scales, node_pixels=batch.node_pixels(p, chans)
        )
        real = torch.cat([index.rows, index.prefix_rows.flatten()])  # padding rows hold copies of a real token
        assert rel_err(got[real], expected[real]) <= 1e-5
        grad = torch.randn(expected.shape, generator=generator)
        for a, b in zip(torch.autograd.grad(expected, params, grad), torch.autograd.grad(got, kernel_params, grad)):
            assert rel_err(b, a) <= 1e-5


@needs_triton
def test_triton_kernels_on_a_list_equal_the_reference_model():
    model = converted("vit", scales=(16, 32, 64))
    images = images_of(SIZES_16_TREE[:3])
    with torch.no_grad():
        expected = model(images, budget=0.4)
        model.kernels = "triton"
        assert rel_err(model(images, budget=0.4), expected) <= TOL


def test_learned_gate_over_a_list_equals_each_images_gate():
    """One gather and one MLP for the list == the gate of each image; the per-image budget of
    ``list_budget_mask`` == ``budget_mask`` of each image (ties aside: continuous logits)."""
    model = converted("vit")
    images = images_of(SIZES_16)
    counts = model.batch_of(images).decisions
    with torch.no_grad():
        for budget in (None, 0.3, 2):
            decision = model.decide(images, budget=budget)
            for b, (image, logits, hard) in enumerate(
                zip(images, decision.logits.split(counts), decision.hard.split(counts))
            ):
                alone = model.gate.decide(image[None], sample=False, budget=budget)
                assert rel_err(logits, alone.logits[0]) <= TOL
                assert torch.equal(hard, alone.hard[0]), (budget, b)


def test_a_nan_image_in_a_list_changes_no_other_image():
    """The rule of tests/test_nan_containment.py for lists: each other image keeps its logits alone."""
    torch.manual_seed(0)
    vit = redraw_parameters(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval())
    model = msvit.from_timm(vit, gate="entropy").eval()
    images = [torch.rand(3, 64, 96), torch.rand(3, 96, 32), torch.rand(3, 32, 32)]
    images[1][:, 5, 7] = float("nan")
    with torch.no_grad():
        out = model(images)
        for b in (0, 2):
            torch.testing.assert_close(out[b], model(images[b][None])[0], rtol=1e-5, atol=1e-6)
    assert torch.isnan(out[1]).any()
