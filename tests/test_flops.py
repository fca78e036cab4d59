"""count_macs against torch's FlopCounterMode on timm models, and against its own formula."""

import pytest
import timm
import torch

import msvit
from msvit.models.flops import count_macs

from helpers import counted_macs


@pytest.fixture(scope="module")
def vit_s():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def test_all_fine_vit_s_matches_flop_counter_and_is_4_6_gmacs(vit_s):
    model = msvit.from_timm(vit_s).eval()
    images = torch.randn(1, 3, 224, 224)
    ours = count_macs(model, images, mask=torch.ones(1, 49, dtype=torch.bool))
    reference = counted_macs(vit_s, images)
    assert abs(ours.item() / reference - 1) < 0.01
    assert round(ours.item() / 1e9, 1) == 4.6
    without_gate = count_macs(model, images, mask=torch.ones(1, 49, dtype=torch.bool), include_gate=False)
    assert abs(without_gate.item() / reference - 1) < 1e-3  # the gate is the only difference


def test_deit_tiny_all_fine_matches_flop_counter():
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    model = msvit.from_timm(deit).eval()
    images = torch.randn(1, 3, 224, 224)
    ours = count_macs(model, mask=torch.ones(1, 49, dtype=torch.bool), include_gate=False)
    assert abs(ours.item() / counted_macs(deit, images) - 1) < 1e-3


def test_random_mask_matches_the_formula(vit_s):
    model = msvit.from_timm(vit_s).eval()
    mask = torch.rand(3, 49) < 0.4
    n = 1 + 49 + 3 * mask.sum(1).double()
    trunk = 21_233_664 * n + 9_216 * n**2  # docs/design.md section 7
    embed = (n - 1) * 768 * 384
    head = 384 * 1000
    gate = 49 * model.gate.macs_per_region()
    assert torch.allclose(count_macs(model, mask=mask), trunk + embed + head + gate)


def test_all_coarse_vit_s_equals_vit_s_at_112_plus_gate(vit_s):
    model = msvit.from_timm(vit_s).eval()
    vit112 = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=112).eval()
    coarse = count_macs(model, mask=torch.zeros(1, 49, dtype=torch.bool))
    reference = counted_macs(vit112, torch.randn(1, 3, 112, 112))
    gate = 49 * model.gate.macs_per_region()
    assert abs((coarse.item() - gate) / reference - 1) < 1e-3


def test_gate_share_is_reported(vit_s):
    parts = count_macs(msvit.from_timm(vit_s), mask=torch.ones(2, 49, dtype=torch.bool), breakdown=True)
    share = (parts["gate"] / parts["total"])[0].item()
    assert 0.003 < share < 0.004  # 0.017 of 4.6 GMACs


def test_count_macs_needs_images_or_mask(vit_s):
    with pytest.raises(ValueError, match="images"):
        count_macs(msvit.from_timm(vit_s))
