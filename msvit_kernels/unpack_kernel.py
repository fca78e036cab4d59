"""Unpack packed mixed-scale tokens onto the fine grid (Appendix E.1), as a Triton kernel.

Every fine cell of image ``b`` takes the packed row ``fine_to_row[b, cell]``: its own fine token,
or the coarse token of its region, replicated over the region's r x r cells. The op is a row
gather, so the kernel is bandwidth bound: it reads ``B*h*w`` rows of ``C`` values and writes as
many. Its reference (the oracle of the tests) is ``reference.unpack_to_grid_reference``.

Read top to bottom: kernel, launcher, the ``torch.library`` op ``msvit::unpack_to_grid`` with a fake
implementation (``torch.compile`` traces it) and its autograd (backward = scatter-add of the grid
gradient into the token rows, in torch: ``index_add_`` is one fused kernel on CUDA), and the
functional entry points :func:`triton_unpack_to_grid` (always the kernel) and
:func:`unpack_to_grid` (the kernel on CUDA, the reference elsewhere).

triton is optional: without it (or on CPU without ``TRITON_INTERPRET=1``, which must be set before
this module is imported) ``unpack_to_grid`` runs the reference and ``triton_unpack_to_grid`` raises.
"""
from typing import Tuple

import torch
from torch import Tensor

# The guarded triton import (optional off Linux; the reference serves every device then) is shared.
from . import _triton
from ._triton import INTERPRET, TritonKernel, kernel_op, tl, triton
from .dispatch import IMPLEMENTATIONS, normalize_choice
from .reference import unpack_to_grid_reference

