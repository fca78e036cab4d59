"""timm's NaFlexVit through from_timm: the (ph, pw, C) linear patch embedding becomes MSViT's
(C, p, p) one and the position embedding is timm's own resampling, evaluated once for the image
size. All-fine equals NaFlexViT's own output on the same fixed-size images (re-drawn parameters)."""

import pytest
import timm
import torch

import msvit

from helpers import check_random_masks, redraw_parameters, rel_err

SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
ALL_FINE = torch.ones(3, 16, dtype=torch.bool)


def naflex(**overrides):
    vit = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, **{**SMALL, **overrides}).eval()
    assert type(vit).__name__ == "NaFlexVit"
    return redraw_parameters(vit)


VARIANTS = {
    "gap_regs": {},  # 4 registers, avg pool, fc_norm, LayerScale; 16x16 table resampled (bicubic) to 8x8
    "table_at_image_grid": dict(pos_embed_grid_size=(8, 8)),
    "factorized_pos": dict(pos_embed="factorized"),
    "channels_first_patches": dict(patchify_channels_last=False),
    "conv_embed": dict(embed_proj_type="conv"),
    "map_pool": dict(global_pool="map"),
    "cls_token_pre_norm": dict(class_token=True, global_pool="token", pre_norm=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_fine_equals_naflexvit(variant):
    vit = naflex(**VARIANTS[variant])
    model = msvit.from_timm(vit, img_size=64).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = vit(images)
        assert rel_err(model(images, mask=ALL_FINE), expected) <= 1e-4
    assert expected.std() > 0.1


def test_named_model_by_name_takes_img_size_from_timm_kwargs():
    kwargs = dict(img_size=64, depth=1, num_classes=5)
    model = msvit.from_timm("naflexvit_base_patch16_gap", timm_kwargs=kwargs).eval()
    assert model.tokenizer.grid == (4, 4) and model.pretrained_cfg["input_size"] == (3, 64, 64)
    torch.manual_seed(0)
    vit = redraw_parameters(timm.create_model("naflexvit_base_patch16_gap", **kwargs).eval())
    model = msvit.from_timm(vit, img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(images, mask=torch.ones(2, 4, dtype=torch.bool)), vit(images)) <= 1e-4


def test_non_square_image_size():
    vit = naflex()
    model = msvit.from_timm(vit, img_size=(48, 80)).eval()
    images = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        got = model(images, mask=torch.ones(2, 15, dtype=torch.bool))
        assert rel_err(got, vit(images)) <= 1e-4


def test_random_masks_agree_across_modes_with_finite_gradients():
    check_random_masks(msvit.from_timm(naflex(), img_size=64).eval(), torch.randn(3, 3, 64, 64))


def test_unsupported_naflex_options_are_refused_by_name():
    vit = naflex()
    vit.embeds.norm_input = torch.nn.LayerNorm(3 * 8 * 8)  # NaFlexVit's cfg does not pass input_norm_layer on
    with pytest.raises(NotImplementedError, match="input_norm_layer"):
        msvit.from_timm(vit, img_size=64)
    with pytest.raises(NotImplementedError, match="rotary"):
        msvit.from_timm(naflex(rope_type="axial"), img_size=64)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        msvit.from_timm(naflex(), img_size=60)
    with pytest.raises(ValueError, match="img_size applies to a NaFlexVit only"):
        msvit.from_timm(timm.create_model("vit_tiny_patch16_224", depth=1), img_size=64)
