"""Patch entropy in Triton: the Shannon entropy of each patch's grey-level histogram (APT's gate).

APT (Choudhury et al., *Accelerating Vision Transformers with Adaptive Patch Sizes*, ICLR 2026)
keeps a region coarse when its pixels carry little information: the entropy of the region's
grey-level histogram is below a threshold. No parameters, no training. This op computes that
entropy for every ``patch x patch`` cell of every image, at ONE patch size per call: a gate with
more scales calls it once per scale with that scale's threshold.

The binning, identical in this kernel and in ``reference.entropy_reference`` (same fp32 operations
in the same order, see below), for a normalised input ``z`` with normalisation ``mean``, ``std``:

1. un-normalise, per channel:     ``x = z * std + mean``        (pixels in [0, 1])
2. grey (BT.601 luma, with the weights APT's code uses):
   ``g = (0.2989 * x_r + 0.587 * x_g) + 0.114 * x_b``; a one-channel image is its own grey
3. bin: ``clamp(floor(g * (255 * bins / 256)), 0, bins - 1)``, i.e. ``floor(v * bins / 256)`` of the
   intensity ``v = 255 g``: with 256 bins, the 8-bit intensity; APT's code uses 512 half-level
   bins, the default here (``DEFAULT_BINS``)
4. ``H = -sum_i p_i log2 p_i`` over the non-empty bins, ``p_i = count_i / patch^2``, in bits.

Exact binning needs every operation rounded as torch rounds it: a fused multiply-add rounds once
where torch's two kernels round twice, and a pixel on a bin edge would then move to the next bin
(the entropy moves by ~0.01 bit, far more than the 1e-5 the tests allow). So GPU launches compile
with ``enable_fp_fusion=False``; the kernel does a few flops per pixel it loads, which is not what
bounds its time.

One program per patch: it streams the patch's pixels in ``BLOCK_P`` slices and accumulates a
``[bins]`` int32 histogram with ``tl.histogram`` (Triton counts in shared memory: 4 bytes per bin,
2 KB at 512 bins; the compile report shows every target clean up to 1024 bins and 64 px patches);
nothing goes through global memory but the pixels and one fp32 entropy (and one decision byte) per
patch. The entropy is a hard
threshold's input, not differentiable: the op has no autograd formula and detaches its input.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._triton import INTERPRET, TritonKernel, tl, triton, triton_support
from .reference import ENTROPY_LUMA

DEFAULT_BINS = 512  # APT's released code: 512 bins of half an intensity level
MIN_BINS, MAX_BINS = 2, 1024  # one program holds the whole histogram

if triton is not None:

    @triton.jit
    def _entropy_kernel(
        IMG, ENTROPY, FINE,
        n_coarse, grid_w, threshold, level_scale,
        mean_r, mean_g, mean_b, std_r, std_g, std_b, luma_r, luma_g, luma_b,
        stride_ib, stride_ic, stride_ih, stride_iw,
        PATCH: tl.constexpr, CHANNELS: tl.constexpr, BINS: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """One program: the entropy of patch ``program_id`` (image pid // n_coarse, raster cell
        pid % n_coarse) and, with HAS_THRESHOLD, the decision ``entropy > threshold``."""
        pid = tl.program_id(0)
        cell = pid % n_coarse
        y0 = (cell // grid_w) * PATCH
        x0 = (cell % grid_w) * PATCH
        base = IMG + (pid // n_coarse).to(tl.int64) * stride_ib + y0 * stride_ih + x0 * stride_iw

        hist = tl.zeros([BINS], dtype=tl.int32)
        for k0 in range(0, PATCH * PATCH, BLOCK_P):
            offs = k0 + tl.arange(0, BLOCK_P)
            valid = offs < PATCH * PATCH
            ptr = base + (offs // PATCH) * stride_ih + (offs % PATCH) * stride_iw
            grey = tl.load(ptr, mask=valid, other=0.0).to(tl.float32) * std_r + mean_r
            if CHANNELS == 3:
                green = tl.load(ptr + stride_ic, mask=valid, other=0.0).to(tl.float32) * std_g + mean_g
                blue = tl.load(ptr + 2 * stride_ic, mask=valid, other=0.0).to(tl.float32) * std_b + mean_b
                grey = (luma_r * grey + luma_g * green) + luma_b * blue
            level = tl.floor(grey * level_scale)
            level = tl.minimum(tl.maximum(level, 0.0), BINS - 1.0)
            # lanes past the patch go to bin 0 and are taken out below (a histogram mask is not in
            # every Triton this package supports)
            hist += tl.histogram(tl.where(valid, level.to(tl.int32), 0), BINS)
        padding = tl.cdiv(PATCH * PATCH, BLOCK_P) * BLOCK_P - PATCH * PATCH
        hist -= tl.where(tl.arange(0, BINS) == 0, padding, 0)

        p = hist.to(tl.float32) / (PATCH * PATCH)
        entropy = -tl.sum(p * tl.log2(tl.where(hist > 0, p, 1.0)), 0)  # an empty bin adds 0 * log2(1)
        tl.store(ENTROPY + pid, entropy)
        if HAS_THRESHOLD:
            tl.store(FINE + pid, (entropy > threshold).to(tl.uint8))


_ENTROPY = None if triton is None else TritonKernel(_entropy_kernel)  # the launcher fixes the tile


def _launch(images: Tensor, patch: int, mean: Sequence[float], std: Sequence[float], bins: int,
            threshold: Optional[float]) -> Tuple[Tensor, Tensor]:
    """Entropies fp32 ``[B, Nc]`` and decisions bool ``[B, Nc]`` (``[0]`` without a threshold)."""
    batch, chans, height, width = images.shape
    grid_w = width // patch
    n_coarse = (height // patch) * grid_w
    entropy = torch.empty(batch, n_coarse, dtype=torch.float32, device=images.device)
    fine = torch.empty((batch, n_coarse) if threshold is not None else (0,), dtype=torch.uint8, device=images.device)
    if batch * n_coarse == 0:
        return entropy, fine.view(torch.bool)
    # 1024 pixels x 3 channels over 4 warps: 24 values per thread (the interpreter pays per slice)
    block = min(4096 if INTERPRET else 1024, triton.next_power_of_2(patch * patch))
    mean3, std3 = (tuple(v) + (0.0,) * (3 - chans) for v in (mean, std))
    _ENTROPY[(batch * n_coarse,)](
        images, entropy, fine, n_coarse, grid_w, 0.0 if threshold is None else threshold, 255.0 * bins / 256.0,
        *mean3, *std3, *ENTROPY_LUMA, *images.stride(),
        PATCH=patch, CHANNELS=chans, BINS=bins, HAS_THRESHOLD=threshold is not None, BLOCK_P=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return entropy, fine.view(torch.bool)


@torch.library.custom_op("msvit::patch_entropy", mutates_args=())
def _patch_entropy_op(images: Tensor, patch: int, mean: List[float], std: List[float], bins: int,
                      threshold: Optional[float]) -> Tuple[Tensor, Tensor]:
    """(entropy, fine); see :func:`_launch`."""
    return _launch(images, patch, mean, std, bins, threshold)


@_patch_entropy_op.register_fake
def _(images, patch, mean, std, bins, threshold):
    batch, n_coarse = images.shape[0], (images.shape[2] // patch) * (images.shape[3] // patch)
    return (images.new_empty(batch, n_coarse, dtype=torch.float32),
            images.new_empty((batch, n_coarse) if threshold is not None else (0,), dtype=torch.bool))


class PatchEntropy(NamedTuple):
    """entropy: float32 ``[B, Nc]`` in bits (0 .. log2(min(bins, patch^2))); fine: bool ``[B, Nc]``,
    ``entropy > threshold`` (True = fine), or None when no threshold was given."""

    entropy: Tensor
    fine: Optional[Tensor]


def check_entropy_args(images: Tensor, patch: int, mean: Sequence[float], std: Sequence[float], bins: int) -> None:
    """ValueError/TypeError naming what is wrong with the arguments of a patch-entropy call."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError("images must be a float tensor [B, C, H, W]")
    chans, height, width = images.shape[1:]
    if chans not in (1, 3):
        raise ValueError(f"patch entropy takes RGB (3 channels) or grey (1 channel) images, got {chans} channels")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive int, got {patch!r}")
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} must be a multiple of the patch size {patch}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not MIN_BINS <= bins <= MAX_BINS or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two from {MIN_BINS} to {MAX_BINS}, got {bins!r}")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != chans or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} must hold {chans} finite numbers (one per channel), got {values!r}")


