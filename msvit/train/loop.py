"""The epoch loop of ``msvit train``, the same for every task (``msvit.train.tasks``): DDP, the
optimizer and schedule, the gate's phases, the loss of Eq. 6 (task loss + lambda * gate loss),
metrics, and a crash-safe checkpoint per epoch that ``--resume`` continues exactly."""

import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from msvit.data.loaders import loaders
from msvit.data.native import image_tokens
from msvit.data.sample_images import normalize
from msvit.io.checkpoint import resolve
from msvit.threads import use_threads
from msvit.train import resume_state, run_folder
from msvit.train.distributed import setup_distributed
from msvit.train.epochs import check_batches, progress_line, save_epoch, stop_early
from msvit.train.gate_training import (
    epoch_mode,
    fine_share,
    gate_geometry,
    gate_loss_input,
    make_gate_loss,
    random_masks,
)
from msvit.train.optim import make_optimizer, optimizer_step
from msvit.train.tasks import task_of

SUMS = ("loss", "task", "gate", "fine", "tokens")


def to_model_input(images, device, mean, std):
    """A batch on ``device``, normalised: a tensor ``[B, C, H, W]``, or a list of ``[C, H_b, W_b]``
    (native resolution, ``--max-tokens-per-batch``) normalised image by image."""
    if isinstance(images, list):
        return [normalize(image.to(device, non_blocking=True)[None], mean, std)[0] for image in images]
    return normalize(images.to(device, non_blocking=True), mean, std)


def batch_masks(model, images, decisions: int, target: float, device):
    """Random mixed-scale masks for a batch: bool ``[B, D]``, or for a list one ``[D_b]`` per image
    (the gate's decisions of each image's own size)."""
    if isinstance(images, list):
        return [random_masks(1, d, target, device)[0] for d in model.batch_of(images).decisions]
    return random_masks(len(images), decisions, target, device)


