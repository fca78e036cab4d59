"""The varlen contract: how a mixed-scale batch is laid out as one packed ``[T, C]`` tensor.

Layout of image ``b`` (rows ``cu_seqlens[b] : cu_seqlens[b+1]``): its ``P`` prefix tokens (cls,
registers), then one entry per coarse region in raster order: a coarse region contributes one
token, a fine region its ``r*r`` fine tokens in raster order inside the region (``r`` = coarse
patch / fine patch). Every map below is built on the mask's device; building the whole index costs
exactly one host read (``T`` and ``max_seqlen``), once per forward.
"""

import numbers
from typing import NamedTuple, Tuple

import torch
from torch import Tensor


class MixedScaleIndex(NamedTuple):
    """Index maps of one packed mixed-scale batch (``Np = T - B*P`` patch tokens).

    cu_seqlens: int32 ``[B+1]``; max_seqlen: int; total: T (int).
    rows: int64 ``[Np]`` packed row of each patch token, in packed order.
    source: int64 ``[Np]`` row of the candidate-pixel table ``cat(fine patches [B*Nf], coarse
        patches [B*Nc])`` that each patch token embeds.
    position: int64 ``[Np]`` row of the position table ``cat(fine pos [Nf], coarse pos [Nc])``.
    region: int64 ``[Np]`` flat coarse region ``b*Nc + j`` each patch token belongs to.
    is_fine: bool ``[Np]``.
    prefix_rows: int64 ``[B, P]`` packed rows of the prefix tokens.
    row_image: int64 ``[T]`` image of every packed row.
    fine_to_row: int64 ``[B, Nf]`` packed row covering each fine cell (fine-grid raster order):
        the fine token itself, or the coarse token of its region. Used to unpack to the grid.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    total: int
    rows: Tensor
    source: Tensor
    position: Tensor
    region: Tensor
    is_fine: Tensor
    prefix_rows: Tensor
    row_image: Tensor
    fine_to_row: Tensor


def cu_seqlens_from_lengths(lengths: Tensor) -> Tensor:
    """int32 ``[B+1]`` cumulative lengths (starting at 0) from per-sequence lengths ``[B]``."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths.reshape(-1), 0)
    return cu


def fine_cells_of_regions(coarse_grid: Tuple[int, int], ratio: int, device=None) -> Tensor:
    """int64 ``[Nc, r*r]``: the fine-grid raster index of each fine cell of each coarse region."""
    hc, wc = coarse_grid
    r = ratio
    jy = torch.arange(hc, device=device).view(hc, 1, 1, 1)
    jx = torch.arange(wc, device=device).view(1, wc, 1, 1)
    ky = torch.arange(r, device=device).view(1, 1, r, 1)
    kx = torch.arange(r, device=device).view(1, 1, 1, r)
    fine_index = (jy * r + ky) * (wc * r) + (jx * r + kx)
    return fine_index.reshape(hc * wc, r * r)


def mixed_scale_index(mask: Tensor, coarse_grid: Tuple[int, int], ratio: int, num_prefix: int) -> MixedScaleIndex:
    """Build the packed layout of a batch from its hard mask.

    mask: bool ``[B, Nc]`` (True = fine), ``Nc = coarse_grid[0] * coarse_grid[1]``; ratio: coarse
    patch / fine patch (integer >= 1); num_prefix: prefix tokens per image (integer >= 0).
    """
    _check_index_args(mask, coarse_grid, ratio, num_prefix)
    device = mask.device
    batch, n_coarse = mask.shape
    r2 = ratio * ratio
    n_fine = n_coarse * r2
    per_region = torch.where(mask, r2, 1)  # tokens each region contributes
    lengths = num_prefix + per_region.sum(1)
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    longest = lengths.amax() if batch else lengths.new_zeros(())  # an empty batch has no longest image
    total, max_seqlen = (int(v) for v in torch.stack([cu_seqlens[-1].long(), longest.long()]).tolist())

    # Packed row of every candidate token (b, j, k); k > 0 is only real in a fine region.
    region_start = cu_seqlens[:-1, None].long() + num_prefix + (torch.cumsum(per_region, 1) - per_region)
    sub = torch.arange(r2, device=device)
    candidate_row = region_start[:, :, None] + sub
    valid = mask[:, :, None] | (sub == 0)

    # Stable sort keeps the enumeration order, which is the packed order, without a host sync.
    n_patch = total - batch * num_prefix
    candidate = torch.argsort((~valid).flatten().to(torch.uint8), stable=True)[:n_patch]
    image = candidate // (n_coarse * r2)
    region_in_image = (candidate // r2) % n_coarse
    is_fine = mask[image, region_in_image]
    fine_cells = fine_cells_of_regions(coarse_grid, ratio, device)
    fine_cell = fine_cells.flatten()[candidate % (n_coarse * r2)]
    source = torch.where(is_fine, image * n_fine + fine_cell, batch * n_fine + image * n_coarse + region_in_image)
    position = torch.where(is_fine, fine_cell, n_fine + region_in_image)

    prefix_rows = cu_seqlens[:-1, None].long() + torch.arange(num_prefix, device=device)
    row_image = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=total)
    covering = torch.where(mask[:, :, None], candidate_row, candidate_row[:, :, :1])
    fine_to_row = torch.empty(batch, n_fine, dtype=torch.long, device=device)
    fine_to_row[:, fine_cells.flatten()] = covering.reshape(batch, n_fine)
    return MixedScaleIndex(
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        total=total,
        rows=candidate_row.flatten()[candidate],
        source=source,
        position=position,
        region=image * n_coarse + region_in_image,
        is_fine=is_fine,
        prefix_rows=prefix_rows,
        row_image=row_image,
        fine_to_row=fine_to_row,
    )


def _check_index_args(mask, coarse_grid, ratio, num_prefix) -> None:
    """The arguments of ``mixed_scale_index`` (and of ``triton_mixed_scale_index``), with messages
    that say what was expected: ratio 0 used to return a layout, a long mask, a mask of another
    region count or num_prefix -1 failed with raw torch errors deep in the index maps. Host-side
    checks of Python values and tensor metadata only: no device sync."""

    def integer(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    grid_ok = isinstance(coarse_grid, (tuple, list, torch.Size)) and len(coarse_grid) == 2
    if not grid_ok or not all(integer(n) and n >= 1 for n in coarse_grid):
        raise ValueError(f"coarse_grid must be (h, w), two integers >= 1, got {coarse_grid!r}")
    if not integer(ratio) or ratio < 1:
        raise ValueError(f"ratio (coarse patch / fine patch) must be an integer >= 1, got {ratio!r}")
    if not integer(num_prefix) or num_prefix < 0:
        raise ValueError(f"num_prefix (prefix tokens per image) must be an integer >= 0, got {num_prefix!r}")
    n_regions = coarse_grid[0] * coarse_grid[1]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor [B, {n_regions}] (True = fine region), got {got}")
    if mask.dim() != 2 or mask.shape[1] != n_regions:
        raise ValueError(
            f"mask must have shape [B, {n_regions}]: one entry per region of the {coarse_grid[0]}x{coarse_grid[1]} "
            f"coarse grid, raster order; got {tuple(mask.shape)}"
        )
