"""--resume continues exactly; runs that would be lost or mixed are refused with the flag named."""

import json

import pytest
import torch
from test_train import small_run

from msvit.io.checkpoint import load_checkpoint
from msvit.train import parse_args, train
from msvit.train.run_folder import RunFolderError

from helpers import TINY_MODEL

STEPS_PER_EPOCH = 4  # --train-size 128 / --batch-size 32


def tiny(out, *extra):
    return small_run(
        out,
        *"--train-size 128 --val-size 32 --gate-start-epoch 1 --warmup-epochs 0.5 --device cpu".split(),
        *extra,
    )  # bit-identical resume is a CPU claim


def weights(out):
    return load_checkpoint(out).state_dict()


def epochs_logged(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_epoch_then_resume_equals_two_epochs_straight(tmp_path):
    """Same data order, RNG, schedule, optimizer and GBaS state: bit-identical weights on CPU."""
    train(tiny(tmp_path / "straight", "--epochs", "2"))
    train(tiny(tmp_path / "resumed", "--epochs", "2", "--max-steps", str(STEPS_PER_EPOCH)))
    assert epochs_logged(tmp_path / "resumed") == [1]
    train(tiny(tmp_path / "resumed", "--epochs", "2", "--resume"))
    assert epochs_logged(tmp_path / "resumed") == [1, 2]
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == 0.0 and rows[-1]["step"] == 2 * STEPS_PER_EPOCH  # the schedule ran to its end


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--batch-size", "16"),
        ("--opt", "sgd"),
        ("--gate-loss", "l0"),
        ("--model-kwargs", json.dumps({"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "mlp_ratio": 2})),
    ],
)
def test_resume_with_a_flag_that_changes_the_run_is_refused_naming_it(tmp_path, flag, value):
    train(tiny(tmp_path, "--epochs", "2", "--max-steps", "1"))
    with pytest.raises(RunFolderError, match=f"{flag} was"):
        train(tiny(tmp_path, "--epochs", "2", "--resume", flag, value))


def test_resume_with_only_out_continues_the_recorded_run(tmp_path, capsys):
    """``msvit train --resume --out DIR``: the run's non-default flags (tiny model, data sizes, batch
    size, optimizer, --epochs 2) are the recorded ones, not the defaults; it ends as a run never stopped."""
    flags = ("--epochs", "2", "--opt", "sgd", "--lr", "0.01", "--gate-loss", "l0")
    train(tiny(tmp_path / "straight", *flags))
    train(tiny(tmp_path / "resumed", *flags, "--max-steps", str(STEPS_PER_EPOCH)))
    # --device is this command line's (auto: a GPU if present); bit-identical resume is a CPU claim
    on_cpu = ["--device", "cpu"] if torch.cuda.is_available() else []
    train(parse_args(["--resume", "--out", str(tmp_path / "resumed"), *on_cpu]))
    assert epochs_logged(tmp_path / "resumed") == [1, 2]
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert "epoch 2/2: mode=packed train_loss=" in capsys.readouterr().out  # the shared progress line


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--opt", "adamw", "--opt was 'sgd', now 'adamw'"),
        ("--batch-size", "128", "--batch-size was 32, now 128"),  # typed: the default value counts too
    ],
)
def test_a_typed_flag_that_changes_the_recorded_run_is_refused_by_name(tmp_path, flag, value, message):
    train(tiny(tmp_path, "--epochs", "2", "--opt", "sgd", "--max-steps", str(STEPS_PER_EPOCH)))
    with pytest.raises(RunFolderError, match=f"started with other flags \\({message}\\)"):
        train(parse_args(["--resume", "--out", str(tmp_path), flag, value]))
    assert epochs_logged(tmp_path) == [1]


def test_parse_args_records_the_flags_typed_on_the_command_line():
    assert parse_args(["--lr", "0.001", "--no-amp", "--digit-scale", "0.2", "0.3"]).typed == (
        "amp",
        "digit_scale",
        "lr",
    )
    assert parse_args([]).typed == ()


