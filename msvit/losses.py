"""Gate sparsity losses of MSViT (Section 2.2, Eq. 7-9; Appendix C.3).

All losses take the SOFT gate outputs ``m``: float ``[B, Nc]`` in [0, 1], the probability that a
coarse region is kept at FINE scale (raster order over the coarse grid), taken before the
straight-through estimator. ``target`` is g*, the desired fraction of fine regions, in (0, 1).

Batch-shaping (BaS) follows the authors' released code (Qualcomm-AI-research/batchshaping):
the values of one distribution are sorted, the empirical CDF of the k-th smallest of N values is
the constant k / (N + 1) (no gradient), and the gradient flows through the prior's CDF evaluated
at the sorted values. One distribution's term is the MEAN over its N values of the squared CDF
difference (a Cramer-von Mises statistic, in [0, 1)); several distributions are averaged.
Losses are computed in float32 (float64 stays float64) so that AMP does not quantise the CDFs.

Past two scales (``msvit.models.tree_gate.TreeGate``) the losses are applied to
``tree_gate.finest_share(soft, tree)``: float ``[B, N_0]``, the soft weight of each FINEST cell
(the product of the split probabilities along its path), so g* is the fraction of the image
covered by finest tokens and a GBaS grid is the finest grid. With two scales nothing changes.
"""

import math
from typing import Callable, NamedTuple, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["l0_loss", "bas_loss", "GBaSLoss", "GBaSTerms", "relaxed_bernoulli_cdf", "centre_prior"]

EPS = 1e-3  # clamp for x and mu before logit, as in the authors' code


