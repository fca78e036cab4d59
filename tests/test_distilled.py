"""Distilled DeiT (timm's VisionTransformerDistilled): the dist token is the second prefix token,
the cls and dist heads are both used as timm uses them (eval and plain training: their mean;
distilled training: the pair). All-fine equals timm on re-drawn, depth-reduced models."""

import pytest
import timm
import torch

import msvit

from helpers import check_random_masks, redraw_parameters, rel_err

NAMES = [
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit_base_distilled_patch16_384",
]


def distilled(name="deit_tiny_distilled_patch16_224", **overrides):
    kwargs = {**dict(depth=1, img_size=64, num_classes=7), **overrides}
    deit = timm.create_model(name, pretrained=False, **kwargs).eval()
    assert type(deit).__name__ == "VisionTransformerDistilled"
    return redraw_parameters(deit)


@pytest.mark.parametrize("name", NAMES)
def test_all_fine_equals_timm(name):
    deit = distilled(name)
    model = msvit.from_timm(deit).eval()
    assert model.tokenizer.num_prefix == 2
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = deit(images)
        assert rel_err(model(images, mask=torch.ones(2, 4, dtype=torch.bool)), expected) <= 1e-4
        features = model.forward_features(images, mask=torch.ones(2, 4, dtype=torch.bool))
        pre = model.forward_head(features, pre_logits=True)
        assert rel_err(pre, deit.forward_head(deit.forward_features(images), pre_logits=True)) <= 1e-4
    assert expected.std() > 0.1
    # both heads matter: the cls head alone is not the answer
    assert rel_err(model.head(features.tokens[features.index.prefix_rows[:, 0]]), expected) > 1e-2


def test_training_modes_follow_timm():
    deit = distilled(depth=2, embed_dim=48, num_heads=3, patch_size=8)
    model = msvit.from_timm(deit)
    images, mask = torch.randn(3, 3, 64, 64), torch.ones(3, 16, dtype=torch.bool)
    deit.train(), model.train()
    with torch.no_grad():
        # plain training / fine-tuning: the mean of the two heads, as in eval
        assert rel_err(model(images, mask=mask), deit(images)) <= 1e-4
        deit.set_distilled_training(True)
        model.set_distilled_training(True)
        cls_logits, dist_logits = model(images, mask=mask)
        want_cls, want_dist = deit(images)
        assert rel_err(cls_logits, want_cls) <= 1e-4 and rel_err(dist_logits, want_dist) <= 1e-4
        model.eval(), deit.eval()
        assert rel_err(model(images, mask=mask), deit(images)) <= 1e-4  # eval: the mean again


def test_from_timm_keeps_the_distilled_training_switch():
    deit = distilled()
    deit.set_distilled_training(True)
    assert msvit.from_timm(deit).distilled_training


def test_random_masks_agree_across_modes_with_finite_gradients():
    model = msvit.from_timm(distilled(depth=2, embed_dim=48, num_heads=3, patch_size=8)).eval()
    check_random_masks(model, torch.randn(3, 3, 64, 64))
    assert model.head_dist.weight.grad is not None and torch.isfinite(model.head_dist.weight.grad).all()


def test_head_dist_needs_token_pooling_and_two_prefix_tokens():
    model = msvit.from_timm(distilled())
    with pytest.raises(ValueError, match="head_dist .* needs global_pool='token' and the cls and dist"):
        msvit.MSViT(
            model.tokenizer, model.gate, model.blocks, model.norm, model.head, global_pool="avg",
            head_dist=model.head_dist,
        )  # fmt: skip