def train(args) -> dict:
    """Run the training described by ``args`` (``msvit.train.parse_args``); returns the last epoch's metrics."""
    launched = time.perf_counter()
    device, rank, world = setup_distributed(args.device)
    main_process = rank == 0
    out = Path(args.out)
    checkpoint = run_folder.prepare(out, args.resume, args.overwrite, rank, world, device)
    if checkpoint is not None:  # the recorded run; a typed flag that changes it stops before the data is generated
        args = resume_state.resumed_args(checkpoint.state["args"], args, out)
        resume_state.check_flags(checkpoint.state["args"], args, world, checkpoint.state["world"], out)
    use_threads(getattr(args, "threads", None))
    task = task_of(args.task)
    if main_process:
        tqdm.write(start_line(out, checkpoint, args.epochs))
    if checkpoint is not None and checkpoint.state["epoch"] >= args.epochs:  # said before any data is built
        if main_process:
            tqdm.write(load_line(out, args.task))
        if world > 1:
            dist.destroy_process_group()
        return checkpoint.state["rows"][-1] if checkpoint.state["rows"] else {}
    torch.manual_seed(args.seed + rank)
    bundle = task.build_data(args, main_process)
    model, config = task.build_model(args, bundle)
    model = model.to(device).train()
    loss_grid, decisions, tree = gate_geometry(task.tokenizer(model), args.image_size)
    gate_trains = task.gate_trains(args)
    gate_loss = make_gate_loss(args, loss_grid) if gate_trains else None
    if isinstance(gate_loss, nn.Module):
        gate_loss.to(device)
    max_tokens = getattr(args, "max_tokens_per_batch", 0)
    tokens_of = (
        (lambda sizes: image_tokens(sizes, model.tokenizer.fine_patch, model.tokenizer.num_prefix))
        if max_tokens
        else None
    )
    train_loader, sampler, val_loader = loaders(
        bundle, args.batch_size, args.workers, world > 1, args.seed, max_tokens, tokens_of
    )
    check_batches(train_loader, args.batch_size, world)
    opt, schedule = make_optimizer(args, model, gate_loss, len(train_loader))
    start_epoch, step, rows = 0, 0, []
    if checkpoint is not None:
        start_epoch, step, rows = resume_state.restore(
            checkpoint, model, opt, schedule, gate_loss, train_loader.generator, args, rank, world
        )
        launched -= rows[-1].get("wall_seconds", 0.0) if rows else 0.0  # the clock counts the whole run
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    amp = args.amp and device.type == "cuda"
    metrics = rows[-1] if rows else {}

    def train_step(images, targets, mode: str, pre_gate: bool) -> dict:
        images = to_model_input(images, device, bundle.mean, bundle.std)
        targets = targets.to(device, non_blocking=True)
        # before --gate-start-epoch a trainable gate is replaced by random mixed-scale masks
        mask = batch_masks(model, images, decisions, args.gate_target, device) if pre_gate else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            result = task.forward(net, images, args, mode, mask)
            task_loss = F.cross_entropy(
                result.logits.float(), targets, ignore_index=task.IGNORE_INDEX, label_smoothing=args.smoothing
            )
        use_gate_loss = gate_loss is not None and result.gate.soft is not None
        gate_input = gate_loss_input(args, result.gate, tree) if use_gate_loss else None
        if gate_input is not None and isinstance(images, list):  # flat [sum D_b]: the batch is one row
            gate_input = gate_input.view(1, -1)
        gate = gate_loss(gate_input) if use_gate_loss else task_loss.new_zeros(())
        loss = task_loss + args.gate_lambda * gate
        optimizer_step(loss, model, opt, schedule, args.clip_grad)
        return {
            "loss": loss,
            "task": task_loss,
            "gate": gate,
            "fine": fine_share(result.gate.hard, tree).float().mean(),
            "tokens": result.tokens.float().mean(),
        }

    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        pre_gate = gate_trains and epoch < args.gate_start_epoch
        mode = epoch_mode(args, epoch, pre_gate)
        started = time.perf_counter()
        sums = {k: torch.zeros((), device=device) for k in SUMS}
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", disable=not main_process)
        for n, (images, targets) in enumerate(bar, 1):
            for k, v in train_step(images, targets, mode, pre_gate).items():
                sums[k] += v.detach()  # summed on the device: no host sync per step
            step += 1
            if n % 20 == 0:
                bar.set_postfix(loss=f"{sums['loss'].item() / n:.3f}", fine=f"{sums['fine'].item() / n:.2f}")
            if stop_early(args, step, n, len(train_loader)):
                break
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "mode": mode,
            "gate_trains": gate_trains and not pre_gate,
            **{f"train_{k}": v.item() / n for k, v in sums.items()},
            "lr": schedule.get_last_lr()[0],
            "gate_lr": schedule.get_last_lr()[1],
            "epoch_seconds": time.perf_counter() - started,
        }
        if main_process:
            evaluation = task.evaluate(model, val_loader, bundle, args, device)
            metrics.update({f"val_{k}": v for k, v in evaluation.items()})
            metrics["wall_seconds"] = time.perf_counter() - launched  # data generation and evaluation included
            tqdm.write(progress_line(metrics, args.epochs, task.PROGRESS))
        rows.append(metrics)
        save_epoch(
            out,
            epoch,
            model,
            config,
            task.save,
            complete=n == len(train_loader),
            step=step,
            opt=opt,
            schedule=schedule,
            gate_loss=gate_loss,
            generator=train_loader.generator,
            rows=rows,
            args=args,
            rank=rank,
            world=world,
        )
        if args.max_steps and step >= args.max_steps:
            break
    if main_process:
        tqdm.write(load_line(out, args.task))
    if world > 1:
        dist.destroy_process_group()
    return metrics


def start_line(out: Path, checkpoint, epochs: int) -> str:
    """Where the run goes and, for a resume, where it continues (or that it is finished)."""
    if checkpoint is None:
        return f"msvit train: a new run of {epochs} epochs in {out}/ (checkpoint per epoch, metrics.jsonl)"
    done = checkpoint.state["epoch"]
    if done >= epochs:
        return f"msvit train: {out}/ already holds all {done} epochs of the run; raise --epochs to train on"
    return f"msvit train: resuming {out}/ from epoch {done} of {epochs}"


def load_line(out: Path, task_name: str) -> str:
    """Where the last checkpoint is and the one Python line that loads it."""
    loader = "load_segmenter" if task_name == "segmentation" else "load_checkpoint"
    return (
        f"checkpoint: {resolve(out)}/ (the latest; the run folder {out}/ names it); load it with:\n"
        f'  python -c "import msvit; model = msvit.{loader}({str(out)!r})"'
    )
