"""Native resolution in the dense and analysis APIs (docs/native_resolution.md): ``unpack_to_grid``,
``MSSegmenter``, ``PrunedMSViT``, ``count_macs`` and a converted NaFlexViT take a list of images of
different sizes. Each image of a mixed list must give what it gives alone (float64 where the path
is pure torch), and a NaFlexViT, every region fine, what timm's NaFlexViT gives at that image's
size; parameters re-drawn. Sizes: 1:1, 1:2, 10:3 (border column), 1:5 and 3:5 (border row and
column) for a 16 px patch."""

import pytest
import timm
import torch
from test_native_resolution import SIZES_16, SIZES_16_TREE, TOL, converted, images_of, random_masks

import msvit

from helpers import needs_triton, redraw_parameters, rel_err

DIM = 48  # converted("vit")'s width


def double_model(**kwargs):
    return converted("vit", **kwargs).double()


def double_images(sizes=SIZES_16):
    return [image.double() for image in images_of(sizes)]


def test_unpack_to_grid_of_a_list_is_each_image_unpacked_alone():
    model = double_model()
    images = double_images()
    masks = random_masks(model, images)
    with torch.no_grad():
        unpacked = msvit.unpack_to_grid(model.forward_features(images, mask=masks))
        assert isinstance(unpacked.grid, list) and len(unpacked.grid) == len(images)
        assert unpacked.prefix.shape == (len(images), 1, DIM)
        for b, (image, mask) in enumerate(zip(images, masks)):
            alone = msvit.unpack_to_grid(model.forward_features(image[None], mask=mask[None]))
            h, w = SIZES_16[b][0] // 16, SIZES_16[b][1] // 16
            assert unpacked.grid[b].shape == (h, w, DIM)
            assert rel_err(unpacked.grid[b], alone.grid[0]) <= TOL, SIZES_16[b]
            assert rel_err(unpacked.prefix[b], alone.prefix[0]) <= TOL


def test_unpack_to_grid_of_a_list_with_three_scales():
    model = double_model(scales=(16, 32, 64))
    images = double_images(SIZES_16_TREE)
    masks = random_masks(model, images, seed=2)
    with torch.no_grad():
        grids = msvit.unpack_to_grid(model.forward_features(images, mask=masks)).grid
        for b, (image, mask) in enumerate(zip(images, masks)):
            alone = msvit.unpack_to_grid(model.forward_features(image[None], mask=mask[None])).grid[0]
            assert rel_err(grids[b], alone) <= TOL, SIZES_16_TREE[b]


