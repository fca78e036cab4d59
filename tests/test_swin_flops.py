"""count_macs of a mixed-scale Swin against torch's FlopCounterMode: all fine = timm's Swin, any
mask = what the packed forward runs, and the count falls with the fraction of coarse regions."""

import pytest
import torch

import msvit

from helpers import counted_macs, tiny_swin


@pytest.fixture(scope="module")
def pair():
    swin = tiny_swin()
    return swin, msvit.from_timm(swin).eval()


def test_all_fine_matches_timm_swin(pair):
    swin, model = pair
    images = torch.randn(1, 3, 224, 224)
    ours = msvit.count_macs(model, images, mask=torch.ones(1, 49, dtype=torch.bool), include_gate=False)
    assert ours.item() == pytest.approx(counted_macs(swin, images), rel=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.8])
def test_random_masks_match_the_packed_forward(pair, rate):
    _, model = pair
    mask = torch.rand(1, 49, generator=torch.Generator().manual_seed(int(rate * 10))) < rate
    images = torch.randn(1, 3, 224, 224)
    counted = counted_macs(lambda x: model(x, mask=mask), images) + 49 * model.gate.macs_per_region()
    assert msvit.count_macs(model, images, mask=mask).item() == pytest.approx(counted, rel=1e-6)


def test_macs_fall_with_the_fraction_of_coarse_regions(pair):
    swin, model = pair
    order = torch.randperm(49, generator=torch.Generator().manual_seed(0))
    masks = torch.stack([torch.isin(torch.arange(49), order[:k]) for k in (49, 37, 25, 12, 0)])
    macs = msvit.count_macs(model, mask=masks, include_gate=False)
    assert (macs[1:] < macs[:-1]).all()  # fewer fine regions, fewer MACs
    timm_macs = counted_macs(swin, torch.randn(1, 3, 224, 224))
    assert macs[0].item() == pytest.approx(timm_macs, rel=1e-6)
    assert macs[2].item() < 0.75 * timm_macs  # ~half the regions coarse


def test_breakdown_parts_add_up(pair):
    _, model = pair
    parts = msvit.count_macs(model, mask=torch.rand(2, 49) < 0.5, breakdown=True)
    assert set(parts) == {"embed", "gate", "fine_stages", "dense_stages", "head", "total"}
    assert torch.allclose(sum(v for k, v in parts.items() if k != "total"), parts["total"])
