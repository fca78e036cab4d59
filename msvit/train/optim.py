"""Optimizer and learning-rate schedule of ``msvit train`` (Appendix C recipes).

Two parameter groups: the backbone (with weight decay) and the gate with its learned gate-loss
priors (no weight decay, ``--gate-lr``). Each group follows a cosine schedule with linear warm-up;
the gate's starts at ``--gate-start-epoch`` and warms up over ``--gate-warmup-epochs`` (C.3).
"""

import math

import torch
from torch import nn


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
    """(optimizer, schedule) for ``model`` (anything with a ``.gate``) and the gate loss's priors."""
    gate_params = list(model.gate.parameters()) + (
        list(gate_loss.parameters()) if isinstance(gate_loss, nn.Module) else []
    )
    gate_ids = {id(p) for p in gate_params}
    backbone = [p for p in model.parameters() if id(p) not in gate_ids]
    gate_lr = args.lr if args.gate_lr is None else args.gate_lr
    groups = [{"params": backbone}, {"params": gate_params, "weight_decay": 0.0, "lr": gate_lr}]
    if args.opt == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        [
            warmup_cosine(args.warmup_epochs * steps_per_epoch, total),
            warmup_cosine(args.gate_warmup_epochs * steps_per_epoch, total, args.gate_start_epoch * steps_per_epoch),
        ],
    )
    return opt, schedule


def optimizer_step(loss, model: nn.Module, opt, schedule, clip_grad: float) -> None:
    """Backward, optional gradient-norm clipping, optimizer and schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    opt.step()
    schedule.step()