if triton is not None:

    @triton.jit
    def _unpack_kernel(
        TOKENS, ROWS, GRID,
        n_cells, n_channels,
        stride_tt, stride_tc,
        BLOCK_CELLS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program: BLOCK_CELLS fine cells (flat over the batch) x BLOCK_C channels.

        GRID is contiguous ``[n_cells, n_channels]``; TOKENS may be strided. Cells past the end
        and channels past C are masked, so any B, h, w and C work.
        """
        offs_cell = tl.program_id(0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_cell = offs_cell < n_cells
        mask = mask_cell[:, None] & (offs_c[None, :] < n_channels)
        rows = tl.load(ROWS + offs_cell, mask=mask_cell, other=0)  # int64: T * stride may pass 2**31
        values = tl.load(TOKENS + rows[:, None] * stride_tt + offs_c[None, :] * stride_tc, mask=mask, other=0.0)
        out = GRID + offs_cell.to(tl.int64)[:, None] * n_channels + offs_c[None, :]
        tl.store(out, values, mask=mask)


_UNPACK = None if triton is None else TritonKernel(_unpack_kernel)  # a copy: the launcher fixes the tiles


def _block_sizes(n_channels: int) -> Tuple[int, int]:
    # The interpreter runs one program at a time and pays per program, so it takes large tiles;
    # on GPU 32 cells x up to 128 channels (fp32: 16 KiB per program) keeps many programs in flight.
    block_c = min(128, triton.next_power_of_2(max(n_channels, 1)))
    return (128 if INTERPRET else 32), block_c


def _launch(tokens: Tensor, rows: Tensor, n_cells: int) -> Tensor:
    """tokens ``[T, C]`` (any strides), rows int64 ``[n_cells]`` contiguous -> ``[n_cells, C]``."""
    n_channels = tokens.shape[1]
    grid_out = tokens.new_empty(n_cells, n_channels)
    if n_cells == 0 or n_channels == 0:
        return grid_out
    block_cells, block_c = _block_sizes(n_channels)
    launch = (triton.cdiv(n_cells, block_cells), triton.cdiv(n_channels, block_c))
    _UNPACK[launch](tokens, rows, grid_out, n_cells, n_channels, tokens.stride(0), tokens.stride(1),
                    BLOCK_CELLS=block_cells, BLOCK_C=block_c)
    return grid_out


@kernel_op("msvit::unpack_to_grid", [_UNPACK])
def _unpack_op(tokens: Tensor, rows: Tensor) -> Tensor:
    """tokens ``[T, C]`` (any strides), rows int64 ``[n_cells]`` -> ``[n_cells, C]``: the Triton gather."""
    return _launch(tokens, rows, rows.numel())


@_unpack_op.register_fake
def _(tokens, rows):
    return tokens.new_empty(rows.shape[0], tokens.shape[1])


def _setup_context(ctx, inputs, output):
    tokens, rows = inputs
    ctx.save_for_backward(rows)
    ctx.n_tokens = tokens.shape[0]


def _backward(ctx, grad_grid: Tensor):
    """Every token row receives the sum of the gradients of the cells it covers (r*r cells for a
    coarse token, one for a fine token, none for prefix rows)."""
    (rows,) = ctx.saved_tensors
    grad_tokens = grad_grid.new_zeros(ctx.n_tokens, grad_grid.shape[-1])
    return grad_tokens.index_add_(0, rows, grad_grid), None


_unpack_op.register_autograd(_backward, setup_context=_setup_context)


def triton_support(tokens: Tensor) -> str:
    """'' when the kernel can run on ``tokens``; otherwise a sentence saying why not."""
    return _triton.triton_support(tokens, "the Triton unpack")


def _check_inputs(tokens: Tensor, fine_to_row: Tensor, fine_grid) -> Tuple[int, int]:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or not tokens.is_floating_point():
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise TypeError(f"tokens must be a float torch.Tensor of shape [T, C], got {got}")
    if not isinstance(fine_to_row, Tensor) or fine_to_row.dtype != torch.int64 or fine_to_row.dim() != 2:
        got = (fine_to_row.dtype, tuple(fine_to_row.shape)) if isinstance(fine_to_row, Tensor) else type(fine_to_row)
        raise TypeError(f"fine_to_row must be an int64 tensor [B, h*w] (MixedScaleIndex.fine_to_row), got {got}")
    if fine_to_row.device != tokens.device:
        raise ValueError(f"fine_to_row is on {fine_to_row.device} but tokens are on {tokens.device}")
    if len(fine_grid) != 2 or int(fine_grid[0]) * int(fine_grid[1]) != fine_to_row.shape[1]:
        raise ValueError(f"fine_grid {tuple(fine_grid)} does not match fine_to_row's {fine_to_row.shape[1]} cells per image")
    return int(fine_grid[0]), int(fine_grid[1])


def triton_unpack_to_grid(tokens: Tensor, fine_to_row: Tensor, fine_grid) -> Tensor:
    """Packed tokens ``[T, C]`` -> fine grid ``[B, h, w, C]`` with the Triton kernel.

    tokens: float16/bfloat16/float32 ``[T, C]`` on CUDA (CPU only under TRITON_INTERPRET=1), any
    strides; fine_to_row: int64 ``[B, h*w]`` (``MixedScaleIndex.fine_to_row``), rows in ``[0, T)``
    (not checked: that would cost a host read); fine_grid: (h, w).
    Returns a contiguous ``[B, h, w, C]`` in tokens' dtype, differentiable w.r.t. tokens.
    """
    h, w = _check_inputs(tokens, fine_to_row, fine_grid)
    reason = triton_support(tokens)
    if reason:
        raise RuntimeError(reason)
    grid = _unpack_op(tokens, fine_to_row.reshape(-1).contiguous())
    return grid.view(fine_to_row.shape[0], h, w, tokens.shape[1])


def unpack_to_grid(tokens: Tensor, fine_to_row: Tensor, fine_grid, *, backend: str = "auto") -> Tensor:
    """Packed tokens ``[T, C]`` -> fine grid ``[B, h, w, C]`` (coarse tokens replicated).

    backend: ``"auto"`` (the Triton kernel on CUDA when it can run, else the reference),
    ``"triton"`` (the kernel or a clear error) or ``"reference"``. Same arguments as
    :func:`triton_unpack_to_grid`; any float dtype on the reference path.
    """
    backend = normalize_choice("unpack backend", backend, IMPLEMENTATIONS, {})
    h, w = _check_inputs(tokens, fine_to_row, fine_grid)
    if backend == "triton" or (backend == "auto" and tokens.device.type == "cuda" and not triton_support(tokens)):
        return triton_unpack_to_grid(tokens, fine_to_row, (h, w))
    return unpack_to_grid_reference(tokens, fine_to_row, (h, w))