def test_a_new_run_into_a_run_folder_is_refused_unless_overwrite(tmp_path):
    train(tiny(tmp_path, "--epochs", "1", "--max-steps", "1"))
    before = (tmp_path / "checkpoint.json").read_text()
    with pytest.raises(RunFolderError, match="already holds a run.*--overwrite"):
        train(tiny(tmp_path, "--epochs", "1", "--max-steps", "1"))
    assert (tmp_path / "checkpoint.json").read_text() == before
    train(tiny(tmp_path, "--epochs", "1", "--max-steps", "2", "--overwrite"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]  # the old run's metrics are gone, not mixed in


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(RunFolderError, match="nothing to resume"):
        train(tiny(tmp_path / "empty", "--epochs", "1", "--resume"))


def test_resume_after_a_mid_epoch_stop_is_refused(tmp_path):
    train(tiny(tmp_path, "--epochs", "2", "--max-steps", "1"))
    with pytest.raises(RunFolderError, match="mid-epoch"):
        train(tiny(tmp_path, "--epochs", "2", "--resume"))


def test_extending_a_finished_run_continues_its_metrics(tmp_path):
    train(tiny(tmp_path, "--epochs", "1"))
    train(tiny(tmp_path, "--epochs", "2", "--resume"))
    assert epochs_logged(tmp_path) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *"checkpoint.json epoch-0002 metrics.csv metrics.jsonl".split(),
    ]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """ENOSPC while writing the train state: the run fails, the folder still holds epoch 1, resume works."""
    import errno

    from msvit.train import run_folder

    train(tiny(tmp_path, "--epochs", "2", "--max-steps", str(STEPS_PER_EPOCH)))
    real = run_folder.write_bytes

    def full_disk(path, data, point=""):
        if path.name == run_folder.STATE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, point)

    monkeypatch.setattr(run_folder, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(tiny(tmp_path, "--epochs", "2", "--resume"))
    monkeypatch.undo()
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epoch"] == 1
    load_checkpoint(tmp_path)
    train(tiny(tmp_path, "--epochs", "2", "--resume"))
    assert epochs_logged(tmp_path) == [1, 2]


def drop_recorded_flag(out, name):
    """The train state as an older msvit wrote it, without flag ``name`` (manifest sha256 updated)."""
    from msvit.io.checkpoint import MANIFEST, resolve, sha256
    from msvit.train.run_folder import STATE

    path = resolve(out) / STATE
    state = torch.load(path, weights_only=True)
    del state["args"][name]
    torch.save(state, path)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][STATE] = sha256(path.read_bytes())
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_a_train_state_without_epochs_needs_them_typed(tmp_path):
    """Older train states recorded only the run-defining flags: the default --epochs 10 would lengthen the run."""
    train(tiny(tmp_path, "--epochs", "2", "--max-steps", str(STEPS_PER_EPOCH)))
    drop_recorded_flag(tmp_path, "epochs")
    with pytest.raises(RunFolderError, match="did not record --epochs; pass --epochs"):
        train(parse_args(["--resume", "--out", str(tmp_path)]))
    train(parse_args(["--resume", "--out", str(tmp_path), "--epochs", "2"]))
    assert epochs_logged(tmp_path) == [1, 2]


def test_a_train_state_without_a_task_resumes_as_the_task_its_flags_tell(tmp_path):
    """Train states that stored no ``task`` flag: classification unless they hold segmentation's ``decoder``."""
    from msvit.train.resume_state import with_task

    train(tiny(tmp_path, "--epochs", "2", "--max-steps", str(STEPS_PER_EPOCH)))
    drop_recorded_flag(tmp_path, "task")
    train(tiny(tmp_path, "--epochs", "2", "--resume"))
    assert epochs_logged(tmp_path) == [1, 2]
    assert with_task({"decoder": "linear"})["task"] == "segmentation"
    assert with_task({"task": "classification", "decoder": "mask"})["task"] == "classification"


def three_scale_entropy_run(out, *extra):
    """A tiny run of the entropy gate at three scales (8, 16, 32 px; two thresholds), 2 steps an epoch."""
    return parse_args(
        [
            *"--train-size 64 --val-size 32 --batch-size 32 --image-size 32 --device cpu --model-kwargs".split(),
            TINY_MODEL,
            *"--scales 8 16 32 --gate entropy --entropy-threshold 5.0 4.0 --out".split(),
            str(out),
            *extra,
        ]
    )


def test_a_resume_checks_flags_against_each_other_after_taking_the_recorded_ones(tmp_path, capsys):
    """--entropy-threshold is checked against --gate and --scales, the gate-training flags against
    --gate: with --resume those are the run's recorded values, not the defaults (which refused
    these resumes with "--entropy-threshold applies to --gate entropy" and "1 for 2 scales, got 2")."""
    train(three_scale_entropy_run(tmp_path, "--epochs", "1"))
    resume = ["--resume", "--out", str(tmp_path), "--device", "cpu"]
    parse_args([*resume, "--entropy-threshold", "5.0", "4.0", "--epochs", "2"])
    train(parse_args([*resume, "--gate", "entropy", "--entropy-threshold", "5.0", "4.0", "--epochs", "2"]))
    assert epochs_logged(tmp_path) == [1, 2]
    with pytest.raises(RunFolderError, match=r"--entropy-threshold was \[5.0, 4.0\], now \[6.0, 4.0\]"):
        parse_args([*resume, "--entropy-threshold", "6.0", "4.0", "--epochs", "3"])
    with pytest.raises(SystemExit) as stop:  # the default value, typed: the recorded entropy gate has no gate loss
        parse_args([*resume, "--gate-lambda", "4", "--epochs", "3"])
    assert stop.value.code == 2 and "--gate-lambda acts on the learned gate" in capsys.readouterr().err


def test_a_resume_takes_the_task_of_the_recorded_run(tmp_path):
    """A segmentation run resumed with only --out and a segmentation flag (refused before as "an
    option of --task segmentation, not of --task classification")."""
    seg = ("--task", "segmentation", "--decoder", "mask", "--train-size", "64", "--val-size", "32", "--device", "cpu")
    train(small_run(tmp_path, *seg, "--epochs", "1"))
    args = parse_args(["--resume", "--out", str(tmp_path), "--decoder", "mask", "--epochs", "2", "--device", "cpu"])
    assert args.task == "segmentation" and args.decoder == "mask"
    with pytest.raises(RunFolderError, match="--decoder was 'mask', now 'linear'"):
        parse_args(["--resume", "--out", str(tmp_path), "--decoder", "linear"])


def test_a_resume_without_a_run_is_refused_before_its_flags_are_checked(tmp_path):
    with pytest.raises(RunFolderError, match="holds no run; nothing to resume"):
        parse_args(["--resume", "--out", str(tmp_path / "none"), "--entropy-threshold", "5"])
