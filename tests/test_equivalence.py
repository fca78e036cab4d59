"""The equivalences docs/design.md section 2 pins down: all-fine = the timm ViT, all-coarse = the timm
ViT on the 2x average-pooled image, and packed = masked = trimmed for any mask.

Every model's parameters are re-drawn first (``redraw_parameters``): on timm's init (LayerScale
1e-5, unit norms, zero tokens) a wrong attention or norm moves the logits by less than 1e-4."""

import pytest
import timm
import torch
import torch.nn.functional as F

import msvit

from helpers import TINY, half_resolution_twin, redraw_parameters, rel_err, tiny_vit

VARIANTS = {
    "vit_cls": {},
    "no_cls_avg_pool": dict(class_token=False, global_pool="avg"),
    "layerscale_registers": dict(init_values=0.1, reg_tokens=2),
    "deit3_no_embed_class": dict(no_embed_class=True, init_values=1e-2),
    "qk_norm_avg_fc_norm": dict(qk_norm=True, global_pool="avg", fc_norm=True),
}


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_patch16_224"])
def test_all_fine_equals_timm_named_models(name):
    torch.manual_seed(0)
    vit = redraw_parameters(timm.create_model(name, pretrained=False, depth=3)).eval()
    model = msvit.from_timm(vit).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = vit(images)
        got = model(images, mask=torch.ones(2, 49, dtype=torch.bool))
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_fine_equals_timm_variants(variant):
    vit = redraw_parameters(tiny_vit(**VARIANTS[variant]))
    model = msvit.from_timm(vit).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        got = model(images, mask=torch.ones(3, 16, dtype=torch.bool))
        expected = vit(images)
    assert rel_err(got, expected) <= 1e-5


def test_all_fine_non_square_other_size_equals_timm_dynamic_size():
    """At a size the model was not built for, the fine position embedding is resampled the way
    timm's own dynamic_img_size does it."""
    vit = redraw_parameters(tiny_vit(dynamic_img_size=True))
    model = msvit.from_timm(vit).eval()
    images = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        got = model(images, mask=torch.ones(1, 6 * 10, dtype=torch.bool))
        expected = vit(images)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("variant", ["vit_cls", "no_cls_avg_pool", "deit3_no_embed_class"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_all_coarse_equals_timm_on_pooled_image(variant, size):
    kwargs = {**TINY, **VARIANTS[variant]}
    vit = redraw_parameters(tiny_vit(img_size=size, **VARIANTS[variant]))
    model = msvit.from_timm(vit).eval()
    twin = half_resolution_twin(vit, size, **kwargs)
    images = torch.randn(2, 3, *size)
    n_regions = (size[0] // 16) * (size[1] // 16)
    with torch.no_grad():
        got = model(images, mask=torch.zeros(2, n_regions, dtype=torch.bool))
        expected = twin(F.avg_pool2d(images, 2))
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_masked_trimmed_agree_on_random_masks(variant, batch):
    torch.manual_seed(batch)
    model = msvit.from_timm(redraw_parameters(tiny_vit(img_size=(64, 96), **VARIANTS[variant]))).eval()
    images = torch.randn(batch, 3, 64, 96)
    mask = torch.rand(batch, 24) < 0.4
    with torch.no_grad():
        packed = model(images, mask=mask)
        masked = model(images, mask=mask, mode="masked")
        trimmed = model(images, mask=mask, mode="trimmed")
    assert rel_err(masked, packed) <= 1e-5
    assert rel_err(trimmed, packed) <= 1e-5


def test_coarse_factor_three():
    """Any integer coarse/fine ratio: an all-coarse 24px model equals the ViT on 3x pooled images."""
    vit = redraw_parameters(tiny_vit(img_size=96))
    model = msvit.from_timm(vit, coarse_patch_size=24).eval()
    images = torch.randn(2, 3, 96, 96)
    mask = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        packed = model(images, mask=mask)
        masked = model(images, mask=mask, mode="masked")
        fine = model(images, mask=torch.ones(2, 16, dtype=torch.bool))
    assert rel_err(masked, packed) <= 1e-5
    assert rel_err(fine, vit(images)) <= 1e-5


def test_packed_token_counts_follow_the_mask():
    model = msvit.from_timm(redraw_parameters(tiny_vit())).eval()
    images = torch.randn(3, 3, 64, 64)
    mask = torch.tensor([[True] * 16, [False] * 16, [True, False] * 8])
    out = model(images, mask=mask, return_gate=True)
    assert out.tokens.tolist() == [1 + 64, 1 + 16, 1 + 8 + 8 * 4]
    assert model.tokens_per_image(mask).tolist() == out.tokens.tolist()
