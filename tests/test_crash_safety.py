"""Kill -9 at every step of the epoch-boundary write, and at random instants: the run folder stays
loadable, --resume finishes the run with no epoch twice in the metrics, and the final weights are
bit-identical to a run never killed (CPU, fixed seed).

Runs happen in forked children of one worker process (tests/crash_worker.py: seconds per kill, not
an interpreter start-up each); ``MSVIT_KILL_AT`` makes a child SIGKILL itself at a named point of
the writer (msvit.io.faults), the random kills come from the worker.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msvit.io.checkpoint import load_checkpoint
from msvit.train.run_folder import RunFolderError, prepare

HERE = Path(__file__).resolve().parent
TINY_MODEL = json.dumps({"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "mlp_ratio": 2})
EPOCHS = 3
POINTS = [
    "checkpoint:weights:partial",
    "checkpoint:weights:written",
    "checkpoint:config:written",
    "checkpoint:state:partial",
    "checkpoint:state:written",
    "checkpoint:renamed",
    "manifest:partial",
    "manifest:written",
    "metrics:partial",
    "metrics:written",
]


def run_argv(out, *extra):
    return [
        *"--train-size 64 --val-size 16 --batch-size 16 --image-size 32 --model-kwargs".split(),
        TINY_MODEL,
        *"--coarse-patch 16 --gate-hidden 8 --gate-start-epoch 1 --gate-loss gbas --epochs".split(),
        str(EPOCHS),
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def worker():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    process = subprocess.Popen(
        [sys.executable, "-u", str(HERE / "crash_worker.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )

    def run(out, *extra, kill_at=None, after=None) -> dict:
        process.stdin.write(json.dumps({"argv": run_argv(out, *extra), "kill_at": kill_at, "after": after}) + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())

    yield run
    process.stdin.close()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory):
    """The final weights of the same run never killed."""
    out = tmp_path_factory.mktemp("reference")
    assert worker(out) == {"killed": False, "code": 0}  # the first run is slow (disk caches): not the one timed
    started = time.perf_counter()
    assert worker(out, "--overwrite") == {"killed": False, "code": 0}
    seconds = time.perf_counter() - started  # how long a whole run takes: where the random kills land
    return {"weights": load_checkpoint(out).state_dict(), "seconds": seconds}


def epochs_logged(out):
    path = out / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def assert_consistent(out):
    """At any instant: loadable, and the metrics are epochs 1..k once each, k the checkpoint's epoch or one less
    (the metrics are rewritten just after the manifest switches)."""
    manifest = json.loads((out / "checkpoint.json").read_text())
    load_checkpoint(out)
    logged = epochs_logged(out)
    assert logged == list(range(1, len(logged) + 1))
    assert manifest["epoch"] - 1 <= len(logged) <= manifest["epoch"]


def assert_finished_like(out, reference):
    assert epochs_logged(out) == list(range(1, EPOCHS + 1))
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name]  # temporaries cleaned up
    weights = load_checkpoint(out).state_dict()
    different = [k for k, v in reference["weights"].items() if not torch.equal(weights[k], v)]
    assert not different, f"the resumed run differs from the uninterrupted one in {different[:5]}"


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_write_step_then_resume_matches_an_uninterrupted_run(tmp_path, point, worker, reference):
    assert worker(tmp_path, kill_at=f"{point}@2")["killed"], "the run was not killed at the injected point"
    assert_consistent(tmp_path)
    assert worker(tmp_path, "--resume") == {"killed": False, "code": 0}
    assert_finished_like(tmp_path, reference)


def test_kill_before_the_first_checkpoint_leaves_nothing_to_resume(tmp_path, worker, reference):
    assert worker(tmp_path, kill_at="checkpoint:weights:partial")["killed"]
    with pytest.raises(RunFolderError, match="nothing to resume"):
        prepare(tmp_path, resume=True, overwrite=False, rank=0, world=1, map_location="cpu")
    assert worker(tmp_path) == {"killed": False, "code": 0}  # no run to protect: a new one starts and cleans up
    assert_finished_like(tmp_path, reference)


def test_kills_at_random_instants_then_resume(tmp_path, worker, reference):
    """kill -9 from outside at random instants of a run (bounded: 6 kills), each followed by --resume."""
    rng = random.Random(0)
    started, kills = False, 0
    for _ in range(6):
        after = rng.uniform(0, 0.6 * reference["seconds"])
        result = worker(tmp_path, "--resume" if started else "--overwrite", after=after)
        if not result["killed"]:
            assert result["code"] == 0
            break
        kills += 1
        started = (tmp_path / "checkpoint.json").exists()
        if started:
            assert_consistent(tmp_path)
    else:
        assert worker(tmp_path, "--resume" if started else "--overwrite") == {"killed": False, "code": 0}
    print(f"{kills} random kills, then --resume finished the run")
    assert kills >= 1  # the first kill lands in the first 60% of a full run: always inside it
    assert_finished_like(tmp_path, reference)


def test_segmentation_runs_are_crash_safe_too(tmp_path, worker):
    """--task segmentation writes through the same code: killed inside the weights, resumed, loadable."""
    from msvit.models.segmentation import load_segmenter

    seg = ("--task", "segmentation", "--no-freeze-gate", "--gate-loss", "gbas", "--digit-scale", "0.3", "0.6")
    assert worker(tmp_path, *seg, kill_at="checkpoint:weights:partial@2")["killed"]
    load_segmenter(tmp_path)
    assert epochs_logged(tmp_path) == [1]
    assert worker(tmp_path, *seg, "--resume") == {"killed": False, "code": 0}
    assert epochs_logged(tmp_path) == list(range(1, EPOCHS + 1))
    assert load_segmenter(tmp_path).pretrained_cfg["config"]["task"] == "segmentation"
