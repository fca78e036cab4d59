"""msvit train with native-resolution batches (--max-tokens-per-batch): images of their own sizes in
lists under a token budget, the gate trained on them, metrics, checkpoints and an exact resume."""

import json

import pytest
import torch
from test_train import small_run

from msvit.io.checkpoint import load_checkpoint
from msvit.train import parse_args, train

NATIVE = (
    "--max-tokens-per-batch",
    "40",
    "--digit-scale",
    "0.4",
    "0.6",
    "--aspect-ratios",
    "0.5",
    "1",
    "2",
    "--gate-loss",
    "l0-two-sided",
)


def native_run(out, *extra):
    return small_run(
        out,
        *"--train-size 32 --val-size 8 --gate-start-epoch 1 --warmup-epochs 0.5 --device cpu".split(),
        *NATIVE,
        *extra,
    )


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_native_run_trains_on_lists_of_sizes_and_resumes_exactly(tmp_path):
    train(native_run(tmp_path / "straight", "--epochs", "2"))
    straight = rows(tmp_path / "straight")
    assert [r["epoch"] for r in straight] == [1, 2]
    assert straight[-1]["train_gate"] > 0 and 0 < straight[-1]["val_tokens_per_image"] <= 1 + 4 * 4
    steps = straight[0]["step"]
    train(native_run(tmp_path / "resumed", "--epochs", "2", "--max-steps", str(steps)))
    train(native_run(tmp_path / "resumed", "--epochs", "2", "--resume"))
    a, b = load_checkpoint(tmp_path / "straight").state_dict(), load_checkpoint(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = load_checkpoint(tmp_path / "straight")
    images = [torch.rand(3, 48, 16), torch.rand(3, 32, 32)]  # 1:3 and 1:1: its own sizes, one forward
    with torch.no_grad():
        assert model(images).shape == (2, 10)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--gate-loss", "gbas"), "does not take --gate-loss gbas"),
        (("--crop", "light", "--gate-loss", "l0"), "does not take --crop light"),
        (("--task", "segmentation", "--gate-loss", "l0"), "segmentation"),
    ],
)
def test_native_batches_refuse_what_they_cannot_take(tmp_path, capsys, extra, message):
    flags = ["--max-tokens-per-batch", "100", "--out", str(tmp_path), *extra]
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_aspect_ratios_need_native_batches(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--aspect-ratios", "0.5", "2"])
    assert "add --max-tokens-per-batch" in capsys.readouterr().err


def test_init_from_starts_a_native_run_from_a_square_checkpoint(tmp_path):
    """--init-from: every weight of a saved run (gate included) is the new run's start; a model the
    flags build differently is refused naming the first tensor that does not fit."""
    from msvit.io.checkpoint import build_model
    from msvit.train.backbone import init_from

    train(small_run(tmp_path / "square", *"--train-size 32 --val-size 8 --epochs 1 --device cpu".split()))
    square = load_checkpoint(tmp_path / "square")
    fresh = build_model(square.pretrained_cfg["config"])
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), square.state_dict().values()))
    started = init_from(fresh, str(tmp_path / "square")).state_dict()
    assert all(torch.equal(v, started[k]) for k, v in square.state_dict().items())
    args = native_run(tmp_path / "native", "--epochs", "1", "--max-steps", "1", "--init-from", str(tmp_path / "square"))
    train(args)  # a native-resolution run takes the square run's weights
    assert rows(tmp_path / "native")[0]["step"] == 1
    wrong = small_run(tmp_path / "wrong", "--init-from", str(tmp_path / "square"), gate=("--gate-hidden", "8"))
    with pytest.raises(SystemExit, match=r"--init-from .*gate\..* there and .* here"):
        train(wrong)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--init-from", "no-such-model"), "--init-from no-such-model: no such folder, and no shipped model"),
        (("--init-from", "cluttered-digits", "--pretrained", __file__), "pass it or --pretrained"),
        (("--init-from", "cluttered-digits", "--task", "segmentation"), "segmentation starts from a classifier"),
    ],
)
def test_bad_init_from_is_refused_when_parsed(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--out", "runs/x", *extra])
    assert message in capsys.readouterr().err
