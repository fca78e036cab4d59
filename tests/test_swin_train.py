"""msvit train with a mixed-scale Swin backbone (--model names a timm Swin): it trains, the gate
moves, evaluation counts the Swin's MACs, and the checkpoint reloads as the same model."""

import json

import pytest
import torch

import msvit
from msvit.models.swin import MixedScaleSwin
from msvit.train import parse_args, train

# A 3-stage Swin at 64px: token scales 4, 8, 16; coarse regions of 16px join at the last stage.
TINY_SWIN_MODEL = json.dumps({"embed_dim": 16, "depths": [2, 2, 1], "num_heads": [1, 2, 2], "window_size": 4})


def test_swin_trains_moves_the_gate_and_reloads(tmp_path):
    args = parse_args(
        [
            *"--model swin_tiny_patch4_window7_224 --model-kwargs".split(),
            TINY_SWIN_MODEL,
            *"--image-size 64 --coarse-patch 16 --gate-hidden 16 --train-size 128 --val-size 32".split(),
            *"--batch-size 32 --epochs 3 --lr 2e-3 --gate-lr 0.05 --gate-target 0.25 --gate-loss l0".split(),
            *"--warmup-epochs 0.5 --gate-warmup-epochs 0.5 --out".split(),
            str(tmp_path),
        ]
    )
    train(args)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[-1]["train_fine"] < rows[0]["train_fine"] - 0.05  # the gate learns toward g*
    assert rows[-1]["train_tokens"] < rows[0]["train_tokens"]
    assert 0 < rows[-1]["val_gmacs_per_image"] < 0.02
    model = msvit.load_checkpoint(tmp_path)
    assert isinstance(model, MixedScaleSwin) and model.entry == 2 and model.num_classes == 10
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fine = torch.ones(2, 16, dtype=torch.bool)
        assert torch.allclose(model(images, mask=fine), model(images, mask=fine, mode="masked"), atol=1e-5)


def test_swin_refuses_trimmed_mode():
    kwargs = {**json.loads(TINY_SWIN_MODEL), "img_size": 64}
    model = msvit.from_timm("swin_tiny_patch4_window7_224", timm_kwargs=kwargs)
    with pytest.raises(ValueError, match="unknown mode 'trimmed'"):
        model(torch.randn(1, 3, 64, 64), mode="trimmed")
