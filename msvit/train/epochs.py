"""Epoch boundaries of a run: the crash-safe checkpoint of each epoch, where an epoch may stop, and
the progress line printed after it."""

from msvit.train import resume_state, run_folder


def save_epoch(
    out, epoch, model, config, save, *, complete, step, opt, schedule, gate_loss, generator, rows, args, rank, world
) -> None:
    """Every rank: gather the RNG states; rank 0 writes the epoch's checkpoint; all wait for it."""
    rng = resume_state.gather(resume_state.rng_state(generator), world)
    if rank == 0:
        state = resume_state.train_state(
            epoch=epoch + 1,
            step=step,
            complete=complete,
            opt=opt,
            schedule=schedule,
            gate_loss=gate_loss,
            rng=rng,
            rows=rows,
            args=args,
            world=world,
        )
        run_folder.save_epoch(out, epoch + 1, save, model, config, state)
    run_folder.barrier(world)


def stop_early(args, step: int, n: int, batches: int) -> bool:
    """--max-steps reached inside an epoch. At its last batch the loop ends by itself instead: the
    sampler draws from the loader's generator once more as it finishes, and a checkpoint taken
    before that draw would resume with another data order than the run never stopped."""
    return bool(args.max_steps) and step >= args.max_steps and n < batches


def check_batches(train_loader, batch_size: int, world: int) -> None:
    """A training set smaller than one batch (per process) would give epochs of zero steps."""
    if len(train_loader) == 0:
        raise SystemExit(
            f"msvit train: --batch-size {batch_size} is larger than the training set "
            f"({len(train_loader.dataset)} images{f' over {world} processes' if world > 1 else ''}); "
            "incomplete batches are dropped, so an epoch would have no step"
        )


# What every task's progress line shows around the task's own validation metrics (``PROGRESS``).
TRAIN_PROGRESS = ("mode", "train_loss", "train_task", "train_gate", "train_fine", "train_tokens")
TIME_PROGRESS = ("epoch_seconds", "wall_seconds")


def progress_line(metrics: dict, epochs: int, task_keys) -> str:
    """The line printed after each epoch, one format for every task: ``epoch 3/10:`` then the
    training numbers, the task's ``task_keys`` and the times, each ``key=value`` with the key of
    metrics.jsonl (numbers to 4 significant digits; keys the epoch lacks are left out)."""
    keys = (*TRAIN_PROGRESS, *task_keys, *TIME_PROGRESS)
    shown = " ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys if k in metrics
    )
    return f"epoch {metrics['epoch']}/{epochs}: {shown}"
