"""SigLIP's ``map`` pooling (timm's AttentionPoolLatent) on packed tokens: one latent query per
image over that image's packed tokens (varlen attention with a separate key layout). All-fine
equals timm on re-drawn depth-reduced SigLIPs; packed = masked = trimmed on random masks."""

import pytest
import timm
import torch

import msvit
from msvit.models.attention_pool import PackedAttentionPool, convert_attention_pool

from helpers import check_random_masks, needs_triton, redraw_parameters, rel_err

SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)


def siglip(**overrides):
    """``vit_base_patch16_siglip_224`` (global_pool='map'), depth-reduced and narrowed, re-drawn."""
    vit = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **{**SMALL, **overrides}).eval()
    assert vit.global_pool == "map" and type(vit.attn_pool).__name__ == "AttentionPoolLatent"
    return redraw_parameters(vit)


ALL_FINE = torch.ones(3, 16, dtype=torch.bool)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(reg_tokens=2, pool_include_prefix=True), dict(class_token=True, reg_tokens=1)],
    ids=["siglip", "registers_in_pool", "cls_outside_pool"],
)
def test_all_fine_equals_timm(overrides):
    vit = siglip(**overrides)
    model = msvit.from_timm(vit).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = vit(images)
        assert rel_err(model(images, mask=ALL_FINE), expected) <= 1e-4
        pre = model.forward_head(model.forward_features(images, mask=ALL_FINE), pre_logits=True)
        assert rel_err(pre, vit.forward_head(vit.forward_features(images), pre_logits=True)) <= 1e-4
    assert expected.std() > 0.1  # the re-drawn weights make the logits depend on the tokens


def test_named_model_at_full_width_depth_one():
    vit = redraw_parameters(
        timm.create_model("vit_base_patch16_siglip_224", pretrained=False, depth=1, img_size=64).eval()
    )
    model = msvit.from_timm(vit).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(images, mask=torch.ones(2, 4, dtype=torch.bool)), vit(images)) <= 1e-4


@needs_triton
def test_all_fine_with_the_triton_attention_equals_timm():
    vit = siglip(depth=1)
    model = msvit.from_timm(vit, attention_backend="triton").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(images, mask=ALL_FINE[:2]), vit(images)) <= 1e-4


def test_random_masks_agree_across_modes_with_finite_gradients():
    check_random_masks(msvit.from_timm(siglip()).eval(), torch.randn(3, 3, 64, 64))


def test_latent_len_two_with_avg_pool_equals_timm():
    # timm builds AttentionPoolLatent with one latent; the module itself takes more (pool='avg')
    from timm.layers import AttentionPoolLatent

    pool = redraw_parameters(AttentionPoolLatent(48, num_heads=3, latent_len=2, pool_type="avg", qk_norm=True))
    ours = PackedAttentionPool(pool)
    tokens = torch.randn(3, 9, 48)
    index = type("Index", (), {})()
    index.cu_seqlens = torch.tensor([0, 9, 18, 27], dtype=torch.int32)
    index.rows, index.row_image = torch.arange(27), torch.arange(3).repeat_interleave(9)
    with torch.no_grad():
        expected = pool(tokens)
        assert rel_err(ours(tokens.flatten(0, 1), index, include_prefix=True), expected) <= 1e-5
        assert rel_err(ours.dense(tokens, torch.ones(3, 9)), expected) <= 1e-5


def test_unsupported_pools_are_refused_by_name():
    from timm.layers import AttentionPoolLatent

    with pytest.raises(NotImplementedError, match="pos_embed='abs'"):
        PackedAttentionPool(AttentionPoolLatent(48, num_heads=3, pos_embed="abs", feat_size=16))
    with pytest.raises(NotImplementedError, match="only global_pool='map'"):
        convert_attention_pool(torch.nn.Identity())
