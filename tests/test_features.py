"""Dense features: forward_features + unpack_to_grid against timm's own patch tokens."""

import torch
import torch.nn.functional as F

import msvit

from helpers import TINY, half_resolution_twin, rel_err, tiny_vit


def test_all_fine_grid_features_equal_timm_patch_tokens():
    vit = tiny_vit(img_size=(64, 96), reg_tokens=1)
    model = msvit.from_timm(vit).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(images, mask=torch.ones(2, 24, dtype=torch.bool))
        grid, prefix = msvit.unpack_to_grid(features)
        expected = vit.forward_features(images)
    assert grid.shape == (2, 8, 12, 48) and prefix.shape == (2, 2, 48)
    assert rel_err(grid.flatten(1, 2), expected[:, 2:]) <= 1e-5
    assert rel_err(prefix, expected[:, :2]) <= 1e-5


def test_all_coarse_grid_features_are_blockwise_constant_and_equal_half_resolution_timm():
    vit = tiny_vit()
    model = msvit.from_timm(vit).eval()
    twin = half_resolution_twin(vit, (64, 64), **TINY)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid, _ = msvit.unpack_to_grid(model.forward_features(images, mask=torch.zeros(2, 16, dtype=torch.bool)))
        expected = twin.forward_features(F.avg_pool2d(images, 2))[:, 1:].reshape(2, 4, 4, -1)
    blocks = grid.reshape(2, 4, 2, 4, 2, -1)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    assert rel_err(blocks[:, :, 0, :, 0], expected) <= 1e-5


def test_gradients_reach_the_backbone_through_the_unpack():
    model = msvit.from_timm(tiny_vit()).train()
    images = torch.randn(2, 3, 64, 64)
    grid, _ = msvit.unpack_to_grid(model.forward_features(images, mask=torch.rand(2, 16) < 0.5))
    grid.square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.tokenizer.embed.weight.grad.abs().sum() > 0
