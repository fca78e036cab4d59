"""The scale-selection gate (Sections 2.1, 4.1, Appendix C.3).

A 4-layer MLP reads each coarse region's pixels and outputs one logit: the log-odds that the
region is kept at the FINE scale. Training samples a Gumbel-Sigmoid (temperature 0.3) and uses the
straight-through estimator; evaluation thresholds the logit at 0, or keeps the top-k regions fine
per image when a token budget is given.
"""
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvit_kernels.reference import patchify

Budget = Union[int, float, None]


class GateDecision(NamedTuple):
    """What the gate decided for a batch.

    logits: ``[B, Nc]`` float or None (mask given by the caller); soft: ``[B, Nc]`` in [0, 1], the
    relaxed outputs m that the gate losses constrain (None when the caller gave the mask);
    hard: bool ``[B, Nc]``, True = fine; st: ``[B, Nc]`` float equal to ``hard`` in the forward
    pass and carrying the soft outputs' gradient (straight-through).
    """

    logits: Optional[Tensor]
    soft: Optional[Tensor]
    hard: Tensor
    st: Tensor


def gumbel_sigmoid(logits: Tensor, temperature: float, noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Relaxed Bernoulli sample with straight-through hard decision.

    noise: optional logistic noise ``log u - log(1 - u)`` of logits' shape (for reproducibility).
    Returns ``(soft, hard, st)``; ``st = hard + (soft - soft.detach())`` is exactly ``hard`` in the
    forward pass (no rounding: the bracket is exactly 0).
    """
    if noise is None:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = soft > 0.5
    st = hard.to(soft.dtype) + (soft - soft.detach())
    return soft, hard, st


def budget_mask(logits: Tensor, budget: Budget) -> Tensor:
    """bool ``[B, Nc]`` keeping the ``budget`` highest-logit regions of each image fine.

    budget: an int number of fine regions per image, or a float fraction of the regions.
    """
    n_regions = logits.shape[1]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be an int (fine regions per image) or a float fraction, got {budget!r}")
    k = int(round(budget * n_regions)) if isinstance(budget, float) else budget
    if isinstance(budget, float) and not 0.0 <= budget <= 1.0:
        raise ValueError(f"a float budget is a fraction of the {n_regions} regions and must be in [0, 1], got {budget}")
    if not 0 <= k <= n_regions:
        raise ValueError(f"budget must be between 0 and {n_regions} fine regions per image, got {k}")
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, logits.topk(k, dim=1).indices, True)
    return mask


class MixedScaleGate(nn.Module):
    """Per-region 4-layer MLP with a learned position embedding added after the first layer.

    Args:
        region_size: coarse patch size S_c in pixels.
        grid: the coarse grid (h, w) the position embedding is learned at; other grids resample it
            bilinearly, like ViT position embeddings.
        hidden: MLP width. The default 106 puts the gate at 0.017 GMACs for ViT-S/16,32 at 224px
            (49 regions of 3x32x32 pixels: 49 * (3072*106 + 2*106^2 + 106) = 17.06 MMACs), the cost
            the paper reports.
        init_logit: bias of the last layer. 3 starts every region fine at eval (logit > 0) and 95% of
            the training samples fine, while leaving the Gumbel-Sigmoid unsaturated enough to learn:
            at 5, sigmoid((5 + noise) / 0.3) has ~15x less gradient and the gate barely moves.
    """

    def __init__(self, region_size: int, grid: Tuple[int, int], in_chans: int = 3, hidden: int = 106,
                 init_logit: float = 3.0, temperature: float = 0.3):
        super().__init__()
        self.region_size = region_size
        self.grid = tuple(grid)
        self.temperature = temperature
        in_features = in_chans * region_size * region_size
        self.fc1 = nn.Linear(in_features, hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden, *self.grid))
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.fc4 = nn.Linear(hidden, 1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Small last-layer weights so the initial logits sit near init_logit for every region.
        nn.init.normal_(self.fc4.weight, std=1e-3)
        nn.init.constant_(self.fc4.bias, init_logit)

    def macs_per_region(self) -> int:
        """Multiply-accumulates to gate one region (the position-embedding add is not a MAC)."""
        return sum(layer.in_features * layer.out_features for layer in (self.fc1, self.fc2, self.fc3, self.fc4))

    def position_embedding(self, grid: Tuple[int, int]) -> Tensor:
        """``[h*w, hidden]`` gate position embedding for a coarse grid."""
        pos = self.pos_embed
        if tuple(grid) != self.grid:
            pos = F.interpolate(pos, size=tuple(grid), mode="bilinear", align_corners=False, antialias=False)
        return pos.flatten(2).transpose(1, 2)[0]

    def forward(self, images: Tensor) -> Tensor:
        """images ``[B, C, H, W]`` (H, W multiples of region_size) -> logits ``[B, Nc]``."""
        grid = (images.shape[-2] // self.region_size, images.shape[-1] // self.region_size)
        regions = patchify(images, self.region_size)
        h = F.gelu(self.fc1(regions) + self.position_embedding(grid))
        h = F.gelu(self.fc2(h))
        h = F.gelu(self.fc3(h))
        return self.fc4(h).squeeze(-1)

    def decide(self, images: Tensor, sample: bool, budget: Budget = None, noise: Optional[Tensor] = None) -> GateDecision:
        """Hard decisions for a batch: sampled with ``sample`` (training), else thresholded at logit 0
        or, with a ``budget``, the top-k regions of each image (a budget always wins over sampling)."""
        logits = self(images)
        if sample and budget is None:
            soft, hard, st = gumbel_sigmoid(logits, self.temperature, noise)
            return GateDecision(logits, soft, hard, st)
        hard = budget_mask(logits, budget) if budget is not None else logits > 0
        return GateDecision(logits, torch.sigmoid(logits), hard, hard.to(logits.dtype))

