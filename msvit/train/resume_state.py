"""What a run saves each epoch so that ``--resume`` continues exactly as if it had never stopped.

Besides the weights: the optimizer and schedule, the gate loss's learned priors, the step count,
the metrics rows so far, and every source of randomness at the epoch boundary: the data loader's
shuffle generator (the next epoch's order; restarting it from the seed would replay epoch 1's
order), and each rank's global torch RNG (Gumbel noise, random masks, augmentations). With a fixed
seed on CPU a killed and resumed run ends with bit-identical weights; on GPU, nondeterministic
kernels (atomics in backward) make runs differ slightly whether or not they were resumed.

Every flag of the run is recorded (but ``INVOCATION``'s): ``msvit train --resume --out DIR``
continues the recorded run, and only the flags typed on that command line override it
(``resumed_args``). A typed flag must not change what the run is: the flags that define it are
compared, and a change (batch size, optimizer, gate loss, model, ...) is refused naming the flag.
``FREE`` are the flags that may differ: where the run lives, how long it goes on, how data is loaded.
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn

from msvit.io.checkpoint import check_state, read_checkpoint
from msvit.models.entropy_gate import APT_THRESHOLD
from msvit.train.run_folder import Checkpoint, RunFolderError
from msvit_kernels.entropy_kernel import DEFAULT_BINS

# --epochs may grow to extend a finished run; the cosine schedule then stretches to the new length
# from the resumed step on (documented in docs/training.md), everything else continues unchanged.
FREE = {
    "epochs",
    "workers",
    "device",
    "out",
    "resume",
    "overwrite",
    "max_steps",
    "pretrained",
    "hub_pretrained",
    "init",
}
# Flags of one command line, not of the run: never recorded, so a resume takes them from its own
# command line or their defaults. The machine may differ (--device auto: its GPU, if any);
# --max-steps bounds a smoke run (inherited, it would stop the resumed run after a step);
# starting weights are replaced by the checkpoint's; ``typed`` is parse_args' list of typed flags;
# --threads suits the machine of this command line.
INVOCATION = {
    "out",
    "resume",
    "overwrite",
    "max_steps",
    "device",
    "threads",
    "pretrained",
    "hub_pretrained",
    "init_from",
    "typed",
}
# Flags added after train states were first written, with the value every run before them had.
ADDED = {
    "gate": "learned",
    "entropy_threshold": APT_THRESHOLD,
    "entropy_bins": DEFAULT_BINS,
    "entropy_binning": "continuous",  # the entropy gate's rule before APT's binning became the default
    "scales": None,
}


def recorded_flags(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in INVOCATION}


def run_flags(flags: dict) -> dict:
    """The flags that define the run (older train states recorded only these)."""
    return {k: v for k, v in flags.items() if k not in FREE and k not in INVOCATION}


def resumed_args(saved: dict, args, where) -> argparse.Namespace:
    """``args`` of a resume: the recorded flags, except those typed on this command line
    (``args.typed``, set by ``parse_args``; args built otherwise count as typed in full)."""
    typed = getattr(args, "typed", None)
    if typed is None:
        return args
    if "epochs" not in saved and "epochs" not in typed:  # the default would silently lengthen the run
        raise RunFolderError(
            f"--resume: the run in {where} was saved by an older msvit, which did not record --epochs; "
            "pass --epochs (the run's total)"
        )
    recorded = {k: v for k, v in with_task(saved).items() if k not in typed and k not in INVOCATION}
    return argparse.Namespace(**{**vars(args), **recorded})


def with_task(saved: dict) -> dict:
    """``saved`` with its ``task`` and the ``ADDED`` flags: train states that lack the task tell it
    by their flags (only segmentation has ``decoder``)."""
    saved = {**ADDED, **saved}
    if "task" in saved:
        return saved
    return {**saved, "task": "segmentation" if "decoder" in saved else "classification"}


def check_flags(saved: dict, args, world: int, saved_world: int, where) -> None:
    check_run_flags(saved, args, where)
    if world != saved_world:
        raise RunFolderError(
            f"--resume: the run in {where} ran on {saved_world} process(es), now {world}; the data "
            "order and batch statistics depend on it"
        )


def check_run_flags(saved: dict, args, where) -> None:
    """Refuse a typed flag that changes what the recorded run is (``FREE`` flags may change)."""
    saved, now = run_flags(with_task(saved)), run_flags(vars(args))
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        listed = "; ".join(f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {now.get(k)!r}" for k in changed)
        raise RunFolderError(
            f"--resume: the run in {where} was started with other flags ({listed}); a resumed run "
            "keeps the flags that define it: leave them off (the recorded values apply), or start "
            "a new run with another --out"
        )


def rng_state(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "loader": generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def gather(state: dict, world: int) -> list:
    """Every rank's RNG state, on every rank (rank 0 saves them all)."""
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def train_state(
    *, epoch: int, step: int, complete: bool, opt, schedule, gate_loss, rng: list, rows: list, args, world: int
) -> dict:
    return {
        "epoch": epoch,
        "step": step,
        "complete": complete,
        "optimizer": opt.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": rng,
        "rows": rows,
        "args": recorded_flags(args),
        "world": world,
        "gate_loss": gate_loss.state_dict() if isinstance(gate_loss, nn.Module) else None,
    }


def restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    opt,
    schedule,
    gate_loss,
    generator: torch.Generator,
    args,
    rank: int,
    world: int,
):
    """Load the checkpoint into the run's objects; returns (epochs done, steps done, metrics rows)."""
    state = checkpoint.state
    check_flags(state["args"], args, world, state["world"], checkpoint.folder.parent)
    if not state["complete"]:
        raise RunFolderError(
            f"--resume: {checkpoint.folder} was saved mid-epoch (--max-steps); resuming inside an "
            "epoch is not supported, start a new run"
        )
    _, weights, folder = read_checkpoint(checkpoint.folder)  # sha256-verified
    check_state(model, weights, folder)
    model.load_state_dict(weights)
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if isinstance(gate_loss, nn.Module):
        gate_loss.load_state_dict(state["gate_loss"])
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["loader"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["epoch"], state["step"], list(state["rows"])
