"""Busy machines (issue 29): --threads on every command that computes, warnings when medians sit far
above minima or the load exceeds the cores; scripts that write results leave the committed
bench/results/ alone unless asked; msvit train says where its run goes and how to load it."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msvit
from msvit.demo.table import latency_table
from msvit.threads import add_threads_argument, use_threads
from msvit.timing import busy_warnings, load_warning, spread_warning
from msvit.train import parse_args, train

from helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results_io import LOCAL, RESULTS, output_file  # noqa: E402


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_option_is_checked_and_applied(restore_threads):
    parser = argparse.ArgumentParser()
    add_threads_argument(parser)
    assert parser.parse_args([]).threads is None
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", bad])
    before = torch.get_num_threads()
    assert use_threads(None) == before
    assert use_threads(1) == 1 == torch.get_num_threads()


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "msvit", "train", "--help"],
        ["-m", "msvit", "visualize", "--help"],
        ["-m", "msvit.demo", "--help"],
        ["bench/high_res.py", "--help"],
        ["bench/gate_comparison.py", "--help"],
        ["bench/entropy_tokens.py", "--help"],
        ["bench/study.py", "--help"],
    ],
    ids=lambda c: " ".join(c[:3]),
)
def test_every_timed_command_takes_threads(command):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--threads N" in result.stdout
    assert "`" not in result.stdout, "help texts are plain text, not RST"


def test_help_texts_are_plain_text():
    for module in ("msvit_kernels.compile_report", "msvit"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0 and "`" not in result.stdout, result.stdout


def test_medians_far_above_minima_are_flagged_with_advice():
    quiet = {"packed": [0.30, 0.31, 0.29, 0.30], "vit": [0.40, 0.41, 0.40, 0.42]}
    assert spread_warning(quiet) is None
    busy = {"packed": [0.30, 3.1, 2.9, 3.0], "vit": [0.40, 0.41, 0.40, 0.42]}
    warning = spread_warning(busy)
    assert "packed 9.8x" in warning and "vit" not in warning  # median 2.95 over minimum 0.30
    assert "--threads" in warning and "uptime" in warning


def test_a_load_above_the_cores_is_flagged():
    assert load_warning(load=1.5, cores=2) is None
    warning = load_warning(load=15.6, cores=2)
    assert "load average 15.6 exceeds the 2 cores" in warning and "--threads" in warning
    assert busy_warnings({"a": [1.0, 1.0]}, load=0.0) == []


def test_the_demo_table_flags_a_busy_spell_its_outlier_check_misses():
    """Every run of a photo ~10x its minimum but one (the issue's demo): no single run is over 2x
    the median, so only the median-to-minimum check can see it."""
    steady = {"packed": [0.30, 0.31, 0.30], "masked": [0.60, 0.61, 0.60], "vit": [0.40, 0.41, 0.40]}
    slow = dict(steady, packed=[0.30, 3.0, 3.1])
    lines = latency_table([("astronaut", 120, steady), ("coffee", 90, slow)])
    assert any(line.startswith("! median over 1.5x") and "coffee packed ms" in line for line in lines)


@pytest.mark.parametrize("record, out, expected", [(False, None, LOCAL / "x.md"), (True, None, RESULTS / "x.md")])
def test_result_files_are_local_unless_recorded(record, out, expected):
    assert output_file("x.md", record, out) == expected
    with pytest.raises(ValueError, match="give one"):
        output_file("x.md", True, "elsewhere.md")


def test_make_compile_report_writes_local_results_unless_recorded():
    dry = subprocess.run(["make", "-n", "compile-report"], cwd=ROOT, capture_output=True, text=True)
    recorded = subprocess.run(["make", "-n", "compile-report", "RECORD=1"], cwd=ROOT, capture_output=True, text=True)
    assert "--out bench/results-local/compile" in dry.stdout
    assert "--out bench/results/compile" in recorded.stdout


def small_run(out, *extra):
    return parse_args(
        [
            *"--train-size 64 --val-size 32 --batch-size 32 --image-size 32 --model-kwargs".split(),
            TINY_MODEL,
            *"--coarse-patch 16 --gate-hidden 8 --threads 1 --out".split(),
            str(out),
            *extra,
        ]
    )


def test_train_says_where_the_run_goes_and_how_to_load_it(tmp_path, capsys, restore_threads):
    train(small_run(tmp_path, "--epochs", "1"))
    said = capsys.readouterr().out
    assert f"a new run of 1 epochs in {tmp_path}/" in said
    line = next(line.strip() for line in said.splitlines() if "import msvit" in line)
    assert line == f'python -c "import msvit; model = msvit.load_checkpoint({str(tmp_path)!r})"'
    assert f"checkpoint: {tmp_path}/epoch-0001/" in said
    assert torch.get_num_threads() == 1

    resumed = parse_args(["--resume", "--out", str(tmp_path), "--epochs", "2", "--max-steps", "1"])
    train(resumed)
    assert f"resuming {tmp_path}/ from epoch 1 of 2" in capsys.readouterr().out


def test_a_finished_run_says_so_before_building_data(tmp_path, capsys, monkeypatch):
    train(small_run(tmp_path, "--epochs", "1"))
    capsys.readouterr()
    from msvit.train import classify

    def no_data(*args, **kwargs):
        raise AssertionError("a finished run built its data")

    monkeypatch.setattr(classify, "build_data", no_data)
    metrics = train(parse_args(["--resume", "--out", str(tmp_path)]))
    said = capsys.readouterr().out
    assert "already holds all 1 epochs" in said and "msvit.load_checkpoint" in said
    assert metrics["epoch"] == 1
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epoch"] == 1
    assert isinstance(msvit.load_checkpoint(tmp_path), msvit.MSViT)
