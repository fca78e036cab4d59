"""``msvit train``: fine-tune (or train) an MSViT with its gate, on one CPU/GPU or with torchrun.

Recipes from Appendix C: ``--opt sgd`` (ViT: lr 0.03, momentum 0.9, no weight decay, clipping 1.0)
or ``--opt adamw`` (DeiT: small lr, weight decay, label smoothing 0.1); cosine schedule with linear
warm-up, and a longer warm-up for the gate, trained from scratch (C.3). The loss is Eq. 6:
task cross-entropy + lambda * gate loss (L0, BaS or GBaS) on the soft gate outputs.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import resume_state, run_folder
from .checkpoint import build_model, save_checkpoint
from .config_file import ConfigError
from .evaluate import evaluate
from .flag_checks import check_train_flags
from .losses import GBaSLoss, bas_loss, l0_loss
from .sample_images import normalize
from .train_data import CROPS, DIGITS, build_data, loaders


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="msvit train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DIGITS, help=f"'{DIGITS}' or an ImageFolder root with train/ and val/")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=20000, help="cluttered digits: training images")
    p.add_argument("--val-size", type=int, default=2000, help="cluttered digits: held-out images")
    p.add_argument("--digit-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="cluttered digits: digit side as a fraction of the image (default: the dataset's)")
    p.add_argument("--crop", choices=sorted(CROPS), default="none", help="crop augmentation (paper: standard/light)")
    p.add_argument("--shift", type=int, default=0, metavar="PX",
                   help="cluttered digits: random translations of up to PX pixels per image and epoch that keep "
                        "the digit inside the image (fights memorising the fixed renders)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for ImageFolder, off for digits)")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name")
    p.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model (patch_size, depth, ...)")
    p.add_argument("--pretrained", default=None, help="local timm weights file to start from (no download)")
    p.add_argument("--hub-pretrained", action="store_true", help="timm pretrained weights from the hub (needs internet)")
    p.add_argument("--coarse-patch", type=int, default=None, help="coarse patch size (default 2x the patch size)")
    p.add_argument("--gate-hidden", type=int, default=106)
    p.add_argument("--gate-init-logit", type=float, default=3.0,
                   help="initial gate logit (bias of its last layer): > 0 starts all-fine at eval, as in the paper; "
                        "3 samples ~95%% of the regions fine in training, 1 about 73%%")
    p.add_argument("--mode", choices=["packed", "trimmed", "masked"], default="packed")
    p.add_argument("--gate-mode", choices=["packed", "trimmed", "masked"], default=None,
                   help="execution mode once the gate trains (default: --mode). 'masked' gives the gate the "
                        "exact Eq. 18 gradient comparing each region's coarse and fine tokens (Appendix F)")
    p.add_argument("--gate-mode-epochs", type=int, default=0,
                   help="epochs (from --gate-start-epoch) that run in --gate-mode before training returns to --mode "
                        "(0: until the end). A short masked phase places the gate; packed epochs after it are cheaper")
    p.add_argument("--gate-loss", choices=["gbas", "bas", "l0", "l0-two-sided", "none"], default="gbas",
                   help="l0-two-sided pins the batch's fine rate at g* from both sides (msvit.losses.l0_loss)")
    p.add_argument("--gate-loss-input", choices=["samples", "probs"], default="samples",
                   help="what the gate loss sees: the Gumbel-Sigmoid samples m (the paper), or the noise-free "
                        "probabilities sigmoid(logit), whose gradient does not vanish where the samples saturate")
    p.add_argument("--gate-lambda", type=float, default=4.0)
    p.add_argument("--gate-target", type=float, default=0.25, help="g*: target fraction of fine regions")
    p.add_argument("--gbas-sigma", type=float, default=0.1)
    p.add_argument("--gbas-ctr-init", action=argparse.BooleanOptionalAction, default=True,
                   help="initialise the GBaS priors higher at the centre (paper default; off for uncentred data)")
    p.add_argument("--gate-start-epoch", type=int, default=0,
                   help="epochs before the gate trains; meanwhile random masks (fine rate ~U(g*, 1) per image) "
                        "make a from-scratch backbone robust to mixed scales, like the pretrained ones the paper starts from")
    p.add_argument("--opt", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gate-lr", type=float, default=None,
                   help="learning rate of the gate and the GBaS priors (default: --lr, as in the paper)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--gate-warmup-epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/msvit", help="checkpoint and metrics folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last complete checkpoint, exactly as if never stopped")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (deletes it)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit; for smoke runs)")
    args = p.parse_args(argv)
    check_train_flags(p, args)
    if args.shift and args.data != DIGITS:
        p.error(f"--shift needs --data {DIGITS} (the digits' boxes keep them in frame)")
    return args


def setup_distributed(device_arg: str):
    """(device, rank, world) from torchrun's environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def model_config(args, classes, bundle) -> dict:
    kwargs = {**json.loads(args.model_kwargs), "num_classes": len(classes), "img_size": args.image_size}
    msvit_kwargs = {"coarse_patch_size": args.coarse_patch, "hidden": args.gate_hidden, "init_logit": args.gate_init_logit}
    return {"timm": {"name": args.model, "kwargs": kwargs}, "msvit": msvit_kwargs,
            "data": {"name": args.data, "image_size": list(bundle.image_size), "mean": list(bundle.mean),
                     "std": list(bundle.std), "classes": [str(c) for c in classes], "digit_scale": args.digit_scale,
                     "seed": args.seed}}


