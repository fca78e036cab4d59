"""The scale-selection gate (Sections 2.1, 4.1, Appendix C.3).

A 4-layer MLP reads each coarse region's pixels and outputs one logit: the log-odds that the
region is kept at the FINE scale. Training samples a Gumbel-Sigmoid (temperature 0.3) and uses the
straight-through estimator; evaluation thresholds the logit at 0, or keeps the top-k regions fine
per image when a token budget is given.
"""

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvit.models.checks import check_mask
from msvit_kernels.dispatch import compute_dtype, use_triton
from msvit_kernels.gate_kernel import MAX_HIDDEN, fused_gate
from msvit_kernels.reference import gate_mlp_patches, gate_mlp_reference, gather_flat_patches_reference

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


def logistic_noise(like: Tensor) -> Tensor:
    """Logistic noise ``log u - log(1 - u)``, u ~ U(0, 1) clamped away from 0 and 1, of ``like``'s
    shape, dtype and device (one ``rand_like`` draw: both gate paths use it, so seeds reproduce)."""
    u = torch.rand_like(like).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def straight_through(soft: Tensor, hard: Tensor) -> Tensor:
    """``hard`` in value (exactly: the bracket is 0), the gradient of ``soft``."""
    return hard.to(soft.dtype) + (soft - soft.detach())


def gumbel_sigmoid(logits: Tensor, temperature: float, noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Relaxed Bernoulli sample with straight-through hard decision.

    noise: optional logistic noise ``log u - log(1 - u)`` of logits' shape (for reproducibility).
    Returns ``(soft, hard, st)``; ``st = hard + (soft - soft.detach())`` is exactly ``hard`` in the
    forward pass (no rounding: the bracket is exactly 0).
    """
    if noise is None:
        noise = logistic_noise(logits)
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = soft > 0.5
    return soft, hard, straight_through(soft, hard)


def budget_regions(budget: Budget, n_regions: int) -> int:
    """The number of fine regions per image a ``budget`` keeps (an int count, or a float fraction
    of the ``n_regions`` regions, rounded); every image of the batch keeps exactly that many."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be an int (fine regions per image) or a float fraction, got {budget!r}")
    if isinstance(budget, float) and not 0.0 <= budget <= 1.0:  # also refuses NaN, before it reaches int()
        raise ValueError(f"a float budget is a fraction of the {n_regions} regions and must be in [0, 1], got {budget}")
    k = int(round(budget * n_regions)) if isinstance(budget, float) else budget
    if not 0 <= k <= n_regions:
        raise ValueError(f"budget must be between 0 and {n_regions} fine regions per image, got {k}")
    return k


def budget_mask(logits: Tensor, budget: Budget) -> Tensor:
    """bool ``[B, Nc]`` keeping the ``budget`` highest-logit regions of each image fine.

    budget: an int number of fine regions per image, or a float fraction of the regions.
    Deterministic on every device: equal logits are taken in raster order (a stable sort, where
    ``topk`` leaves ties to the device), and a NaN logit counts as ``-inf`` (chosen last, as the
    threshold ``logit > 0`` leaves it coarse, and as ``tree_budget_mask`` ranks it), where
    ``topk`` would rank it above every number. +inf (the entropy gate's non-finite region) is
    chosen first. For two scales this is ``tree_budget_mask``'s order.
    """
    k = budget_regions(budget, logits.shape[1])
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if k > 0:
        scores = torch.where(torch.isnan(logits), float("-inf"), logits)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        mask.scatter_(1, order[:, :k], True)
    return mask


def list_budget_mask(logits: Tensor, image: Tensor, local: Tensor, counts, budget: Budget) -> Tensor:
    """``budget_mask`` of a list of images at once: logits ``[sum N_b]`` (image after image), image
    and local: each entry's image and index in it; image b keeps its ``budget_regions(budget, N_b)``
    highest logits (an int budget larger than an image's N_b is refused naming it). No host read."""
    keep = torch.tensor(list_budget_regions(budget, counts), device=logits.device)
    return ranked_mask(logits, image, local, keep, (len(counts), max(counts)))


