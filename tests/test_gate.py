"""The gate: initial state, Gumbel-Sigmoid straight-through, gradients in training, eval determinism,
token budget, and its cost."""

import pytest
import torch

import msvit
from msvit.models.gate import MixedScaleGate, budget_mask, gumbel_sigmoid

from helpers import tiny_vit


def test_gate_starts_all_fine():
    model = msvit.from_timm(tiny_vit()).eval()
    assert model.gate_mask(torch.randn(4, 3, 64, 64)).all()


def test_gumbel_sigmoid_straight_through_is_exactly_hard():
    logits = torch.randn(5, 11, requires_grad=True)
    noise = torch.randn(5, 11)
    soft, hard, st = gumbel_sigmoid(logits, 0.3, noise)
    assert torch.equal(st.detach(), hard.float())
    weights = torch.arange(11.0)
    through_st = torch.autograd.grad((st * weights).sum(), logits, retain_graph=True)[0]
    through_soft = torch.autograd.grad((soft * weights).sum(), logits)[0]
    assert torch.equal(through_st, through_soft) and through_st.abs().sum() > 0


def test_gumbel_sigmoid_matches_its_probability():
    """P(fine) of a Gumbel-Sigmoid sample is sigmoid(logit) whatever the temperature."""
    torch.manual_seed(0)
    logits = torch.full((200_000,), 0.7)
    _, hard, _ = gumbel_sigmoid(logits, 0.3)
    assert abs(hard.float().mean().item() - torch.sigmoid(torch.tensor(0.7)).item()) < 0.01


@pytest.mark.parametrize("mode", ["packed", "masked", "trimmed"])
def test_gate_receives_gradients_in_training(mode):
    torch.manual_seed(0)
    model = msvit.from_timm(tiny_vit(), init_logit=0.0).train()
    images = torch.randn(4, 3, 64, 64)
    out = model(images, mode=mode, return_gate=True)
    assert out.gate.soft is not None and not out.gate.hard.all() and out.gate.hard.any()
    out.logits.square().sum().backward()
    for name, p in model.gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_packed_tokens_carry_the_straight_through_values():
    """Packed tokens are multiplied by st (fine) or 1 - st (coarse): 1 in value, a path to the gate."""
    torch.manual_seed(0)
    model = msvit.from_timm(tiny_vit(), init_logit=0.0).train()
    images = torch.randn(2, 3, 64, 64)
    decision = model.gate.decide(images, sample=True)
    x, index = model.tokenizer.pack(images, decision.hard, decision.st)
    plain, _ = model.tokenizer.pack(images, decision.hard, decision.st.detach())
    assert torch.equal(x, plain) and x.requires_grad
    assert index.total == int(model.tokens_per_image(decision.hard).sum())
    grad = torch.autograd.grad(x.sum(), decision.soft)[0]
    assert grad.abs().sum() > 0


def test_eval_decisions_are_deterministic():
    torch.manual_seed(0)
    model = msvit.from_timm(tiny_vit(), init_logit=0.0).eval()
    images = torch.randn(3, 3, 64, 64)
    first = model.gate_mask(images)
    assert torch.equal(first, model.gate_mask(images))
    assert torch.equal(first, model.gate(images) > 0)
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
        assert torch.allclose(model(images), model(images, mask=first))


def test_gate_mask_has_eval_semantics_in_train_mode():
    model = msvit.from_timm(tiny_vit(), init_logit=0.0).train()
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.gate_mask(images), model.gate_mask(images))


@pytest.mark.parametrize("budget,expected", [(0, 0), (5, 5), (16, 16), (0.25, 4), (1.0, 16)])
def test_budget_keeps_top_k_regions_fine(budget, expected):
    model = msvit.from_timm(tiny_vit(), init_logit=0.0).eval()
    images = torch.randn(3, 3, 64, 64)
    mask = model.gate_mask(images, budget=budget)
    assert mask.sum(1).tolist() == [expected] * 3
    logits = model.gate(images)
    if 0 < expected < 16:  # the kept regions are the highest-scoring ones
        assert (logits[mask].view(3, -1).min(1).values >= logits[~mask].view(3, -1).max(1).values).all()
    with torch.no_grad():
        out = model(images, budget=budget, return_gate=True)
    assert out.tokens.tolist() == [1 + 16 + 3 * expected] * 3


@pytest.mark.parametrize("budget", [-1, 17, 1.5, "half", True])
def test_bad_budget_raises(budget):
    with pytest.raises((ValueError, TypeError), match="budget"):
        budget_mask(torch.randn(2, 16), budget)


def test_gate_cost_for_vit_s_224_is_about_0_017_gmacs():
    gate = MixedScaleGate(region_size=32, grid=(7, 7))
    gmacs = 49 * gate.macs_per_region() / 1e9
    assert abs(gmacs - 0.017) < 0.0005, gmacs


def test_gate_position_embedding_resamples_to_other_grids():
    gate = MixedScaleGate(region_size=16, grid=(4, 4), hidden=8)
    assert gate(torch.randn(2, 3, 96, 160)).shape == (2, 6 * 10)