def make_model(args, config):
    if not (args.pretrained or args.hub_pretrained):
        return build_model(config)
    from .timm_compat import from_timm

    kwargs = dict(config["timm"]["kwargs"], pretrained=True)
    if not args.pretrained:
        return from_timm(config["timm"]["name"], timm_kwargs=kwargs, **config["msvit"])
    kwargs["pretrained_cfg_overlay"] = {"file": str(args.pretrained)}
    try:
        return from_timm(config["timm"]["name"], timm_kwargs=kwargs, **config["msvit"])
    except Exception as error:  # timm and torch raise many types for an unreadable or foreign file
        raise SystemExit(f"msvit train: --pretrained {args.pretrained}: cannot load it as {config['timm']['name']} "
                         f"weights ({type(error).__name__}: {str(error)[:300]})") from error


def make_gate_loss(args, grid):
    if args.gate_loss == "gbas":
        return GBaSLoss(grid, args.gate_target, sigma=args.gbas_sigma, ctr_init=args.gbas_ctr_init,
                        gather=dist.is_initialized())
    if args.gate_loss == "bas":
        return lambda m: bas_loss(m, args.gate_target, gather=dist.is_initialized())
    if args.gate_loss in ("l0", "l0-two-sided"):
        return lambda m: l0_loss(m, args.gate_target, two_sided=args.gate_loss == "l0-two-sided")
    return None


def warmup_cosine(warmup_steps: float, total_steps: int, start_step: int = 0):
    """LR factor: 0 before ``start_step``, linear warm-up over ``warmup_steps``, then cosine to 0."""
    def factor(step: int) -> float:
        if step < start_step:
            return 0.0
        if step < start_step + warmup_steps:
            return (step - start_step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(args, model, gate_loss, steps_per_epoch: int):
    gate_params = list(model.gate.parameters()) + (list(gate_loss.parameters()) if isinstance(gate_loss, nn.Module) else [])
    gate_ids = {id(p) for p in gate_params}
    backbone = [p for p in model.parameters() if id(p) not in gate_ids]
    gate_lr = args.lr if args.gate_lr is None else args.gate_lr
    groups = [{"params": backbone}, {"params": gate_params, "weight_decay": 0.0, "lr": gate_lr}]
    if args.opt == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, [
        warmup_cosine(args.warmup_epochs * steps_per_epoch, total),
        warmup_cosine(args.gate_warmup_epochs * steps_per_epoch, total, args.gate_start_epoch * steps_per_epoch),
    ])
    return opt, schedule


def optimizer_step(loss, model: nn.Module, opt, schedule, clip_grad: float) -> None:
    """Backward, optional gradient-norm clipping, optimizer and schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    opt.step()
    schedule.step()


def random_masks(batch: int, n_regions: int, target: float, device) -> torch.Tensor:
    """bool [B, Nc]: each image's regions fine with a probability drawn uniformly in [target, 1]."""
    rate = torch.empty(batch, 1, device=device).uniform_(target, 1.0)
    return torch.rand(batch, n_regions, device=device) < rate


def gate_loss_input(args, decision) -> torch.Tensor:
    """float32 [B, Nc]: the soft samples m, or sigmoid(logits) with --gate-loss-input probs."""
    return (torch.sigmoid(decision.logits) if args.gate_loss_input == "probs" else decision.soft).float()


def after_gate_mode(args, epoch: int) -> bool:
    """True once the --gate-mode-epochs that follow --gate-start-epoch are over."""
    return args.gate_mode_epochs > 0 and epoch >= args.gate_start_epoch + args.gate_mode_epochs


