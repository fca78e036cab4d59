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


def gate_geometry(tokenizer, image_size: int):
    """(the grid the gate loss sees, decisions per image, the ``ScaleTree`` or None) of a run's
    square images: the coarse grid and its regions for two scales; with more, the finest grid
    (the loss sees the finest share, ``fine_share``) and the splittable nodes."""
    if getattr(tokenizer, "scales", 2) > 2:  # a mixed-scale Swin has two
        fine_grid = (image_size // tokenizer.fine_patch,) * 2
        tree = tokenizer.tree(fine_grid)
        return fine_grid, tree.decisions, tree
    grid = (image_size // tokenizer.coarse_patch,) * 2
    return grid, grid[0] * grid[1], None


def fine_share(values: torch.Tensor, tree=None) -> torch.Tensor:
    """What "fine" means for the gate loss and the logs: the decisions themselves for two scales
    (``[B, Nc]``, fine regions); with more, each finest cell's token weight ``[B, N_0]`` (1 where a
    finest token covers it; for soft values the product of the split probabilities on its path),
    whose mean is the share of the image at the finest scale (docs/design.md section 10)."""
    if tree is None or tree.scales <= 2:
        return values
    return tree.token_weights(values)[0] if values.dtype == torch.bool else finest_share(values, tree)


def random_masks(batch: int, n_regions: int, target: float, device) -> torch.Tensor:
    """bool [B, Nc]: each image's regions fine with a probability drawn uniformly in [target, 1]
    (more than two scales: ``n_regions`` = D, each node split with that probability)."""
    rate = torch.empty(batch, 1, device=device).uniform_(target, 1.0)
    return torch.rand(batch, n_regions, device=device) < rate


def gate_loss_input(args, decision, tree=None) -> torch.Tensor:
    """float32 [B, Nc]: the soft samples m, or sigmoid(logits) with --gate-loss-input probs; with
    more than two scales, their ``fine_share`` [B, N_0]."""
    values = torch.sigmoid(decision.logits) if args.gate_loss_input == "probs" else decision.soft
    return fine_share(values, tree).float()


def after_gate_mode(args, epoch: int) -> bool:
    """True once the --gate-mode-epochs that follow --gate-start-epoch are over."""
    return args.gate_mode_epochs > 0 and epoch >= args.gate_start_epoch + args.gate_mode_epochs


def epoch_mode(args, epoch: int, pre_gate: bool) -> str:
    """The execution mode of ``epoch``: ``--gate-mode`` while the gate trains in it, else ``--mode``."""
    if pre_gate or args.gate_mode is None or after_gate_mode(args, epoch):
        return args.mode
    return args.gate_mode
