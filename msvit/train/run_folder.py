"""A training run's folder, consistent at every instant: a kill -9 anywhere leaves the previous
complete checkpoint or the new one, never a mix.

Layout::

    OUT/checkpoint.json        manifest, replaced last: {"epoch": 3, "folder": "epoch-0003", "files": {name: sha256}}
    OUT/epoch-0003/            model.safetensors, config.json, train_state.pt of that epoch
    OUT/metrics.jsonl, .csv    one row per epoch up to the manifest's epoch

Each epoch is written into a hidden staging folder, every file fsynced (``msvit.io.atomic``), the
folder renamed to ``epoch-NNNN``, then the manifest switched to it, then the metrics rewritten from
the rows the train state carries, then older epoch folders deleted. Whatever a kill interrupts is
either invisible (staging, an unreferenced epoch folder) or repaired from the manifest's checkpoint
when the run resumes (metrics rewritten, so no epoch appears twice). Only rank 0 writes; every
rank waits at a barrier before it reads.
"""

import csv
import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.distributed as dist

from msvit.io.atomic import remove_temporaries, replace_folder, temporary_name, write_bytes, write_text
from msvit.io.checkpoint import CONFIG, MANIFEST, WEIGHTS, resolve, sha256
from msvit.io.config_file import read_json_object, require
from msvit.io.faults import crash_point

STATE = "train_state.pt"
METRICS = ("metrics.jsonl", "metrics.csv")
EPOCH_PREFIX = "epoch-"
LEGACY = (WEIGHTS, CONFIG, STATE)  # what runs wrote before epoch folders: still "a run" to protect


class RunFolderError(ValueError):
    """The --out folder cannot be used as asked (a run would be lost or mixed)."""


class Checkpoint(NamedTuple):
    folder: Path  # the epoch folder: model.safetensors, config.json
    state: dict  # the train state (see msvit.train.resume_state)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def epoch_folders(out: Path) -> List[Path]:
    return sorted(p for p in out.glob(f"{EPOCH_PREFIX}*") if p.is_dir())


def run_files(out: Path) -> List[Path]:
    """What in ``out`` belongs to a run (to refuse overwriting it by accident)."""
    if not out.is_dir():
        return []
    names = [MANIFEST, *METRICS, *LEGACY]
    return [out / n for n in names if (out / n).exists()] + epoch_folders(out)


def resumed_state_file(out: Path) -> Path:
    """The train state ``--resume`` continues from: the manifest's checkpoint's, or a refusal that
    says why there is none."""
    if not (out / MANIFEST).is_file():
        what = (
            "holds no run"
            if not run_files(out)
            else f"has no {MANIFEST} (no complete checkpoint, or a run of an older msvit)"
        )
        raise RunFolderError(f"--resume: {out} {what}; nothing to resume (start without --resume)")
    folder = resolve(out)
    if not (folder / STATE).is_file():
        raise RunFolderError(f"{folder} has no {STATE}: the checkpoint cannot be resumed")
    return folder / STATE


def recorded_flags_of(out) -> dict:
    """The flags the run in ``out`` recorded, for ``parse_args`` to merge a resume's command line
    with before checking flags against each other. Memory-mapped, so only the flags are read (a
    train state holds the optimizer's); ``prepare`` verifies the whole state before training."""
    path = resumed_state_file(Path(out))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:  # a damaged file
        raise RunFolderError(f"{path} cannot be read ({type(error).__name__}: {error}); it cannot be resumed") from None
    flags = state.get("args") if isinstance(state, dict) else None
    if not isinstance(flags, dict):
        raise RunFolderError(f"{path} records no flags ('args'): the checkpoint cannot be resumed")
    return flags


def read_checkpoint_state(out: Path, map_location) -> Checkpoint:
    """The manifest's checkpoint; the train state's sha256 must match the manifest's."""
    path = resumed_state_file(out)
    manifest = read_json_object(out / MANIFEST, "training run's checkpoint manifest")
    files = require(manifest, "files", dict, out / MANIFEST)
    folder = path.parent
    data = path.read_bytes()
    if sha256(data) != files.get(STATE):
        raise RunFolderError(f"{folder / STATE} is corrupt: its sha256 differs from the one in {out / MANIFEST}")
    state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    return Checkpoint(folder, state)


def prepare(out, resume: bool, overwrite: bool, rank: int, world: int, map_location) -> Optional[Checkpoint]:
    """Check ``out`` for the run about to start, then (rank 0) clean it up; returns the checkpoint
    to resume from, or None for a new run.

    A new run refuses a folder holding a run unless ``overwrite`` (which deletes that run's files,
    nothing else); ``resume`` needs a complete checkpoint. Called by every rank: all ranks read
    the same folder before rank 0 changes anything, and wait for it afterwards."""
    out = Path(out)
    found = run_files(out)
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint_state(out, map_location)
    elif found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise RunFolderError(
            f"--out {out} already holds a run ({names}); pass --resume to continue it or "
            "--overwrite to delete it and start again"
        )
    barrier(world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)  # what killed writers left behind
        if checkpoint is None:
            for path in found:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            for stale in epoch_folders(out):
                if stale != checkpoint.folder:  # written, but the manifest never switched to it
                    shutil.rmtree(stale)
            write_metrics(out, checkpoint.state["rows"])  # drop rows of epochs after the checkpoint
    barrier(world)
    return checkpoint


def write_metrics(out: Path, rows: List[dict]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from ``rows`` (crash-safe, each epoch once)."""
    write_text(out / METRICS[0], "".join(json.dumps(r) + "\n" for r in rows), "metrics")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / METRICS[1], text.getvalue())


def save_epoch(out: Path, epoch: int, save: Callable, model, config: dict, state: dict) -> Path:
    """Rank 0: the checkpoint of ``epoch`` (1-based) as a new epoch folder, the manifest switched to
    it, the metrics rewritten from ``state["rows"]``, older epoch folders removed.
    ``save(folder, model, config, point)`` writes the weights and config (msvit.io.checkpoint.write_checkpoint)."""
    out = Path(out)
    name = f"{EPOCH_PREFIX}{epoch:04d}"
    staging = temporary_name(out / name)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save(staging, model, config, "checkpoint")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(staging / STATE, buffer.getvalue(), "checkpoint:state")
    replace_folder(staging, out / name)
    crash_point("checkpoint:renamed")
    files = {f.name: sha256(f.read_bytes()) for f in sorted((out / name).iterdir())}
    write_text(
        out / MANIFEST, json.dumps({"epoch": epoch, "folder": name, "files": files}, indent=2) + "\n", "manifest"
    )
    write_metrics(out, state["rows"])
    crash_point("metrics:written")
    for old in epoch_folders(out):
        if old.name != name:
            shutil.rmtree(old)
    return out / name