def normalisation(chans: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    """(mean, std) as float lists; None means pixels already in [0, 1] (mean 0, std 1)."""
    return [float(v) for v in (mean or [0.0] * chans)], [float(v) for v in (std or [1.0] * chans)]


def patch_entropy(images: Tensor, patch: int, *, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None, bins: int = DEFAULT_BINS,
                  threshold: Optional[float] = None) -> PatchEntropy:
    """The grey-level entropy of every ``patch x patch`` cell of ``images`` with the Triton kernel.

    images: float16/bfloat16/float32 ``[B, C, H, W]`` (C = 3 RGB or 1 grey) on CUDA (CPU only under
    TRITON_INTERPRET=1), any strides, H and W multiples of ``patch``; normalised with ``mean``,
    ``std`` (C numbers each; None: pixels in [0, 1]). bins: a power of two up to 1024 (binning in
    the module docstring). threshold: also return ``entropy > threshold``. Cells in raster order.
    Reads nothing back to the host; not differentiable (the images are detached).
    """
    mean, std = normalisation(images.shape[1] if images.dim() == 4 else 0, mean, std)
    check_entropy_args(images, patch, mean, std, bins)
    reason = triton_support(images, "the Triton patch entropy")
    if reason:
        raise RuntimeError(reason)
    threshold = None if threshold is None else float(threshold)
    entropy, fine = _patch_entropy_op(images.detach(), patch, mean, std, bins, threshold)
    return PatchEntropy(entropy, fine if threshold is not None else None)
