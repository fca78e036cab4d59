"""Every bad input to the model raises a ValueError/TypeError that says what was expected."""

import pytest
import torch
from torch import nn

import msvit

from helpers import tiny_vit


@pytest.fixture(scope="module")
def model():
    return msvit.from_timm(tiny_vit()).eval()


@pytest.mark.parametrize(
    "images,error,match",
    [
        (torch.randn(1, 3, 64, 70), ValueError, "multiple of the patch size 8"),
        (torch.randn(1, 3, 36, 64), ValueError, "multiple of the patch size 8"),
        (torch.randn(1, 1, 64, 64), ValueError, "3 channels"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError, "float tensor"),
        (torch.randn(3, 64, 64), ValueError, "missing batch dimension"),
        (torch.randn(64, 64), ValueError, r"\[B, 3, H, W\]"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(model, images, error, match):
    with pytest.raises(error, match=match):
        model(images)
    with pytest.raises(error, match=match):
        model.gate_mask(images)


@pytest.mark.parametrize(
    "mask,error,match",
    [
        (torch.ones(2, 15, dtype=torch.bool), ValueError, r"\[B, Nc\] = \[2, 16\]"),
        (torch.ones(1, 16, dtype=torch.bool), ValueError, r"\[B, Nc\] = \[2, 16\]"),
        (torch.ones(2, 4, 4, dtype=torch.bool), ValueError, r"\[B, Nc\]"),
        (torch.ones(2, 16), TypeError, "must be bool"),
        ([[True] * 16] * 2, TypeError, "bool torch.Tensor"),
    ],
)
def test_bad_masks(model, mask, error, match):
    with pytest.raises(error, match=match):
        model(torch.randn(2, 3, 64, 64), mask=mask)


def test_mask_and_budget_together_are_refused(model):
    """The mask fixes every decision: a budget beside it was silently ignored before."""
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    for call in (
        lambda: model(images, mask=mask, budget=3),
        lambda: model(images, mask=mask, budget=0.5, mode="masked"),
        lambda: model.forward_features(images, mask=mask, budget=3),
        lambda: model([images[0], images[1]], mask=[mask[0], mask[1]], budget=3),
    ):
        with pytest.raises(ValueError, match="pass mask or budget, not both"):
            call()
    segmenter = msvit.MSSegmenter(model, num_classes=3)
    with pytest.raises(ValueError, match="pass mask or budget, not both"):
        segmenter(images, mask=mask, budget=3)


def test_tokens_per_image_checks_the_mask_against_the_coarse_grid(model):
    """A mask of another region count used to give numbers. Without images the grid is the one of
    the size the model was built for (64 px: 4x4); with images, theirs."""
    with pytest.raises(ValueError, match=r"\[B, Nc\] = \[2, 16\] \(one entry per coarse region of the 4x4"):
        model.tokens_per_image(torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        model.tokens_per_image(torch.ones(2, 16))
    assert model.tokens_per_image(torch.ones(2, 16, dtype=torch.bool)).tolist() == [65, 65]
    wide = torch.randn(2, 3, 64, 128)  # 4x8 regions
    assert model.tokens_per_image(torch.zeros(2, 32, dtype=torch.bool), images=wide).tolist() == [33, 33]
    with pytest.raises(ValueError, match=r"= \[2, 32\] .* 4x8 coarse grid"):
        model.tokens_per_image(torch.zeros(2, 16, dtype=torch.bool), images=wide)


def test_unknown_mode_and_kernels(model):
    with pytest.raises(ValueError, match="unknown mode 'dense'"):
        model(torch.randn(1, 3, 64, 64), mode="dense")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        msvit.from_timm(tiny_vit(), kernels="cuda")
    with pytest.raises(ValueError, match="unknown packed-attention backend"):
        msvit.from_timm(tiny_vit(), attention_backend="nope")(torch.randn(1, 3, 64, 64))


def test_bad_coarse_patch_and_models():
    with pytest.raises(ValueError, match="integer multiple of the patch size 8"):
        msvit.from_timm(tiny_vit(), coarse_patch_size=12)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        msvit.from_timm(nn.Linear(3, 3))
    with pytest.raises(NotImplementedError, match="global_pool"):
        msvit.from_timm(tiny_vit(global_pool="prr"))


def test_from_timm_refuses_another_family_by_name_before_passing_it_vit_kwargs():
    """resnet18 with patch_size/img_size used to fail inside timm ("unexpected keyword argument")."""
    with pytest.raises(TypeError, match="'resnet18' is a timm resnet model"):
        msvit.from_timm("resnet18", timm_kwargs={"patch_size": 8, "img_size": 32, "pretrained": False})


def test_from_timm_by_name_builds_without_downloading():
    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(num_classes=5, img_size=64))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_from_timm_copies_weights():
    vit = tiny_vit()
    model = msvit.from_timm(vit)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