def _check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise ValueError(f"target (g*, the fraction of fine regions) must be a number in (0, 1), got {target!r}")
    return float(target)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_m(m) -> Tensor:
    if not isinstance(m, Tensor):
        raise TypeError(f"m must be a torch.Tensor of soft gate outputs [B, Nc], got {type(m).__name__}")
    if m.dim() != 2:
        raise ValueError(f"m must have shape [B, Nc] (soft gate outputs per coarse region), got {tuple(m.shape)}")
    if not m.is_floating_point():
        raise ValueError(f"m must be a float tensor of probabilities in [0, 1], got {m.dtype}")
    if m.numel() == 0:
        raise ValueError(f"m must not be empty, got shape {tuple(m.shape)}")
    return m if m.dtype == torch.float64 else m.float()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate [B_r, Nc] over ranks along dim 0 (B_r may differ); backward returns each rank
    the sum over ranks of the gradient w.r.t. its own rows. Written with all_gather + all_reduce,
    which every backend has: torch.distributed.nn.functional.all_gather is deprecated in torch
    2.14 and its gloo backward (all_to_all) aborted the process on CPU."""

    @staticmethod
    def forward(ctx, m: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.long, device=m.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([m.shape[0]], dtype=torch.long, device=m.device))
        sizes = [int(s) for s in sizes]
        padded = m.new_zeros((max(sizes),) + tuple(m.shape[1:]))
        padded[: m.shape[0]] = m
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank computed the same loss: this sums their gradients
        return grad[ctx.start : ctx.stop]


def _gather(m: Tensor, gather: bool) -> Tensor:
    """Concatenate ``m`` [B, Nc] over all DDP ranks along the batch, keeping the gradient.

    Every rank then computes the same loss on the global batch; the backward sums the ranks'
    gradients into each local slice (world_size x dL/dm), and DDP's gradient averaging divides
    that back, so the gate receives exactly the gradient of the global-batch loss. Ranks may hold
    different B. A no-op without an initialised process group or with one rank.
    """
    if not (gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return m
    return _AllGatherWithGrad.apply(m)


def relaxed_bernoulli_cdf(x: Tensor, mu: Union[float, Tensor], temperature: float, eps: float = EPS) -> Tensor:
    """CDF of RelaxedBernoulli(mu, tau): ``sigmoid(tau * logit(x) - logit(mu))``.

    A sample is ``sigmoid((logit(mu) + L) / tau)`` with L ~ Logistic(0, 1), so P(X > 1/2) = mu.
    x: any shape; mu: float or a tensor broadcastable to x. x and mu are clamped to
    [eps, 1 - eps] so logit stays finite (values beyond get no gradient, as in the reference).
    """
    x = x.clamp(eps, 1.0 - eps)
    if isinstance(mu, Tensor):
        logit_mu = torch.logit(mu.clamp(eps, 1.0 - eps))
    else:
        mu = min(max(float(mu), eps), 1.0 - eps)
        logit_mu = math.log(mu / (1.0 - mu))
    return torch.sigmoid(temperature * torch.logit(x) - logit_mu)


def _shaping(values: Tensor, prior_cdf: Callable[[Tensor], Tensor]) -> Tensor:
    """Batch-shaping term of each row: values [R, N] -> [R] = mean_k (F(x_(k)) - k/(N+1))^2."""
    n = values.shape[-1]
    x_sorted, _ = torch.sort(values, dim=-1)  # sort is differentiable w.r.t. the values
    ecdf = torch.arange(1, n + 1, device=values.device, dtype=values.dtype) / (n + 1)
    return (prior_cdf(x_sorted) - ecdf).pow(2).mean(dim=-1)


def l0_loss(m: Tensor, target: float, two_sided: bool = False) -> Tensor:
    """L0 sparsity loss (Eq. 7): ``mean_b relu(mean_i m[b, i] - g*)``.

    The paper prints ``min(0, .)``, which has no gradient above the target and rewards ever
    sparser gates below it (a typo); the form used here is the intended hinge on each image's
    fine rate above g*. It is zero for images at or below g* and controls only the mean, not
    the spread (the static-pattern corner case of Fig. 3a).

    two_sided: ``|mean_{b,i} m - g*|`` instead, the batch's fine rate pinned at g* (not in the
    paper). The hinge has no gradient below g*, so a gate that overshoots into the saturated
    all-coarse corner of the Gumbel-Sigmoid stays there; with a from-scratch backbone on 2 CPU
    cores the hinge either lost to the task (all-fine) or collapsed the gate to 0.4% fine, by
    the loss weight (lambda 4 / 8, cluttered digits). Which regions are fine is still left to
    the task gradient: only the batch mean is pinned.

    m: float [B, Nc] in [0, 1]. Returns a float32 scalar (float64 for float64 input).
    """
    target = _check_target(target)
    m = _check_m(m)
    if two_sided:
        return (m.mean() - target).abs()
    return torch.relu(m.mean(dim=1) - target).mean()


def bas_loss(m: Tensor, target: float, temperature: float = 0.3, *, gather: bool = False, eps: float = EPS) -> Tensor:
    """Batch-shaping on the flattened gate outputs (Eq. 8), prior RelaxedBernoulli(g*, tau).

    All B * Nc values form one distribution, so positions may be constantly on or off (the
    corner case of Fig. 3c); see :class:`GBaSLoss` for the per-position version.

    m: float [B, Nc] in [0, 1]; gather: all-gather m over DDP ranks (with gradient) first.
    Returns a scalar in [0, 1): the mean squared difference between the prior's CDF and the
    empirical CDF k/(N+1) over the N = B * Nc sorted values.
    """
    target = _check_target(target)
    temperature = _check_positive("temperature", temperature)
    m = _gather(_check_m(m), gather)
    return _shaping(m.reshape(1, -1), lambda x: relaxed_bernoulli_cdf(x, target, temperature, eps))[0]


def centre_prior(grid: Tuple[int, int], target: float, lo: float = 0.01, hi: float = 0.99) -> Tensor:
    """Centre initialisation of the GBaS priors: inverse normalised distance to the image centre.

    Position (r, c) of an (h, w) grid has centre (r + 1/2, c + 1/2) in grid units; its distance d
    to the image centre (h/2, w/2) is normalised by the centre-to-image-corner distance, so
    ``1 - d / d_max`` is 1 at the centre and small but positive at the corner positions. The map
    is scaled by a factor found by bisection so that, after clamping into [lo, hi], its mean is
    ``target`` (exactly, up to float error). Returns float32 [h * w] in raster order.
    """
    h, w = grid
    lo, hi = min(lo, target / 2), max(hi, (1 + target) / 2)  # keep g* reachable after clamping
    r = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2
    c = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2
    d = torch.sqrt(r[:, None] ** 2 + c[None, :] ** 2).flatten()
    inv = 1.0 - d / math.hypot(h / 2, w / 2)
    a, b = 0.0, target / float(inv.min()) + 1.0  # mean(clamp(a*inv)) <= target <= mean(clamp(b*inv))
    for _ in range(60):  # monotone in the scale: bisection converges to float64 precision
        s = (a + b) / 2
        a, b = (s, b) if float((s * inv).clamp(lo, hi).mean()) < target else (a, s)
    return ((a + b) / 2 * inv).clamp(lo, hi).float()


class GBaSTerms(NamedTuple):
    positions: Tensor  # scalar: per-position batch-shaping terms, reduced over positions
    hyperprior: Tensor  # scalar: batch-shaping of the priors {theta_i} against N(g*, sigma^2)


class GBaSLoss(nn.Module):
    """Generalised batch-shaping loss (Eq. 9) with learned per-position priors.

    ``L = reduce_i BaS(m[:, i]; RB(theta_i, tau)) + BaS({theta_i}; Normal(g*, sigma))``

    Args:
        grid: coarse grid ``(h, w)`` or the number of positions Nc (an int Nc must be a perfect
            square when ``ctr_init`` is used, since the centre needs a 2-D layout).
        target: g* in (0, 1), the hyperprior's mean.
        sigma: the hyperprior's STANDARD DEVIATION (the paper calls it "variance"; the authors'
            code passes it as the std). As sigma -> 0 the hyperprior's optimum puts every
            theta_i at g*, which recovers per-position BaS with one shared RB(g*, tau) prior;
            large sigma lets positions drift to always-on/always-off (the flattened-BaS corner
            case). See :meth:`hyperprior_term` for why very small sigma needs priors near g*.
        temperature: tau of the Relaxed Bernoulli priors.
        ctr_init: initialise theta with :func:`centre_prior`; otherwise all theta_i = g*.
        reduction: "mean" (default, as the authors' code: a term's scale does not depend on Nc, so
            lambda transfers across resolutions) or "sum" (Eq. 9 as printed) over positions.
        gather: all-gather m over DDP ranks (with gradient) so the CDFs use the global batch.

    The priors are stored as logits in ``prior_logits`` (an nn.Parameter [Nc]); ``priors`` gives
    theta = sigmoid(prior_logits) in (0, 1). Give them to the optimiser with the gate and move the
    module to the gate's device. Under DDP without ``gather`` each rank's priors see a different
    local batch and drift apart unless their gradients are all-reduced (e.g. register the loss
    inside the DDP-wrapped module); with ``gather=True`` every rank gets the same prior gradient.
    """

    def __init__(
        self,
        grid: Union[int, Tuple[int, int]],
        target: float,
        sigma: float = 0.1,
        temperature: float = 0.3,
        ctr_init: bool = True,
        *,
        reduction: str = "mean",
        gather: bool = False,
        eps: float = EPS,
    ):
        super().__init__()
        self.target = _check_target(target)
        self.sigma = _check_positive("sigma", sigma)
        self.temperature = _check_positive("temperature", temperature)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction, self.gather, self.eps = reduction, bool(gather), float(eps)
        self.grid = self._parse_grid(grid, ctr_init)
        nc = self.grid[0] * self.grid[1]
        theta = centre_prior(self.grid, self.target) if ctr_init else torch.full((nc,), self.target)
        self.prior_logits = nn.Parameter(torch.logit(theta))

    @staticmethod
    def _parse_grid(grid, ctr_init: bool) -> Tuple[int, int]:
        if isinstance(grid, int) and not isinstance(grid, bool):
            if grid < 1:
                raise ValueError(f"grid must be a positive number of positions or (h, w), got {grid}")
            side = math.isqrt(grid)
            if side * side == grid:
                return side, side
            if ctr_init:
                raise ValueError(f"ctr_init needs a 2-D grid: pass grid=(h, w) instead of Nc={grid} (not a square)")
            return 1, grid
        if (
            isinstance(grid, (tuple, list))
            and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
        ):
            return int(grid[0]), int(grid[1])
        raise ValueError(f"grid must be an int Nc or a pair (h, w) of positive ints, got {grid!r}")

    @property
    def num_positions(self) -> int:
        return self.prior_logits.shape[0]

    @property
    def priors(self) -> Tensor:
        """theta: float32 [Nc] in (0, 1), raster order over the coarse grid."""
        return torch.sigmoid(self.prior_logits)

    def terms(self, m: Tensor) -> GBaSTerms:
        """Both parts of Eq. 9 for soft gate outputs m [B, Nc] (scalars, for logging)."""
        m = _check_m(m)
        if m.shape[1] != self.num_positions:
            raise ValueError(
                f"m has {m.shape[1]} positions per image but this GBaSLoss was built for "
                f"grid {self.grid} = {self.num_positions} positions (m: {tuple(m.shape)})"
            )
        if m.device != self.prior_logits.device:
            raise ValueError(
                f"m is on {m.device} but the GBaS priors are on {self.prior_logits.device}; "
                "move the loss with loss_fn.to(device)"
            )
        m = _gather(m, self.gather)
        theta = self.priors.to(m.dtype)
        tau, eps = self.temperature, self.eps
        cols = _shaping(m.t(), lambda x: relaxed_bernoulli_cdf(x, theta[:, None], tau, eps))  # [Nc]
        positions = cols.mean() if self.reduction == "mean" else cols.sum()
        return GBaSTerms(positions, self.hyperprior_term().to(m.dtype))

    def hyperprior_term(self) -> Tensor:
        """Batch-shaping of the Nc priors theta against Normal(g*, sigma): a scalar, gradient to
        the priors only. The Gaussian CDF saturates: a prior more than ~5 sigma from g* gets almost
        no pull, so keep sigma >= ~0.05 with ctr_init (whose priors span [0.01, 0.99])."""
        return _shaping(self.priors[None], lambda x: torch.special.ndtr((x - self.target) / self.sigma))[0]

    def forward(self, m: Tensor) -> Tensor:
        """m: soft gate outputs float [B, Nc] in [0, 1] -> scalar loss (float32; float64 stays)."""
        t = self.terms(m)
        return t.positions + t.hyperprior

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid}, target={self.target}, sigma={self.sigma}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, gather={self.gather}"
        )
