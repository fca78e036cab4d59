"""Patch entropy in Triton: the Shannon entropy of each patch's grey-level histogram (APT's gate).

APT (Choudhury et al., *Accelerating Vision Transformers with Adaptive Patch Sizes*, ICLR 2026)
keeps a region coarse when its pixels carry little information: the entropy of the region's
grey-level histogram is below a threshold. No parameters, no training. This op computes that
entropy for every ``patch x patch`` cell of every image, at ONE patch size per call: a gate with
more scales calls it once per scale with that scale's threshold.

The binning, identical in this kernel and in ``reference.entropy_reference`` (same fp32 operations
in the same order, see below), for a normalised input ``z`` with normalisation ``mean``, ``std``:

1. un-normalise, per channel:     ``x = z * std + mean``        (pixels in [0, 1])
2. ``binning="apt"`` (default; APT's released code, docs/design.md section 15): the 8-bit level
   of each channel, ``k = clamp(floor(255 x + 0.5), 0, 255)`` (APT's dataset computes the entropy
   from the 8-bit image, ``to_tensor(pil) * 255``, which is ``k`` exactly); its grey, with the
   weights of APT's ``compute_patch_entropy_vectorized``, ``g = (0.2989 k_r + 0.587 k_g) + 0.114 k_b``
   (a one-channel image is its own grey); its bin as ``torch.histc(g, bins, min=0, max=255)`` bins
   it: ``trunc(g * bins / 255)`` (one division, rounded as torch rounds it), ``g = 255`` in the last
   bin. A region splits when ``H >= threshold`` (APT keeps it whole when ``H < threshold``).
   ``binning="continuous"`` (the package's rule before; checkpoints saved without a binning keep
   it): the grey of ``x`` with the same weights, bin ``clamp(floor(g * (255 * bins / 256)), 0,
   bins - 1)`` (no 8-bit rounding: bins of ``256 / bins`` levels of the continuous intensity), and a
   region splits when ``H > threshold``.
3. ``H = -sum_i p_i log2 p_i`` over the non-empty bins, ``p_i = count_i / patch^2``, in bits.

Non-finite pixels: a patch with a pixel whose un-normalised value ``x`` is NaN or +-inf in any
channel gets ``H = +inf``: above every threshold (the region splits down to its finest cells, so
it is never merged into a coarser token) and first in a budget's top-k. The entropy of an image
never depends on another image's pixels. (Refusing such a batch would need a host read.)

Exact binning needs every operation rounded as torch rounds it: a fused multiply-add rounds once
where torch's two kernels round twice, and a pixel on a bin edge would then move to the next bin
(the entropy moves by ~0.01 bit, far more than the 1e-5 the tests allow). So GPU launches compile
with ``enable_fp_fusion=False``, and APT's division is ``div_rn`` (Triton's ``/`` is an approximate
division on NVIDIA GPUs); the kernel does a few flops per pixel it loads, which is not what bounds
its time.

One program per patch: it streams the patch's pixels in ``BLOCK_P`` slices and accumulates a
``[bins]`` int32 histogram with ``tl.histogram`` (Triton counts in shared memory: 4 bytes per bin,
2 KB at 512 bins; the compile report shows every target clean up to 1024 bins and 64 px patches);
nothing goes through global memory but the pixels and one fp32 entropy (and one decision byte) per
patch. The entropy is a hard threshold's input, not differentiable: the op has no autograd formula
and detaches its input.

A list of images of different sizes (``list_patch_entropy``, the kernel's ``LIST`` mode,
docs/design.md section 11): one launch over a range of global nodes of the list's
``tree_batch.TreeBatch``, each program a node whose pixel origin, row and channel strides and
factor ``r**s`` come from ``TreeBatch.node_pixels`` over the flat pixel buffer (the pack kernel's
geometry). A node is a ``fine_patch * r**s`` px cell and the slice loop runs to its own pixel
count, so every scale of every image shares one launch; the binning is the one above, op for op.
"""

