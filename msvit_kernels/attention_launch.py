"""Varlen flash attention in Triton, the op: launchers, ``torch.library`` ops and the entry point.

The kernels and their launch configurations are in ``attention_kernel.py`` (read it first); this
file, top to bottom: the launchers (:func:`attention_forward`, :func:`attention_backward`), the
``torch.library`` ops with their autograd and fake registrations (so ``torch.compile`` traces them
without a graph break), and the functional entry point :func:`triton_packed_attention`.
"""

import math
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ._triton import INTERPRET, kernel_op, recording, skips_custom_op
from .attention_kernel import (
    LOG2E,
    MAX_HEAD_DIM,
    MAX_HEAD_DIM_BEFORE_AMPERE,  # noqa: F401  backends reads it here (its triton entry)
    _bwd_delta,
    _bwd_dkdv,
    _bwd_dq,
    _fwd,
)


def _common_meta(q: Tensor, max_seqlen: int, separate_kv: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(
        SEQ_BUCKET=triton.next_power_of_2(max(max_seqlen, 1)),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot needs K >= 16
        # fp32 inputs: exact fp32 products (no TF32) so results track the fp32 reference
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SEPARATE_KV=separate_kv,
    )


def _grid(max_seqlen: int, batch: int, heads: int, block: str):
    # at least one program per (sequence, head): with max_seqlen = 0 it writes NaN over the rows
    # of any non-empty sequence (unchecked input; see attention_forward)
    return lambda meta: (max(triton.cdiv(max_seqlen, meta[block]), 1), batch, heads)


def _check_launchable(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton attention takes float16, bfloat16 or float32, got {q.dtype}")
    if q.device.type != "cuda" and not INTERPRET and not recording():
        raise RuntimeError("triton attention runs on CUDA; on CPU set TRITON_INTERPRET=1 before importing msvit_kernels")


def _key_layout(q: Tensor, k: Tensor, cu_seqlens: Tensor, max_seqlen: int, cu_seqlens_k, max_seqlen_k):
    """(cu_seqlens_k, longest sequence of either layout, separate?, the kernels' ``T, T_K,
    MAX_SEQLEN, MAX_SEQLEN_K``): self-attention passes its own offsets and bound again (the
    kernels do not read them) and compiles the SEPARATE_KV=False variant."""
    if cu_seqlens_k is None:
        return cu_seqlens, max_seqlen, False, (q.shape[0], k.shape[0], max_seqlen, max_seqlen)
    return cu_seqlens_k, max(max_seqlen, max_seqlen_k), True, (q.shape[0], k.shape[0], max_seqlen, max_seqlen_k)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Launch the forward kernel.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` (``T_k = T`` without cu_seqlens_k) fp16/bf16/fp32, any
    strides; cu_seqlens (cu_seqlens_k): int32 ``[B+1]`` over q's (k's) rows.
    Returns ``out`` ``[T, H, D]`` (contiguous, q's dtype) and ``lse`` fp32 ``[H, T]``, the base-2
    log-sum-exp of the scaled scores of every query row (what the backward needs; -inf for a
    query without keys, whose output is zeros).

    Unchecked input (``packed_attention(check_values=False)`` reads nothing back): a row no
    program can compute gets NaN in ``out`` and ``lse``, never stale memory, and the backward
    writes NaN into its gradients: every row of a sequence longer than max_seqlen (keys:
    max_seqlen_k) or ending past the rows there are (grid programs cover max_seqlen rows of a
    sequence, and those past it are never visited), and every row before cu_seqlens[0] or after
    cu_seqlens[-1] (in no sequence). The kernel writes these NaN itself (``_fill_unplaced``): for
    checked input that costs a few scalar operations per program, where allocating ``out`` with
    ``torch.full(nan)`` would add a fill of all T*H*D elements to every call. The launcher fills
    ``out`` only when there is no sequence at all (B = 0: no program runs; an int check on the
    host, no device read). Decreasing cu_seqlens (cu_seqlens_k) put rows in two sequences: every
    row gets NaN (the kernels scan the offsets, ``_decreases``). A call with no key row at all
    gives zeros, as for any query without keys.
    """
    _check_launchable(q, k, v)
    total, heads, _ = q.shape
    out = torch.empty((total, heads, q.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    batch = cu_seqlens.numel() - 1
    if total == 0:
        return out, lse
    if batch == 0:  # every row lies in no sequence
        return out.fill_(float("nan")), lse.fill_(float("nan"))
    if k.shape[0] == 0:  # only with a separate key layout: every query has an empty key sequence
        return out.zero_(), lse.fill_(float("-inf"))
    cu_k, longest, separate_kv, bounds = _key_layout(q, k, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    _fwd[_grid(max_seqlen, batch, heads, "BLOCK_M")](
        q, k, v, out, lse, cu_seqlens, cu_k, *bounds, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
        **_common_meta(q, longest, separate_kv),
    )
    return out, lse


def attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels: ``delta`` preprocess, then dk/dv over key blocks, dq over query blocks.

    do, q, out: ``[T, H, D]``, k, v: ``[T_k, H, D]`` (any strides); lse: fp32 ``[H, T]`` from the
    forward. Returns dq ``[T, H, D]``, dk, dv ``[T_k, H, D]``: contiguous, in q's dtype. Rows the
    forward could not compute (unchecked input, see :func:`attention_forward`) get NaN gradients.
    """
    total, heads, head_dim = q.shape
    dq = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((k.shape[0], heads, head_dim), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    batch = cu_seqlens.numel() - 1
    if total == 0 or k.shape[0] == 0:
        # no query meets a key: every gradient is zero (empty tensors for self-attention)
        return dq.zero_(), dk.zero_(), dv.zero_()
    if batch == 0:  # every row lies in no sequence
        return dq.fill_(float("nan")), dk.fill_(float("nan")), dv.fill_(float("nan"))
    cu_k, longest, separate_kv, bounds = _key_layout(q, k, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    meta = _common_meta(q, longest, separate_kv)
    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    block_t = 16 if INTERPRET else 64
    _bwd_delta[(triton.cdiv(total, block_t), heads)](
        out, do, delta, total, *out.stride(), *do.stride(), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_T=block_t,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    max_seqlen_keys = max_seqlen if cu_seqlens_k is None else max_seqlen_k
    _bwd_dkdv[_grid(max_seqlen_keys, batch, heads, "BLOCK_N")](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, cu_k, *bounds, scale, scale * LOG2E,
        *strides, *dk.stride(), *dv.stride(), lse.stride(0), **meta,
    )
    _bwd_dq[_grid(max_seqlen, batch, heads, "BLOCK_M")](
        q, k, v, do, lse, delta, dq, cu_seqlens, cu_k, *bounds, scale, scale * LOG2E,
        *strides, *dq.stride(), lse.stride(0), **meta,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library ops (``kernel_op``: triton_ops that torch.compile and AOTInductor trace into on a GPU,
# opaque custom ops under the interpreter), differentiable via register_autograd (which plays the
# role of a torch.autograd.Function: save q, k, v, out, lse; call the backward op).
# ----------------------------------------------------------------------------------------------


@kernel_op("msvit::triton_varlen_attention", [_fwd])
def triton_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Forward op: returns ``(out [T, H, D], lse fp32 [H, T])``; see :func:`attention_forward`."""
    return attention_forward(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k)


@triton_varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k=None, max_seqlen_k=None):
    total, heads, head_dim = q.shape
    return q.new_empty((total, heads, head_dim)), q.new_empty((heads, total), dtype=torch.float32)


@kernel_op("msvit::triton_varlen_attention_backward", [_bwd_delta, _bwd_dkdv, _bwd_dq])
def triton_varlen_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward op: returns ``(dq [T, H, D], dk, dv [T_k, H, D])``; see :func:`attention_backward`."""
    return attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k)


@triton_varlen_attention_backward.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, cu_seqlens_k=None, max_seqlen_k=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_seqlens_k)
    ctx.max_seqlen = max_seqlen
    ctx.max_seqlen_k = max_seqlen_k
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    del grad_lse  # lse is a by-product for the backward, not a differentiable output
    q, k, v, out, lse, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = triton_varlen_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, cu_seqlens_k, ctx.max_seqlen_k
    )
    return dq, dk, dv, None, None, None, None, None


triton_varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def triton_packed_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale=None,
    *, cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
) -> Tensor:
    """Non-causal attention within each sequence of a packed batch, with the Triton kernels.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` (``T_k = T`` without cu_seqlens_k) float16/bfloat16/
    float32 on CUDA (CPU only under TRITON_INTERPRET=1), any strides, ``D <= 256``; cu_seqlens
    (cu_seqlens_k, default cu_seqlens): int32 ``[B+1]`` on q's device over q's (k's) rows;
    max_seqlen (max_seqlen_k): the longest query (key) sequence, Python int; scale: softmax
    scale, default ``D ** -0.5``. Queries with an empty key sequence get zeros.
    Returns ``[T, H, D]`` (contiguous, q's dtype); differentiable w.r.t. q, k and v.
    No input validation beyond launchability: ``msvit_kernels.packed_attention`` validates.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if max_seqlen_k is not None:
        max_seqlen_k = int(max_seqlen_k)
    if skips_custom_op(q, k, v):
        return attention_forward(q, k, v, cu_seqlens, int(max_seqlen), float(scale), cu_seqlens_k, max_seqlen_k)[0]
    out, _ = triton_varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), float(scale), cu_seqlens_k, max_seqlen_k)
    return out
