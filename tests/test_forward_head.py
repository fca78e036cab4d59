"""timm's split of the forward pass: forward_head(forward_features(x)) is forward(x), for both
poolings, against the independent dense path and against timm itself. Parameters are re-drawn
first: timm's default init (LayerScale 1e-5, zero prefix tokens, zero head bias) makes features
nearly independent of the tokens, which hides a pooling or normalisation mismatch."""

import pytest
import torch

import msvit

from helpers import redraw_parameters, rel_err, tiny_vit

POOLS = {
    "token": dict(reg_tokens=1, init_values=1e-5),
    "avg": dict(global_pool="avg", class_token=False, init_values=1e-5),
    "avg-with-prefix": dict(global_pool="avg", reg_tokens=2, fc_norm=True),
}


def redrawn_vit(**overrides):
    return redraw_parameters(tiny_vit(**overrides))


@pytest.fixture(scope="module", params=list(POOLS))
def pair(request):
    vit = redrawn_vit(**POOLS[request.param])
    return vit, msvit.from_timm(vit).eval()


def test_forward_head_of_forward_features_is_forward(pair):
    _, model = pair
    images, mask = torch.randn(3, 3, 64, 64), torch.rand(3, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        logits = model(images, mask=mask)
        split = model.forward_head(model.forward_features(images, mask=mask))
        dense = model(images, mask=mask, mode="masked")
    assert torch.equal(split, logits)
    assert logits.std() > 0.1  # the re-drawn weights make the logits depend on the tokens
    assert rel_err(split, dense) <= 1e-4  # the dense path pools on its own; both must agree


def test_pre_logits_are_the_classifier_input_and_match_timm(pair):
    vit, model = pair
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(images, mask=torch.ones(2, 16, dtype=torch.bool))  # all fine = the ViT
        pre = model.forward_head(features, pre_logits=True)
        expected = vit.forward_head(vit.forward_features(images), pre_logits=True)
        assert pre.shape == (2, 48)
        assert rel_err(pre, expected) <= 1e-4
        assert torch.equal(model.head(pre), model.forward_head(features))


def test_pruned_model_splits_the_same_way():
    model = msvit.from_timm(redrawn_vit(depth=3)).eval()
    pruned = msvit.PrunedMSViT(model, keep_ratio=0.5, layers=(0, 1))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = pruned.forward_features(images)
        assert torch.equal(pruned.forward_head(features), pruned(images))
        assert features.tokens.shape[0] < model.forward_features(images).tokens.shape[0]


def test_forward_head_refuses_a_tensor():
    model = msvit.from_timm(tiny_vit()).eval()
    with pytest.raises(TypeError, match="PackedFeatures of forward_features"):
        model.forward_head(torch.randn(2, 17, 48))