import math
from numbers import Real
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._triton import INTERPRET, TritonKernel, check_flat_nodes, kernel_op, tl, triton, triton_support
from .reference import ENTROPY_LUMA

DEFAULT_BINS = 512  # APT's released code: torch.histc(bins=512, min=0, max=255)
BINNINGS = ("apt", "continuous")  # the module docstring; "apt" is the default
MIN_BINS, MAX_BINS = 2, 1024  # one program holds the whole histogram

if triton is not None:

    @triton.jit
    def _channel(ptr, valid, std, mean, APT: tl.constexpr):
        """One channel of a slice of pixels, un-normalised (``z * std + mean``, two roundings), and
        whether it is finite; with APT, rounded to its 8-bit level ``floor(255 x + 0.5)`` in [0, 255]."""
        x = tl.load(ptr, mask=valid, other=0.0).to(tl.float32) * std + mean
        finite = tl.abs(x) <= 3.4028234663852886e38  # False for NaN and +-inf
        if APT:
            x = tl.minimum(tl.maximum(tl.floor(x * 255.0 + 0.5), 0.0), 255.0)
        return x, finite

    @triton.jit
    def _entropy_kernel(
        IMG, ENTROPY, FINE,
        n_coarse, grid_w, threshold, level_scale,
        mean_r, mean_g, mean_b, std_r, std_g, std_b, luma_r, luma_g, luma_b,
        stride_ib, stride_ic, stride_ih, stride_iw, NODE_PIXELS, first_node, n_nodes,
        PATCH: tl.constexpr, CHANNELS: tl.constexpr, BINS: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
        APT: tl.constexpr, LIST: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program: the entropy of patch ``program_id`` (image pid // n_coarse, raster cell
        pid % n_coarse) and, with HAS_THRESHOLD, the decision (APT: ``entropy >= threshold``, else
        ``entropy > threshold``). A patch with a non-finite pixel has entropy +inf.

        LIST (a list of images of different sizes, docs/design.md section 11): IMG is the list's flat
        pixel buffer and the program's patch is the global node ``first_node + pid`` of
        NODE_PIXELS ``[4, n_nodes]`` (pixel origin, row stride, channel stride, factor r**s: a
        ``PATCH * r**s`` px cell, so nodes of several scales share the launch); no threshold."""
        pid = tl.program_id(0)
        if LIST:  # a 64-bit origin in a buffer of many images; strides inside one image fit 32 bits
            node = first_node + pid
            base = IMG + tl.load(NODE_PIXELS + node)
            stride_ih = tl.load(NODE_PIXELS + n_nodes + node).to(tl.int32)
            stride_ic = tl.load(NODE_PIXELS + 2 * n_nodes + node).to(tl.int32)
            stride_iw = 1
            side = PATCH * tl.load(NODE_PIXELS + 3 * n_nodes + node).to(tl.int32)
        else:
            cell = pid % n_coarse
            y0 = (cell // grid_w) * PATCH
            x0 = (cell % grid_w) * PATCH
            base = IMG + (pid // n_coarse).to(tl.int64) * stride_ib + y0 * stride_ih + x0 * stride_iw
            side = PATCH
        n_pixels = side * side

        hist = tl.zeros([BINS], dtype=tl.int32)
        nonfinite = 0
        for k0 in range(0, n_pixels, BLOCK_P):
            offs = k0 + tl.arange(0, BLOCK_P)
            valid = offs < n_pixels
            ptr = base + (offs // side) * stride_ih + (offs % side) * stride_iw
            grey, finite = _channel(ptr, valid, std_r, mean_r, APT)
            if CHANNELS == 3:
                green, finite_g = _channel(ptr + stride_ic, valid, std_g, mean_g, APT)
                blue, finite_b = _channel(ptr + 2 * stride_ic, valid, std_b, mean_b, APT)
                grey = (luma_r * grey + luma_g * green) + luma_b * blue
                finite = finite & finite_g & finite_b
            if APT:  # torch.histc(bins=BINS, min=0, max=255): trunc(grey * BINS / 255), 255 in the last bin
                level = tl.floor(tl.math.div_rn(grey * BINS, 255.0))
            else:
                level = tl.floor(grey * level_scale)
            level = tl.minimum(tl.maximum(level, 0.0), BINS - 1.0)
            nonfinite += tl.sum((valid & (finite == 0)).to(tl.int32), 0)
            # lanes past the patch, and non-finite pixels (whose level is no number), go to bin 0;
            # the padding lanes are taken out below (a histogram mask is not in every Triton this
            # package supports), a non-finite pixel makes the entropy +inf whatever the counts
            hist += tl.histogram(tl.where(valid & finite, level.to(tl.int32), 0), BINS)
        padding = tl.cdiv(n_pixels, BLOCK_P) * BLOCK_P - n_pixels
        hist -= tl.where(tl.arange(0, BINS) == 0, padding, 0)

        p = hist.to(tl.float32) / n_pixels
        entropy = -tl.sum(p * tl.log2(tl.where(hist > 0, p, 1.0)), 0)  # an empty bin adds 0 * log2(1)
        entropy = tl.where(nonfinite > 0, float("inf"), entropy)
        tl.store(ENTROPY + pid, entropy)
        if HAS_THRESHOLD:
            if APT:
                tl.store(FINE + pid, (entropy >= threshold).to(tl.uint8))
            else:
                tl.store(FINE + pid, (entropy > threshold).to(tl.uint8))


_ENTROPY = None if triton is None else TritonKernel(_entropy_kernel)  # the launcher fixes the tile


def _launch(images: Tensor, patch: int, mean: Sequence[float], std: Sequence[float], bins: int,
            threshold: Optional[float], binning: str = "apt") -> Tuple[Tensor, Tensor]:
    """Entropies fp32 ``[B, Nc]`` and decisions bool ``[B, Nc]`` (``[0]`` without a threshold)."""
    batch, chans, height, width = images.shape
    grid_w = width // patch
    n_coarse = (height // patch) * grid_w
    entropy = torch.empty(batch, n_coarse, dtype=torch.float32, device=images.device)
    fine = torch.empty((batch, n_coarse) if threshold is not None else (0,), dtype=torch.uint8, device=images.device)
    if batch * n_coarse == 0:
        return entropy, fine.view(torch.bool)
    block = _slice_block(patch * patch)
    mean3, std3 = (tuple(v) + (0.0,) * (3 - chans) for v in (mean, std))
    _ENTROPY[(batch * n_coarse,)](
        images, entropy, fine, n_coarse, grid_w, 0.0 if threshold is None else threshold, 255.0 * bins / 256.0,
        *mean3, *std3, *ENTROPY_LUMA, *images.stride(), entropy, 0, 0,
        PATCH=patch, CHANNELS=chans, BINS=bins, HAS_THRESHOLD=threshold is not None,
        APT=binning == "apt", LIST=False, BLOCK_P=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return entropy, fine.view(torch.bool)


def _slice_block(pixels_per_patch: int) -> int:
    """``BLOCK_P``: 1024 pixels x 3 channels over 4 warps, 24 values per thread (the interpreter
    pays per slice, so it takes up to 4096)."""
    return min(4096 if INTERPRET else 1024, triton.next_power_of_2(pixels_per_patch))


def _launch_list(pixels: Tensor, node_pixels: Tensor, first: int, count: int, patch: int, chans: int,
                 largest: int, mean: Sequence[float], std: Sequence[float], bins: int, binning: str) -> Tensor:
    """Entropies fp32 ``[count]`` of the global nodes ``first .. first + count - 1`` (LIST mode;
    ``largest``: the largest factor r**s among them, which sizes the slices)."""
    entropy = torch.empty(count, dtype=torch.float32, device=pixels.device)
    if count == 0:
        return entropy
    mean3, std3 = (tuple(v) + (0.0,) * (3 - chans) for v in (mean, std))
    _ENTROPY[(count,)](
        pixels, entropy, entropy, 1, 1, 0.0, 255.0 * bins / 256.0,
        *mean3, *std3, *ENTROPY_LUMA, 0, 0, 0, 0, node_pixels, first, node_pixels.shape[1],
        PATCH=patch, CHANNELS=chans, BINS=bins, HAS_THRESHOLD=False, APT=binning == "apt", LIST=True,
        BLOCK_P=_slice_block((patch * largest) ** 2),
        num_warps=4, enable_fp_fusion=False,
    )
    return entropy


@kernel_op("msvit::patch_entropy", [_ENTROPY])
def _patch_entropy_op(images: Tensor, patch: int, mean: List[float], std: List[float], bins: int,
                      threshold: Optional[float], binning: str) -> Tuple[Tensor, Tensor]:
    """(entropy, fine); see :func:`_launch`."""
    return _launch(images, patch, mean, std, bins, threshold, binning)


@_patch_entropy_op.register_fake
def _(images, patch, mean, std, bins, threshold, binning):
    batch, n_coarse = images.shape[0], (images.shape[2] // patch) * (images.shape[3] // patch)
    return (images.new_empty(batch, n_coarse, dtype=torch.float32),
            images.new_empty((batch, n_coarse) if threshold is not None else (0,), dtype=torch.bool))


@kernel_op("msvit::list_patch_entropy", [_ENTROPY])
def _list_entropy_op(pixels: Tensor, node_pixels: Tensor, first: int, count: int, patch: int, chans: int,
                     largest: int, mean: List[float], std: List[float], bins: int, binning: str) -> Tensor:
    """Entropies ``[count]``; see :func:`_launch_list`."""
    return _launch_list(pixels, node_pixels, first, count, patch, chans, largest, mean, std, bins, binning)


@_list_entropy_op.register_fake
def _(pixels, node_pixels, first, count, patch, chans, largest, mean, std, bins, binning):
    return pixels.new_empty(count, dtype=torch.float32)


class PatchEntropy(NamedTuple):
    """entropy: float32 ``[B, Nc]`` in bits (0 .. log2(min(bins, patch^2)), +inf for a patch with a
    non-finite pixel); fine: bool ``[B, Nc]``, ``entropy >= threshold`` (``>`` with
    ``binning="continuous"``; True = fine), or None when no threshold was given."""

    entropy: Tensor
    fine: Optional[Tensor]


def check_entropy_args(images: Tensor, patch: int, mean: Sequence[float], std: Sequence[float], bins: int,
                       binning: str = "apt", names: Tuple[str, str, str, str] = ("mean", "std", "bins", "binning")) -> None:
    """ValueError/TypeError naming what is wrong with the arguments of a patch-entropy call
    (``names``: what the caller calls mean, std, bins and binning, e.g. ``from_timm``'s ``entropy_*``)."""
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
        raise ValueError(f"{names[2]} must be a power of two from {MIN_BINS} to {MAX_BINS}, got {bins!r}")
    if binning not in BINNINGS:
        raise ValueError(f"{names[3]} must be one of {', '.join(map(repr, BINNINGS))}, got {binning!r}")
    check_normalisation(mean, std, chans, names[:2])


def check_normalisation(mean, std, chans: int, names: Tuple[str, str] = ("mean", "std")) -> None:
    """The images' normalisation: ``chans`` finite numbers each, every std > 0 (a zero std would make
    every pixel the mean, every entropy 0 and every region coarse; a negative one is no
    normalisation). ValueError naming the argument (``names``)."""
    for name, values in zip(names, (mean, std)):
        listed = tuple(values) if hasattr(values, "__len__") and not isinstance(values, (str, bytes)) else None
        numbers = listed is not None and all(isinstance(v, Real) and not isinstance(v, bool) for v in listed)
        if not numbers or len(listed) != chans or not all(math.isfinite(v) for v in listed):
            raise ValueError(f"{name} must hold {chans} finite numbers (one per channel), got {values!r}")
    if not all(v > 0 for v in std):
        raise ValueError(
            f"{names[1]} must be > 0 for every channel (the std the images were normalised with), got {std!r}"
        )


def normalisation(chans: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    """(mean, std) as float lists; None means pixels already in [0, 1] (mean 0, std 1)."""
    return [float(v) for v in (mean or [0.0] * chans)], [float(v) for v in (std or [1.0] * chans)]


def patch_entropy(images: Tensor, patch: int, *, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None, bins: int = DEFAULT_BINS,
                  threshold: Optional[float] = None, binning: str = "apt") -> PatchEntropy:
    """The grey-level entropy of every ``patch x patch`` cell of ``images`` with the Triton kernel.

    images: float16/bfloat16/float32 ``[B, C, H, W]`` (C = 3 RGB or 1 grey) on CUDA (CPU only under
    TRITON_INTERPRET=1), any strides, H and W multiples of ``patch``; normalised with ``mean``,
    ``std`` (C numbers each, std > 0; None: pixels in [0, 1]). bins: a power of two up to 1024.
    binning: ``"apt"`` or ``"continuous"`` (module docstring). threshold: also return the
    decisions (``entropy >= threshold``; ``>`` with ``"continuous"``). Cells in raster order; a cell
    with a non-finite pixel has entropy +inf. Reads nothing back to the host; not differentiable
    (the images are detached).
    """
    mean, std = normalisation(images.shape[1] if images.dim() == 4 else 0, mean, std)
    check_entropy_args(images, patch, mean, std, bins, binning)
    reason = triton_support(images, "the Triton patch entropy")
    if reason:
        raise RuntimeError(reason)
    threshold = None if threshold is None else float(threshold)
    entropy, fine = _patch_entropy_op(images.detach(), patch, mean, std, bins, threshold, binning)
    return PatchEntropy(entropy, fine if threshold is not None else None)


def list_patch_entropy(pixels: Tensor, node_pixels: Tensor, nodes: range, fine_patch: int, chans: int, *,
                       largest: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                       bins: int = DEFAULT_BINS, binning: str = "apt") -> Tensor:
    """The grey-level entropy of nodes of a list of images of different sizes, in one launch.

    pixels: float16/bfloat16/float32 ``[sum C H_b W_b]``, every ``[C, H_b, W_b]`` image flattened in
    turn (the list's flat pixel buffer); node_pixels: int64 ``[4, n_nodes]``, each global node's
    pixel origin, row stride, channel stride and factor ``r**s``
    (``tree_batch.TreeBatch.node_pixels``), on the pixels' device. nodes: the range of global nodes
    to measure (e.g. every node of scales 1 .. S-1), each a ``fine_patch * r**s`` px cell; largest:
    the largest factor among them. Returns float32 ``[len(nodes)]``: each node's entropy in bits,
    +inf for a cell with a non-finite pixel, as :func:`patch_entropy` gives for that cell. Reads
    nothing back to the host; not differentiable. The oracle is ``reference.entropy_flat_reference``.
    """
    check_flat_nodes(pixels, node_pixels, nodes)
    if isinstance(largest, bool) or not isinstance(largest, int) or largest < 1:
        raise ValueError(f"largest (the largest factor r**s of the nodes) must be a positive int, got {largest!r}")
    mean, std = normalisation(chans, mean, std)
    patch = int(fine_patch) * largest
    check_entropy_args(pixels.new_empty(0, chans, patch, patch), patch, mean, std, bins, binning)
    reason = triton_support(pixels, "the Triton patch entropy")
    if reason:
        raise RuntimeError(reason)
    return _list_entropy_op(pixels.detach(), node_pixels, nodes.start, len(nodes), int(fine_patch), chans, largest,
                            mean, std, bins, binning)
