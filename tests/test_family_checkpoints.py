"""Checkpoints of the families from_timm gained (SigLIP map pooling, distilled DeiT, NaFlexViT):
saved and loaded back by name (config.json rebuilds them with from_timm), same logits."""

import pytest
import torch

import msvit
from msvit.io.checkpoint import build_model, write_checkpoint

from helpers import redraw_parameters

FAMILIES = {
    "siglip_map": ("vit_base_patch16_siglip_224", dict(embed_dim=48, num_heads=3)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(embed_dim=48, num_heads=3)),
    "naflexvit": ("naflexvit_base_patch16_gap", dict(embed_dim=48, num_heads=3)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_round_trip(tmp_path, family):
    name, kwargs = FAMILIES[family]
    config = {"timm": {"name": name, "kwargs": dict(img_size=64, patch_size=8, depth=1, num_classes=5, **kwargs)}}
    model = redraw_parameters(build_model(config)).eval()
    write_checkpoint(tmp_path, model, config)
    loaded = msvit.load_checkpoint(tmp_path)
    images, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        assert torch.equal(loaded(images, mask=mask), model(images, mask=mask))