@needs_triton
def test_triton_unpack_of_a_list_equals_the_reference_forward_and_backward():
    model = converted("vit")
    images = images_of(SIZES_16)
    with torch.no_grad():
        features = model.forward_features(images, mask=random_masks(model, images))
    weights = [torch.randn(h // 16, w // 16, DIM, generator=torch.Generator().manual_seed(b)) for b, (h, w) in
               enumerate(SIZES_16)]  # fmt: skip
    results = {}
    for backend in ("triton", "reference"):
        tokens = features.tokens.clone().requires_grad_(True)
        grids = msvit.unpack_to_grid(features._replace(tokens=tokens), backend=backend).grid
        sum((grid * weight).sum() for grid, weight in zip(grids, weights)).backward()
        results[backend] = grids, tokens.grad
    (grids, grad), (expected, expected_grad) = results["triton"], results["reference"]
    for got, want in zip(grids, expected):
        assert torch.equal(got, want)
    assert rel_err(grad, expected_grad) <= 1e-6


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_segmenter_on_a_list_gives_each_image_its_own_map(decoder):
    segmenter = msvit.MSSegmenter(converted("vit"), num_classes=3, decoder=decoder)
    redraw_parameters(segmenter.decoder, seed=3)
    segmenter = segmenter.double().eval()
    images = double_images()
    masks = random_masks(segmenter.backbone, images)
    with torch.no_grad():
        out = segmenter(images, return_gate=True)  # the frozen gate decides
        given = segmenter(images, mask=masks)
        budgeted = segmenter(images, budget=0.5)
        assert 0 < out.gate.hard.float().mean() < 1
        assert torch.equal(out.gate.hard, torch.cat(segmenter.backbone.gate_mask(images)))
        for b, image in enumerate(images):
            alone = segmenter(image[None], return_gate=True)
            assert out.logits[b].shape == (3, *SIZES_16[b])
            assert rel_err(out.logits[b], alone.logits[0]) <= TOL, SIZES_16[b]
            assert out.tokens[b] == alone.tokens[0]
            assert rel_err(given[b], segmenter(image[None], mask=masks[b][None])[0]) <= TOL
            assert rel_err(budgeted[b], segmenter(image[None], budget=0.5)[0]) <= TOL


def test_segmenter_with_a_trained_gate_on_a_list_reaches_every_images_gate():
    segmenter = msvit.MSSegmenter(converted("vit"), num_classes=3, freeze_gate=False).train()
    images = images_of(SIZES_16)
    out = segmenter(images, return_gate=True)
    loss = sum(part.square().mean() for part in out.logits)
    (grad,) = torch.autograd.grad(loss, out.gate.st)
    for b, part in enumerate(grad.split(segmenter.backbone.batch_of(images).decisions)):
        assert part.abs().sum() > 0, f"image {b}'s gate got no gradient"


def test_segmenter_refuses_a_bad_list_naming_the_image():
    segmenter = msvit.MSSegmenter(converted("vit"), num_classes=3).eval()
    with pytest.raises(ValueError, match=r"images\[1\].*multiple of the patch size"):
        segmenter([torch.randn(3, 32, 64), torch.randn(3, 40, 64)])
    with pytest.raises(ValueError, match=r"mask\[1\] must have shape \[4\]"):
        segmenter([torch.randn(3, 32, 64), torch.randn(3, 64, 64)], mask=[torch.ones(2, dtype=bool)] * 2)


def test_pruned_list_equals_each_image_pruned_alone():
    pruned = msvit.PrunedMSViT(double_model(), keep_ratio=0.6, layers=(0, 1))
    images = double_images()
    masks = random_masks(pruned.model, images)
    with torch.no_grad():
        for kwargs in ({}, {"mask": masks}, {"budget": 0.5}):
            out = pruned(images, return_gate=True, **kwargs)
            assert out.tokens.shape == (3, len(images))
            assert (out.tokens[-1] < out.tokens[0]).all()  # every image was pruned
            for b, image in enumerate(images):
                one = {k: (v[b][None] if k == "mask" else v) for k, v in kwargs.items()}
                alone = pruned(image[None], return_gate=True, **one)
                assert rel_err(out.logits[b : b + 1], alone.logits) <= TOL, (kwargs.keys(), SIZES_16[b])
                assert torch.equal(out.tokens[:, b], alone.tokens[:, 0])
        features = pruned.forward_features(images)
        assert features.fine_grid == tuple((h // 16, w // 16) for h, w in SIZES_16)


@pytest.mark.parametrize("scales", [(16, 32), (16, 32, 64)])
def test_count_macs_of_a_list_is_each_image_counted_alone(scales):
    model = converted("vit", scales=scales)
    sizes = SIZES_16 if len(scales) == 2 else SIZES_16_TREE
    images = images_of(sizes)
    masks = random_masks(model, images)
    gated = msvit.count_macs(model, images)
    given = msvit.count_macs(model, images, mask=masks, breakdown=True)
    assert gated.shape == (len(images),) and gated.dtype == torch.float64
    for b, image in enumerate(images):
        assert gated[b] == msvit.count_macs(model, image[None])[0], sizes[b]
        alone = msvit.count_macs(model, image[None], mask=masks[b][None], breakdown=True)
        assert given.keys() == alone.keys()
        for part in given:
            assert given[part][b] == alone[part][0], (part, sizes[b])
    assert len(set(gated.tolist())) == len(images)  # sizes of different costs
    with pytest.raises(ValueError, match=r"mask\[0\] must have shape"):
        msvit.count_macs(model, images, mask=[m[1:] for m in masks])


NAFLEX_VARIANTS = {
    "learned": {},  # 16x16 table, bicubic with antialias to each grid
    "factorized": dict(pos_embed="factorized"),
    "ar_preserving": dict(pos_embed_ar_preserving=True),
    "table_at_another_grid_bilinear": dict(pos_embed_grid_size=(5, 7), pos_embed_interp_mode="bilinear"),
}


@pytest.mark.parametrize("variant", list(NAFLEX_VARIANTS))
def test_naflexvit_on_a_list_equals_naflexvit_at_each_image_size(variant):
    torch.manual_seed(0)
    vit = timm.create_model(
        "naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=48, num_heads=3, num_classes=5,
        **NAFLEX_VARIANTS[variant],
    )  # fmt: skip
    vit = redraw_parameters(vit).eval()
    model = msvit.from_timm(vit, img_size=64, kernels="reference").eval()
    images = images_of(SIZES_16)
    fine = [torch.ones(d, dtype=torch.bool) for d in model.batch_of(images).decisions]
    masks = random_masks(model, images)
    with torch.no_grad():
        logits = model(images, mask=fine)
        mixed = model(images, mask=masks)
        for b, image in enumerate(images):
            expected = vit(image[None])
            assert rel_err(logits[b : b + 1], expected) <= TOL, SIZES_16[b]
            assert rel_err(mixed[b : b + 1], model(image[None], mask=masks[b][None])) <= TOL
            # a batch at a size other than img_size takes timm's resampling too
            batch = torch.stack([image, -image])
            assert rel_err(model(batch, mask=fine[b].expand(2, -1)), vit(batch)) <= TOL
        assert expected.std() > 0.1


def test_naflexvit_position_tables_train():
    vit = redraw_parameters(
        timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=48, num_heads=3)
    )
    model = msvit.from_timm(vit, img_size=64, kernels="reference").train()
    model(images_of(SIZES_16[:3])).square().mean().backward()
    table = model.tokenizer.grid_positions.pos_embed
    assert table.shape == vit.embeds.pos_embed.shape and table.grad.abs().sum() > 0


@pytest.mark.parametrize("scales", [None, (16, 32, 64)])
def test_zero_conv_aggregation_on_a_list_equals_each_image_alone(scales):
    """APT's aggregate="zero_conv" over a list: each image's coarse tokens add the term of their own
    sub-patches (every image's node terms from its own grid), so each image's logits equal it alone,
    and packed equals masked; the term is not zero (re-drawn weights), so dropping it would fail."""
    options = {"aggregate": "zero_conv", "gate": "entropy", **({"scales": scales} if scales else {})}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=5, dynamic_img_size=True)
    model = redraw_parameters(msvit.from_timm(vit, **options)).eval()
    g = torch.Generator().manual_seed(0)
    sizes = [(128, 64), (64, 192), (80, 112)] if scales else [(128, 96), (64, 192), (80, 112)]  # 112: border cells
    ims = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    with torch.no_grad():
        out = model(ims, budget=0.3, return_gate=True)
        for b, image in enumerate(ims):
            alone = model(image[None], budget=0.3, return_gate=True)
            assert rel_err(out.logits[b], alone.logits[0]) <= 1e-5 and out.tokens[b] == alone.tokens[0]
        masked = model(ims, budget=0.3, mode="masked")
        assert all(rel_err(a, p) <= 1e-5 for a, p in zip(masked, out.logits))
        bad = [image.clone() for image in ims]
        bad[1][:, 3, 3] = float("nan")  # one image's NaN stays in its own tokens
        nan_out = model(bad, budget=0.3)
        assert torch.equal(nan_out[0], out.logits[0]) and torch.equal(nan_out[2], out.logits[2])
        model.tokenizer.aggregation.linear.weight.zero_()
        assert rel_err(model(ims, budget=0.3), out.logits) > 1e-3
