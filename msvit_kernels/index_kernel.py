"""Counts and offsets of a packed mixed-scale batch on the device: ``varlen.mixed_scale_index`` in two
Triton launches and one host read (none with a ``varlen.StaticShape``).

1. ``_counts_kernel`` (one program; it loops over the batch with a running carry): tokens per region
   (1 coarse, r*r fine), each region's first row inside its image (an in-image prefix sum),
   ``cu_seqlens`` (a prefix sum over images) and ``(T, max_seqlen)``, read once by the host to size
   the outputs.
2. ``_index_kernel`` (programs over regions x images): every region knows its packed rows, so each
   candidate token (region, sub-cell) scatters its entries of every index map straight to its
   place: no sort (the torch version enumerates the candidates with a stable argsort of B*Nc*r*r
   keys), and prefix rows are written by the first program of each image.

With a static shape the maps are allocated at the capacity and their padding entries are filled
by torch before the second launch overwrites the real ones (the values the torch version gives
them: a padding row holds image 0's first coarse token). The oracle is
``varlen.mixed_scale_index``: same ``MixedScaleIndex``, element for element.

Eager calls launch the kernels directly; a traced call (``torch.compile``, ``torch.export``) goes
through the ops ``msvit::mixed_scale_counts`` and ``msvit::mixed_scale_maps`` (``_triton.kernel_op``:
``triton_op``s an AOTInductor package compiles, docs/design.md section 14), the host read staying
outside them.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import INTERPRET, TritonKernel, kernel_op, recording, tl, traced, triton
from .varlen import (
    MixedScaleIndex,
    StaticShape,
    _check_index_args,
    border_cells,
    check_capacity,
    count_border_cells,
    cu_seqlens_from_lengths,
    padded_cu_seqlens,
)

if triton is not None:

    @triton.jit
    def _counts_kernel(
        MASK, REGION_START, CU_SEQLENS, STATS,
        batch, n_coarse, num_prefix, stride_mb, stride_mj,
        R2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        """REGION_START int32 ``[B, Nc]``: the region's first patch-token offset in its image;
        CU_SEQLENS int32 ``[B+1]``; STATS int64 ``[2]`` = (T, max_seqlen)."""
        carry = tl.full([], 0, tl.int32)
        longest = tl.full([], 0, tl.int32)
        tl.store(CU_SEQLENS, carry)
        for b0 in range(0, batch, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            mask_b = offs_b < batch
            in_image = tl.zeros([BLOCK_B], dtype=tl.int32)
            for j0 in range(0, n_coarse, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                mask = mask_b[:, None] & (offs_j < n_coarse)[None, :]
                fine = tl.load(MASK + offs_b[:, None] * stride_mb + offs_j[None, :] * stride_mj, mask=mask, other=0)
                per_region = tl.where(mask, tl.where(fine != 0, R2, 1), 0)
                start = in_image[:, None] + tl.cumsum(per_region, 1) - per_region
                tl.store(REGION_START + offs_b[:, None] * n_coarse + offs_j[None, :], start, mask=mask)
                in_image += tl.sum(per_region, 1)
            lengths = tl.where(mask_b, num_prefix + in_image, 0)
            tl.store(CU_SEQLENS + 1 + offs_b, carry + tl.cumsum(lengths, 0), mask=mask_b)
            carry += tl.sum(lengths, 0)
            longest = tl.maximum(longest, tl.max(lengths, 0))
        tl.store(STATS, carry.to(tl.int64))
        tl.store(STATS + 1, longest.to(tl.int64))

    @triton.jit
    def _index_kernel(
        MASK, REGION_START, CU_SEQLENS,
        ROWS, SOURCE, POSITION, REGION, IS_FINE, PREFIX_ROWS, ROW_IMAGE, FINE_TO_ROW,
        coarse_base, n_coarse, grid_w, fine_w, n_fine, num_prefix, stride_mb, stride_mj,
        RATIO: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program: BLOCK_J regions of one image; writes the entries of their tokens.
        coarse_base = B * Nf: the first coarse row of the candidate-pixel table (``source``);
        fine_w, n_fine: the fine grid's width and cell count (border cells included)."""
        image = tl.program_id(1)
        offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_j = offs_j < n_coarse
        seq_start = tl.load(CU_SEQLENS + image).to(tl.int64)
        image64 = image.to(tl.int64)
        fine = tl.load(MASK + image * stride_mb + offs_j * stride_mj, mask=mask_j, other=0) != 0
        first_row = seq_start + num_prefix + tl.load(REGION_START + image * n_coarse + offs_j, mask=mask_j, other=0)
        # patch tokens precede this image's first one in packed order: seq_start - image * P
        first_token = first_row - (image64 + 1) * num_prefix
        cell_y = (offs_j // grid_w) * RATIO
        cell_x = (offs_j % grid_w) * RATIO
        region = image64 * n_coarse + offs_j
        for k in tl.static_range(RATIO * RATIO):
            fine_cell = (cell_y + k // RATIO) * fine_w + cell_x + k % RATIO
            if k == 0:  # every region has a token 0; only fine regions have the others
                valid = mask_j
            else:
                valid = mask_j & fine
            token = first_token + k
            row = first_row + k
            tl.store(ROWS + token, row, mask=valid)
            source = tl.where(fine, image64 * n_fine + fine_cell, coarse_base + region)
            tl.store(SOURCE + token, source, mask=valid)
            tl.store(POSITION + token, tl.where(fine, fine_cell, n_fine + offs_j).to(tl.int64), mask=valid)
            tl.store(REGION + token, region, mask=valid)
            tl.store(IS_FINE + token, fine.to(tl.uint8), mask=valid)
            tl.store(ROW_IMAGE + row, image64, mask=valid)
            tl.store(FINE_TO_ROW + image64 * n_fine + fine_cell, tl.where(fine, row, first_row), mask=mask_j)
        if tl.program_id(0) == 0:
            offs_p = tl.arange(0, BLOCK_P)
            mask_p = offs_p < num_prefix
            tl.store(PREFIX_ROWS + image64 * num_prefix + offs_p, seq_start + offs_p, mask=mask_p)
            tl.store(ROW_IMAGE + seq_start + offs_p, image64 + offs_p * 0, mask=mask_p)


# The launchers fix every tile (no autotuning: both kernels are a few microseconds).
_COUNTS = None if triton is None else TritonKernel(_counts_kernel)
_INDEX = None if triton is None else TritonKernel(_index_kernel)


def _counts(
    mask: Tensor, ratio: int, num_prefix: int, shape: Optional[StaticShape] = None, n_border: int = 0
) -> Tuple[Tensor, Tensor, StaticShape]:
    """Offsets of every region and image (one launch); ``num_prefix + n_border`` rows of each image
    are not in a region."""
    launch = _counts_op if traced(mask) else _launch_counts  # traced: a triton_op the graph records
    region_start, cu_seqlens, stats = launch(mask, ratio, num_prefix + n_border)
    if shape is not None:
        check_capacity(stats[0], shape.capacity)
        return region_start, cu_seqlens, shape
    total, max_seqlen = stats.tolist()  # the forward's one host read
    return region_start, cu_seqlens, StaticShape(total, max_seqlen, 0)


def _launch_counts(mask: Tensor, ratio: int, outside: int) -> Tuple[Tensor, Tensor, Tensor]:
    """region_start int32 ``[B, Nc]``, cu_seqlens int32 ``[B + 1]`` and stats int64 ``[2]`` =
    (T, max_seqlen); ``outside`` rows of each image are in no region (prefix and border cells)."""
    batch, n_coarse = mask.shape
    region_start = torch.empty(batch, n_coarse, dtype=torch.int32, device=mask.device)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=mask.device)
    stats = torch.zeros(2, dtype=torch.int64, device=mask.device)
    block_j = min(1024 if INTERPRET else 256, triton.next_power_of_2(max(n_coarse, 1)))
    block_b = max(1, min(triton.next_power_of_2(max(batch, 1)), 4096 // block_j))  # a tile of <= 4096 regions
    _COUNTS[(1,)](mask.view(torch.uint8), region_start, cu_seqlens, stats, batch, n_coarse, outside,
                  *mask.stride(), R2=ratio * ratio, BLOCK_B=block_b, BLOCK_J=block_j)
    if recording():  # nothing ran: give the counts a launch would have written, so shapes downstream are real
        _record_stand_in(mask, ratio, outside, region_start, cu_seqlens, stats)
    return region_start, cu_seqlens, stats


@kernel_op("msvit::mixed_scale_counts", [_COUNTS])
def _counts_op(mask: Tensor, ratio: int, outside: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``_launch_counts`` as an op: what ``torch.export`` records (AOTInductor compiles the kernel)."""
    return _launch_counts(mask, ratio, outside)


def _border_entries(border, cu_seqlens, num_prefix, n_fine, entries, row_image, fine_to_row) -> None:
    """The entries of every image's border cells (always fine, the last rows of each image, no
    region): a few scatters on the device, no host read."""
    rows, source, position, region, is_fine = entries
    batch = fine_to_row.shape[0]
    image = torch.arange(batch, device=border.device)[:, None]
    row = cu_seqlens[1 : batch + 1, None].long() - border.numel() + torch.arange(border.numel(), device=border.device)
    token = (row - (image + 1) * num_prefix).flatten()
    rows[token] = row.flatten()
    source[token] = (image * n_fine + border).flatten()
    position[token] = border.expand(batch, -1).flatten()
    region[token] = (-1 - image).expand_as(row).flatten()
    is_fine[token] = 1
    row_image[row.flatten()] = image.expand_as(row).flatten()
    fine_to_row[:, border] = row


def _record_stand_in(mask, ratio, num_prefix, region_start, cu_seqlens, stats) -> None:
    """What ``_counts_kernel`` writes, computed by torch (under ``_triton.record_launches`` only:
    the host-overhead benchmark runs the CUDA code path on CPU with launches recorded)."""
    per_region = torch.where(mask, ratio * ratio, 1).to(torch.int32)
    region_start.copy_(torch.cumsum(per_region, 1) - per_region)
    lengths = num_prefix + per_region.sum(1)
    cu_seqlens.copy_(cu_seqlens_from_lengths(lengths))
    stats.copy_(torch.stack([lengths.sum(), lengths.max() if lengths.numel() else lengths.sum()]))


def triton_mixed_scale_index(
    mask: Tensor,
    coarse_grid: Tuple[int, int],
    ratio: int,
    num_prefix: int,
    shape: Optional[StaticShape] = None,
    fine_grid: Optional[Tuple[int, int]] = None,
) -> MixedScaleIndex:
    """``varlen.mixed_scale_index`` with the Triton kernels; same arguments, same result.

    mask: bool ``[B, Nc]`` (True = fine) on CUDA (CPU only under TRITON_INTERPRET=1);
    coarse_grid: (h, w) with h * w = Nc; ratio: coarse / fine patch; num_prefix: P; shape: a
    ``varlen.StaticShape`` (no host read) or None (exact shape, one host read); fine_grid: the
    fine grid when it has border cells (default: coarse_grid * ratio).
    """
    _check_index_args(mask, coarse_grid, ratio, num_prefix)
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or pip install .[triton])")
    static = shape is not None
    fine_grid = (coarse_grid[0] * ratio, coarse_grid[1] * ratio) if fine_grid is None else tuple(fine_grid)
    n_border = count_border_cells(fine_grid, ratio)
    region_start, cu_seqlens, shape = _counts(mask, ratio, num_prefix, shape, n_border)
    index = _index_maps(mask, region_start, cu_seqlens, shape, coarse_grid, ratio, num_prefix, fine_grid)
    return index._replace(static=static)


def _index_maps(mask: Tensor, region_start: Tensor, cu_seqlens: Tensor, shape: StaticShape,
                coarse_grid: Tuple[int, int], ratio: int, num_prefix: int,
                fine_grid: Optional[Tuple[int, int]] = None) -> MixedScaleIndex:
    """Every index map of the batch from ``_counts``' offsets (the second launch; border cells and,
    without regions, prefix rows are written by torch)."""
    fine_grid = (coarse_grid[0] * ratio, coarse_grid[1] * ratio) if fine_grid is None else fine_grid
    launch = _maps_op if traced(mask) else _launch_maps  # traced: a triton_op the graph records
    rows, source, position, region, is_fine, prefix_rows, row_image, fine_to_row = launch(
        mask, region_start, cu_seqlens, shape.capacity, shape.padding_sequences, coarse_grid[1], ratio, num_prefix,
        fine_grid[0], fine_grid[1],
    )
    return MixedScaleIndex(
        cu_seqlens=padded_cu_seqlens(cu_seqlens, shape), max_seqlen=shape.max_seqlen, total=shape.capacity,
        rows=rows, source=source, position=position, region=region, is_fine=is_fine.view(torch.bool),
        prefix_rows=prefix_rows, row_image=row_image, fine_to_row=fine_to_row,
        padding_sequences=shape.padding_sequences,
    )


def _launch_maps(mask: Tensor, region_start: Tensor, cu_seqlens: Tensor, total: int, padding_sequences: int,
                 coarse_w: int, ratio: int, num_prefix: int, fine_h: int, fine_w: int) -> Tuple[Tensor, ...]:
    """The maps (rows, source, position, region, is_fine as uint8, prefix_rows, row_image,
    fine_to_row) of ``total`` packed rows, ``padding_sequences`` of them padding sequences."""
    batch, n_coarse = mask.shape
    device = mask.device
    n_patch = total - batch * num_prefix
    n_fine = fine_h * fine_w
    # under record_launches nothing writes the maps: zeros keep the ops that index with them valid
    empty = torch.zeros if recording() else torch.empty
    prefix_rows = empty(batch, num_prefix, dtype=torch.int64, device=device)
    fine_to_row = empty(batch, n_fine, dtype=torch.int64, device=device)
    if padding_sequences:  # padding entries keep these values; the kernel writes the real ones
        rows = torch.arange(batch * num_prefix, total, device=device)
        source = torch.full((n_patch,), batch * n_fine, dtype=torch.int64, device=device)
        position = torch.full((n_patch,), n_fine, dtype=torch.int64, device=device)
        region = torch.zeros(n_patch, dtype=torch.int64, device=device)
        row_image = torch.full((total,), batch, dtype=torch.int64, device=device)
        is_fine = torch.zeros(n_patch, dtype=torch.uint8, device=device)
    else:
        rows, source, position, region = (empty(n_patch, dtype=torch.int64, device=device) for _ in range(4))
        row_image = empty(total, dtype=torch.int64, device=device)
        is_fine = empty(n_patch, dtype=torch.uint8, device=device)  # bytes: no i1 pointers in kernels
    if batch and n_coarse:
        block_j = min(256 if INTERPRET else 64, triton.next_power_of_2(n_coarse))
        _INDEX[(triton.cdiv(n_coarse, block_j), batch)](
            mask.view(torch.uint8), region_start, cu_seqlens, rows, source, position, region, is_fine, prefix_rows,
            row_image, fine_to_row, batch * n_fine, n_coarse, coarse_w, fine_w, n_fine, num_prefix,
            *mask.stride(), RATIO=ratio, BLOCK_J=block_j, BLOCK_P=triton.next_power_of_2(max(num_prefix, 1)),
        )
    elif batch:  # no whole region: the prefix rows the kernel's first programs would write
        prefix_rows.copy_(cu_seqlens[:-1, None].long() + torch.arange(num_prefix, device=device))
        row_image.index_put_((prefix_rows.flatten(),), torch.arange(batch, device=device).repeat_interleave(
            num_prefix, output_size=batch * num_prefix))
    border = border_cells((fine_h, fine_w), ratio, device)
    if batch and border.numel():
        _border_entries(border, cu_seqlens, num_prefix, n_fine, (rows, source, position, region, is_fine),
                        row_image, fine_to_row)
    return rows, source, position, region, is_fine, prefix_rows, row_image, fine_to_row


@kernel_op("msvit::mixed_scale_maps", [_INDEX])
def _maps_op(mask: Tensor, region_start: Tensor, cu_seqlens: Tensor, total: int, padding_sequences: int,
             coarse_w: int, ratio: int, num_prefix: int, fine_h: int, fine_w: int) -> Tuple[
                 Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_launch_maps`` as an op: what ``torch.export`` records (AOTInductor compiles the kernel)."""
    return _launch_maps(mask, region_start, cu_seqlens, total, padding_sequences, coarse_w, ratio, num_prefix,
                        fine_h, fine_w)