def train(args) -> dict:
    """Run the training described by ``args``; returns the last epoch's metrics."""
    launched = time.perf_counter()
    device, rank, world = setup_distributed(args.device)
    main_process = rank == 0
    torch.manual_seed(args.seed + rank)
    out = Path(args.out)
    checkpoint = run_folder.prepare(out, args.resume, args.overwrite, rank, world, device)
    bundle = build_data(args.data, args.image_size, args.crop, args.hflip, args.train_size, args.val_size,
                        args.seed, main_process, digit_scale=args.digit_scale, shift=args.shift)
    config = model_config(args, bundle.classes, bundle)
    model = make_model(args, config).to(device).train()
    coarse = model.tokenizer.coarse_patch
    grid = (args.image_size // coarse, args.image_size // coarse)
    n_regions = grid[0] * grid[1]
    gate_loss = make_gate_loss(args, grid)
    if isinstance(gate_loss, nn.Module):
        gate_loss.to(device)
    train_loader, sampler, val_loader = loaders(bundle, args.batch_size, args.workers, world > 1, args.seed)
    check_batches(train_loader, args.batch_size, world)
    opt, schedule = make_optimizer(args, model, gate_loss, len(train_loader))
    start_epoch, step, rows = 0, 0, []
    if checkpoint is not None:
        start_epoch, step, rows = resume_state.restore(checkpoint, model, opt, schedule, gate_loss,
                                                       train_loader.generator, args, rank, world)
        launched -= rows[-1].get("wall_seconds", 0.0) if rows else 0.0  # the clock counts the whole run
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    amp = args.amp and device.type == "cuda"
    metrics = rows[-1] if rows else {}
    if start_epoch >= args.epochs and main_process:
        tqdm.write(f"{out} already holds all {start_epoch} epochs; raise --epochs to train on")
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        pre_gate = epoch < args.gate_start_epoch
        mode = args.mode if pre_gate or args.gate_mode is None or after_gate_mode(args, epoch) else args.gate_mode
        started = time.perf_counter()
        sums = {k: torch.zeros((), device=device) for k in ("loss", "task", "gate", "fine", "tokens")}
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", disable=not main_process)
        for n, (images, labels) in enumerate(bar, 1):
            images = normalize(images.to(device, non_blocking=True), bundle.mean, bundle.std)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out_ = net(images, mode=mode, return_gate=True, mask=random_masks(len(images), n_regions, args.gate_target, device) if pre_gate else None)
                task = F.cross_entropy(out_.logits.float(), labels, label_smoothing=args.smoothing)
            use_gate_loss = gate_loss is not None and out_.gate.soft is not None
            gate = gate_loss(gate_loss_input(args, out_.gate)) if use_gate_loss else task.new_zeros(())
            loss = task + args.gate_lambda * gate
            optimizer_step(loss, model, opt, schedule, args.clip_grad)
            step += 1
            batch = {"loss": loss, "task": task, "gate": gate,
                     "fine": out_.gate.hard.float().mean(), "tokens": out_.tokens.float().mean()}
            for k, v in batch.items():
                sums[k] += v.detach()  # summed on the device: no host sync per step
            if n % 20 == 0:
                bar.set_postfix(loss=f"{sums['loss'].item() / n:.3f}", fine=f"{sums['fine'].item() / n:.2f}")
            if stop_early(args, step, n, len(train_loader)):
                break
        train_time = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "step": step, "mode": mode, "gate_trains": not pre_gate, **{f"train_{k}": v.item() / n for k, v in sums.items()},
                   "lr": schedule.get_last_lr()[0], "gate_lr": schedule.get_last_lr()[1], "epoch_seconds": train_time}
        if main_process:
            evaluation = evaluate(model, val_loader, bundle.mean, bundle.std, device, boxes=bundle.val_boxes)
            metrics.update({f"val_{k}": v for k, v in evaluation.items()})
            metrics["wall_seconds"] = time.perf_counter() - launched  # data generation and evaluation included
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        rows.append(metrics)
        save_epoch(out, epoch, model, config, save_checkpoint, complete=n == len(train_loader), step=step, opt=opt,
                   schedule=schedule, gate_loss=gate_loss, generator=train_loader.generator, rows=rows, args=args,
                   rank=rank, world=world)
        if args.max_steps and step >= args.max_steps:
            break
    if world > 1:
        dist.destroy_process_group()
    return metrics


def save_epoch(out, epoch, model, config, save, *, complete, step, opt, schedule, gate_loss, generator, rows, args,
               rank, world) -> None:
    """Every rank: gather the RNG states; rank 0 writes the epoch's checkpoint; all wait for it."""
    rng = resume_state.gather(resume_state.rng_state(generator), world)
    if rank == 0:
        state = resume_state.train_state(epoch=epoch + 1, step=step, complete=complete, opt=opt, schedule=schedule,
                                         gate_loss=gate_loss, rng=rng, rows=rows, args=args, world=world)
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
        raise SystemExit(f"msvit train: --batch-size {batch_size} is larger than the training set "
                         f"({len(train_loader.dataset)} images{f' over {world} processes' if world > 1 else ''}); "
                         "incomplete batches are dropped, so an epoch would have no step")


def main(argv=None) -> None:
    from . import train_segmentation  # imported here: it builds on this module

    task, argv = train_segmentation.split_task(argv)  # --task segmentation: see msvit/train_segmentation.py
    try:
        if task == "segmentation":
            return train_segmentation.main(argv)
        train(parse_args(argv))
    except (run_folder.RunFolderError, ConfigError) as error:  # the user's folder or files: a message, no traceback
        raise SystemExit(f"msvit train: {error}") from None


if __name__ == "__main__":
    main()
