"""How the gate trains: its loss (Eq. 6: L0, BaS or GBaS), what that loss sees, the random
mixed-scale masks before ``--gate-start-epoch``, and the execution mode of each epoch."""

import torch
import torch.distributed as dist

from msvit.losses import GBaSLoss, bas_loss, l0_loss
from msvit.models.tree_gate import finest_share


def make_gate_loss(args, grid):
    """The gate loss of ``--gate-loss`` over a coarse ``grid`` (rows, cols), or None."""
    if args.gate_loss == "gbas":
        return GBaSLoss(
            grid, args.gate_target, sigma=args.gbas_sigma, ctr_init=args.gbas_ctr_init, gather=dist.is_initialized()
        )
    if args.gate_loss == "bas":
        return lambda m: bas_loss(m, args.gate_target, gather=dist.is_initialized())
    if args.gate_loss in ("l0", "l0-two-sided"):
        return lambda m: l0_loss(m, args.gate_target, two_sided=args.gate_loss == "l0-two-sided")
    return None


def random_masks(batch: int, n_regions: int, target: float, device) -> torch.Tensor:
    """bool [B, Nc]: each image's regions fine with a probability drawn uniformly in [target, 1]."""
    rate = torch.empty(batch, 1, device=device).uniform_(target, 1.0)
    return torch.rand(batch, n_regions, device=device) < rate


def gate_loss_input(args, decision, tree=None) -> torch.Tensor:
    """float32 [B, Nc]: the soft samples m, or sigmoid(logits) with --gate-loss-input probs.

    tree: the batch's ``ScaleTree`` for a model with more than two scales (``TreeGate``): the input
    is then ``finest_share`` of those values, float32 [B, N_0] over the finest grid (the losses
    constrain the fraction of finest tokens). None, or a two-scale tree, changes nothing."""
    values = torch.sigmoid(decision.logits) if args.gate_loss_input == "probs" else decision.soft
    if tree is not None and tree.scales > 2:
        values = finest_share(values, tree)
    return values.float()


def after_gate_mode(args, epoch: int) -> bool:
    """True once the --gate-mode-epochs that follow --gate-start-epoch are over."""
    return args.gate_mode_epochs > 0 and epoch >= args.gate_start_epoch + args.gate_mode_epochs


def epoch_mode(args, epoch: int, pre_gate: bool) -> str:
    """The execution mode of ``epoch``: ``--gate-mode`` while the gate trains in it, else ``--mode``."""
    if pre_gate or args.gate_mode is None or after_gate_mode(args, epoch):
        return args.mode
    return args.gate_mode