def list_budget_regions(budget: Budget, counts) -> list:
    """``budget_regions`` of every image of a list (``counts``: each image's regions), naming the
    image a budget does not fit."""
    keep = []
    for b, n in enumerate(counts):
        try:
            keep.append(budget_regions(budget, n))
        except ValueError as error:
            raise ValueError(f"images[{b}]: {error}") from None
    return keep


def ranked_mask(logits: Tensor, image: Tensor, local: Tensor, keep: Tensor, shape) -> Tensor:
    """``list_budget_mask`` given each image's count ``keep`` (int64 ``[rows]``): the entries are
    ranked per image in a ``shape`` = ``(rows, columns)`` padding of ``-inf`` (a captured list
    runner passes fixed sizes, with its padding regions in a row of their own). No host read."""
    padded = logits.new_full(shape, float("-inf"))
    padded[image, local] = logits.detach()
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < keep[:, None])[image, local]


def mask_decision(images: Tensor, mask: Tensor, region_size: int) -> GateDecision:
    """A caller's ``mask`` (bool ``[B, Nc]``, checked against the region grid of ``images``) as a
    decision without gate outputs: every gate's ``decision`` when it is given a mask."""
    check_mask(mask, images.shape[0], (images.shape[-2] // region_size, images.shape[-1] // region_size))
    mask = mask.to(images.device)
    return GateDecision(None, None, mask, mask.to(images.dtype))


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

    Attribute ``kernels`` (``"auto" | "triton" | "reference"``, set by ``MSViT.kernels``): the fused
    Triton gate (``msvit_kernels.gate_kernel``) or the torch one; auto = Triton on CUDA.
    """

    def __init__(
        self,
        region_size: int,
        grid: Tuple[int, int],
        in_chans: int = 3,
        hidden: int = 106,
        init_logit: float = 3.0,
        temperature: float = 0.3,
    ):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"gate hidden width must be a positive int, got {hidden!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(
                f"gate temperature must be a finite number > 0 (it divides the logits of the "
                f"Gumbel-Sigmoid), got {temperature!r}"
            )
        if isinstance(init_logit, bool) or not isinstance(init_logit, (int, float)) or not math.isfinite(init_logit):
            raise ValueError(f"gate init_logit must be a finite number, got {init_logit!r}")
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
        self.kernels = "auto"

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
        """images ``[B, C, H, W]`` -> logits ``[B, Nc]`` of the whole regions (a border narrower
        than a region is not gated: its fine cells always stay fine)."""
        if self._fused(images):
            return self._fused_gate(images).logits
        return gate_mlp_reference(self.whole_regions(images), self.region_size, *self._weights(images))

    def list_positions(self, grids) -> Tensor:
        """``[sum Nc_b, hidden]``: every image's position table at its coarse grid (``grids``),
        image after image; each distinct grid's table is built once."""
        tables = {grid: self.position_embedding(grid) for grid in dict.fromkeys(grids)}
        return torch.cat([tables[grid] for grid in grids])

    def list_logits(self, region_pixels: Tensor, grids) -> Tensor:
        """Logits ``[sum Nc_b]`` of a list of images in one MLP call: region_pixels ``[sum Nc_b, C*S*S]``
        (every image's whole regions in raster order, image after image), grids: each image's coarse
        grid (its position table is built once per distinct grid)."""
        return gate_mlp_patches(region_pixels, *self._weights_at(self.list_positions(grids)))

    def flat_logits(self, pixels: Tensor, regions: Tensor, pos: Tensor, chans: int) -> Tensor:
        """``list_logits`` with the pixels read from a list's flat pixel buffer ``pixels`` (each
        ``[C, H_b, W_b]`` image flattened in turn) and the position rows given: regions int64
        ``[4, N]`` their rows of ``TreeBatch.node_pixels``, pos ``[N, hidden]`` (``list_positions``,
        padded by a captured list runner, docs/design.md section 19). Full-resolution pixels."""
        regions = torch.cat([regions[:3], torch.ones_like(regions[3:])])
        every = torch.arange(regions.shape[1], device=pixels.device)
        region_pixels = gather_flat_patches_reference(pixels, regions, every, self.region_size, chans, 1)
        return gate_mlp_patches(region_pixels, *self._weights_at(pos))

    def whole_regions(self, images: Tensor) -> Tensor:
        """The view of ``images`` covered by whole regions (all of it for a multiple of region_size)."""
        size = self.region_size
        return images[..., : images.shape[-2] // size * size, : images.shape[-1] // size * size]

    def decide(
        self, images: Tensor, sample: bool, budget: Budget = None, noise: Optional[Tensor] = None
    ) -> GateDecision:
        """Hard decisions for a batch: sampled with ``sample`` (training), else thresholded at logit 0
        or, with a ``budget``, the top-k regions of each image (a budget always wins over sampling).
        noise: logistic noise ``[B, Nc]`` for the sample (default: a fresh ``logistic_noise`` draw)."""
        if sample and budget is None:
            if self._fused(images):  # the sample comes out of the gate kernel itself
                out = self._fused_gate(images, noise, sample=True)
                return GateDecision(out.logits, out.soft, out.hard, straight_through(out.soft, out.hard))
            logits = self(images)
            soft, hard, st = gumbel_sigmoid(logits, self.temperature, noise)
            return GateDecision(logits, soft, hard, st)
        logits = self(images)
        hard = budget_mask(logits, budget) if budget is not None else logits > 0
        return GateDecision(logits, torch.sigmoid(logits), hard, hard.to(logits.dtype))

    def decision(self, images: Tensor, mask: Optional[Tensor], *, sample: bool, budget: Budget = None) -> GateDecision:
        """The caller's ``mask`` (bool ``[B, Nc]``, checked against this batch's region grid) as a
        decision without gate outputs, or, when it is None, the gate's own ``decide``."""
        if mask is None:
            return self.decide(images, sample=sample, budget=budget)
        return mask_decision(images, mask, self.region_size)

    def _weights(self, images: Tensor) -> Tuple[Tensor, ...]:
        """(w1, b1, pos, w2, b2, w3, b3, w4, b4) for this batch's coarse grid."""
        grid = (images.shape[-2] // self.region_size, images.shape[-1] // self.region_size)
        return self._weights_at(self.position_embedding(grid))

    def _weights_at(self, pos: Tensor) -> Tuple[Tensor, ...]:
        return (
            self.fc1.weight,
            self.fc1.bias,
            pos,
            self.fc2.weight,
            self.fc2.bias,
            self.fc3.weight,
            self.fc3.bias,
            self.fc4.weight,
            self.fc4.bias,
        )

    def _fused(self, images: Tensor) -> bool:
        fallback = ""
        if images.requires_grad:
            fallback = "the fused gate gives no gradient to pixels, and these require one"
        elif self.fc1.out_features > MAX_HIDDEN:
            fallback = f"the fused gate supports hidden <= {MAX_HIDDEN}, this one has {self.fc1.out_features}"
        return use_triton(self.kernels, images, fallback)

    def _fused_gate(self, images: Tensor, noise: Optional[Tensor] = None, sample: bool = False):
        """The Triton gate in the compute dtype (autocast's when on); with ``sample``, draws the
        noise the torch path would draw (same shape, dtype and device) unless it is given."""
        dtype = compute_dtype(images)
        if sample and noise is None:
            grid = (images.shape[-2] // self.region_size, images.shape[-1] // self.region_size)
            noise = logistic_noise(images.new_empty(images.shape[0], grid[0] * grid[1], dtype=dtype))
        return fused_gate(
            self.whole_regions(images).to(dtype),
            self.region_size,
            *(w.to(dtype) for w in self._weights(images)),
            noise=noise,
            temperature=self.temperature,
        )
