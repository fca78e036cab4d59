"""msvit train end to end on CPU: a short run learns, DDP with gloo runs, checkpoints round-trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msvit
from msvit.io.checkpoint import build_model, load_checkpoint, load_weights, resolve, write_checkpoint
from msvit.train import parse_args, train

from helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def small_run(out, *extra, gate=("--gate-hidden", "16")):
    """The flags of a tiny run (seconds on CPU) into ``out``; ``gate``: the flags of its gate."""
    return parse_args(
        [
            *"--train-size 256 --val-size 64 --batch-size 32 --image-size 32 --model-kwargs".split(),
            TINY_MODEL,
            *"--coarse-patch 16 --out".split(),
            str(out),
            *gate,
            *extra,
        ]
    )


def test_short_training_run_learns_and_moves_the_gate(tmp_path):
    """Task loss falls and the fine rate moves from all-fine toward g*; metrics and checkpoint written."""
    args = small_run(
        tmp_path,
        *"--epochs 4 --lr 2e-3 --gate-lr 0.05 --gate-target 0.25 --gate-loss l0".split(),
        *"--warmup-epochs 0.5 --gate-warmup-epochs 0.5".split(),
    )
    train(args)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert rows[-1]["train_task"] < rows[0]["train_task"]
    assert rows[-1]["train_fine"] < rows[0]["train_fine"] - 0.05
    assert 0 < rows[0]["wall_seconds"] < rows[-1]["wall_seconds"]  # the whole run's clock, for the time budget
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,")
    model = msvit.load_checkpoint(tmp_path)
    config = model.pretrained_cfg["config"]
    assert config["timm"]["kwargs"]["num_classes"] == 10 and isinstance(model, msvit.MSViT)


@pytest.mark.parametrize("loss", ["gbas", "bas"])
def test_batch_shaping_losses_train(tmp_path, loss):
    train(small_run(tmp_path, "--epochs", "1", "--gate-loss", loss, "--max-steps", "3"))
    assert (resolve(tmp_path) / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["trimmed", "masked"])
def test_baseline_modes_train(tmp_path, mode):
    metrics = train(small_run(tmp_path, "--epochs", "1", "--mode", mode, "--max-steps", "2"))
    assert metrics["step"] == 2


def test_gate_mode_epochs_switch_back_to_the_training_mode(tmp_path):
    """Random masks first, then --gate-mode for --gate-mode-epochs, then --mode again."""
    train(
        small_run(
            tmp_path,
            *"--epochs 4 --gate-start-epoch 1 --gate-mode masked --gate-mode-epochs 2 --train-size 64".split(),
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["gate_trains"]) for r in rows] == [
        ("packed", False),
        ("masked", True),
        ("masked", True),
        ("packed", True),
    ]


def test_gate_loss_on_probabilities_trains_the_gate(tmp_path):
    metrics = train(
        small_run(
            tmp_path, "--epochs", "1", "--gate-loss", "l0-two-sided", "--gate-loss-input", "probs", "--max-steps", "3"
        )
    )
    assert metrics["train_gate"] > 0  # all-fine start vs g* 0.25: the pinned rate is off target


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    config = {
        "timm": {
            "name": "vit_tiny_patch16_224",
            "kwargs": {**json.loads(TINY_MODEL), "img_size": 32, "num_classes": 10},
        },
        "msvit": {"coarse_patch_size": 16, "hidden": 16},
    }
    model = build_model(config).eval()
    write_checkpoint(tmp_path, model, config)
    loaded = load_checkpoint(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_loading_into_a_mismatched_config_fails_clearly(tmp_path):
    config = {
        "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 32}},
        "msvit": {"hidden": 16},
    }
    write_checkpoint(tmp_path, build_model(config), config)
    other = build_model({**config, "msvit": {"hidden": 24}})
    with pytest.raises(ValueError, match="does not match this model's configuration.*gate"):
        load_weights(other, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("task", [[], ["--task", "segmentation", "--no-freeze-gate"]], ids=["classify", "segment"])
def test_two_process_gloo_ddp_run_and_resume(tmp_path, task):
    """torchrun with two CPU processes (gloo): rank 0 writes the checkpoint, both resume from it."""
    command = [
        sys.executable,
        *"-m torch.distributed.run --standalone --nproc-per-node 2 -m msvit train".split(),
        *task,
        *"--train-size 64 --val-size 32 --batch-size 16 --image-size 32 --model-kwargs".split(),
        TINY_MODEL,
        *"--coarse-patch 16 --gate-hidden 16 --gate-loss gbas --out".split(),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        result = subprocess.run(command + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (2, 4)]  # 64 images / 2 ranks / 16 per batch
    (msvit.load_segmenter if task else load_checkpoint)(tmp_path)


def test_cli_help_lists_train(capsys):
    from msvit.cli import main

    main([])
    assert "train" in capsys.readouterr().out
