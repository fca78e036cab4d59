"""Varlen flash attention in Triton: forward and backward over a packed batch.

Layout (flash-attn's varlen layout): q, k, v are ``[T, H, D]`` with any strides (views of one
packed ``[T, 3, H, D]`` qkv tensor work without copies), ``cu_seqlens`` int32 ``[B+1]`` marks where
each sequence starts. Attention is non-causal and runs independently within each sequence.
Keys and values may have a layout of their own (``cu_seqlens_k`` over ``[T_k, H, D]``; query
sequence b attends to key sequence b). That is a constexpr switch (``SEPARATE_KV``): the
self-attention kernels compile exactly as before, with no extra loads; only the separate-layout
variant reads the second offsets and guards queries whose key sequence is empty (they get zeros,
as in flash-attn, and a zero gradient).

Read top to bottom: kernels (forward, backward preprocess, dk/dv, dq), launchers, the
``torch.library`` ops (autograd and fake registration, so ``torch.compile`` traces them without a
graph break), and the functional entry point :func:`triton_packed_attention`.

Portability (Triton 3.6 to 3.9, sm_70+): plain pointer arithmetic and masks (no
``tl.make_block_ptr``, removed in 3.9), ``tl.exp2``/``tl.log2`` (no libdevice), no inline asm.
Head dims that are not powers of two (e.g. 80) are padded to the next power of two and masked.
Softmax statistics live in base 2: the kernels fold ``log2(e)`` into the scale so every
exponential is an ``exp2``; the saved log-sum-exp is therefore ``log2`` of the softmax denominator.

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests), which must be set before this
module is imported: ``triton.jit`` decides at decoration time whether it builds an interpreted
function. The interpreter runs one program at a time, so it uses 16x16 tiles and no autotuning
(autotuning several configs needs a device ``do_bench``).
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import INTERPRET, TritonKernel, half_on_ampere, recording, skips_custom_op

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Head dims over 128 spill in the backward on sm_70/75 even with 16x16 tiles (compile report), and
# fp32 dk/dv at D=256 needs 66,560 B of shared memory, over a T4's 65,536: those GPUs stop at 128.
MAX_HEAD_DIM_BEFORE_AMPERE = 128

# ----------------------------------------------------------------------------------------------
# Kernels. Grids are (blocks of max_seqlen, B, H): axis 0 may be large, B and H stay < 65536.
# Programs whose block starts past their sequence's end exit at once (ragged batches). Axis 0
# has at least one program, which writes NaN where unchecked input leaves rows no program computes.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _decreases(CU_SEQLENS, count):
    """Whether ``CU_SEQLENS[0..count]`` decreases anywhere (unchecked input). Then some rows lie in
    two sequences, and no program can tell which of its rows are its own without this scan: a
    local check misses a sequence overlapping one far before it. For checked input the cost is
    ``count / 128`` pairs of vector loads of cu_seqlens (cached) per program."""
    decreasing = 0
    for first in range(0, count, 128):
        offs = first + tl.arange(0, 128)
        inside = offs < count
        lower = tl.load(CU_SEQLENS + offs, mask=inside, other=0)
        upper = tl.load(CU_SEQLENS + offs + 1, mask=inside, other=0)
        decreasing += tl.sum((upper < lower).to(tl.int32), 0)
    return decreasing > 0


@triton.jit
def _sequence_bounds(CU_SEQLENS, CU_SEQLENS_K, seq, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV: tl.constexpr):
    """(query start, query length, key start, key length, fits) of sequence ``seq``; without
    SEPARATE_KV the keys are the queries' rows and nothing more is loaded. ``fits``: the sequence
    is within max_seqlen (keys: max_seqlen_k) and ends within the T (T_K) rows there are, and
    cu_seqlens (cu_seqlens_k) decreases nowhere; one that does not (unchecked input) is not
    computed, and its rows get NaN (``_fill_unplaced``): with decreasing offsets, every row."""
    count = tl.num_programs(1)
    start_q = tl.load(CU_SEQLENS + seq)
    len_q = tl.load(CU_SEQLENS + seq + 1) - start_q
    fits = (len_q <= MAX_SEQLEN) & (start_q + len_q <= T) & ~_decreases(CU_SEQLENS, count)
    if SEPARATE_KV:
        start_k = tl.load(CU_SEQLENS_K + seq)
        len_k = tl.load(CU_SEQLENS_K + seq + 1) - start_k
        fits = fits & (len_k <= MAX_SEQLEN_K) & (start_k + len_k <= T_K) & ~_decreases(CU_SEQLENS_K, count)
    else:
        start_k = start_q
        len_k = len_q
    return start_q, len_q, start_k, len_k, fits


@triton.jit
def _fill_nan(X, lo, hi, head, stride_t, stride_h, stride_d, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    """``X[lo:hi, head, :WIDTH] = NaN``, BLOCK_R rows at a time (no iteration when lo >= hi)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_w = tl.arange(0, BLOCK_W)
    nan = tl.full([BLOCK_R, BLOCK_W], float("nan"), X.dtype.element_ty)
    for first in range(lo, hi, BLOCK_R):
        rows = first + offs_r
        mask = (rows < hi)[:, None] & (offs_w < WIDTH)[None, :]
        tl.store(X + rows.to(tl.int64)[:, None] * stride_t + head * stride_h + offs_w[None, :] * stride_d, nan, mask=mask)


@triton.jit
def _fill_unplaced(X, pid, seq, start, length, fits, rows, head, stride_t, stride_h, stride_d,
                   WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    """NaN into the rows of ``X[:, head, :WIDTH]`` (``rows`` of them) that program ``(pid, seq)``
    answers for but cannot compute: its block of a sequence that does not fit (the last block also
    every row of it past the grid), and the rows in no sequence: those after ``cu_seqlens[-1]``
    (the last program of the last sequence) and before ``cu_seqlens[0]`` (the first program).
    Checked input leaves every range empty: a few scalar operations per program."""
    end = start + length
    last = pid == tl.num_programs(0) - 1
    lo = tl.where(fits, end, start + pid * BLOCK_R)
    hi = tl.where(fits | last, end, tl.minimum(lo + BLOCK_R, end))
    hi = tl.where(last & (seq == tl.num_programs(1) - 1), rows, hi)
    _fill_nan(X, lo, tl.minimum(hi, rows), head, stride_t, stride_h, stride_d, WIDTH, BLOCK_W, BLOCK_R)
    before = tl.where((pid == 0) & (seq == 0), tl.minimum(start, rows), 0)
    _fill_nan(X, 0, before, head, stride_t, stride_h, stride_d, WIDTH, BLOCK_W, BLOCK_R)


@triton.jit(do_not_specialize=["T", "T_K", "MAX_SEQLEN", "MAX_SEQLEN_K"])  # they vary per batch: one compile
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, CU_SEQLENS_K,
    T, T_K, MAX_SEQLEN, MAX_SEQLEN_K,  # q's and k's rows, the bounds: for unchecked input (_sequence_bounds)
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_lse_h,
    SEQ_BUCKET,  # next power of two of the longest sequence: an autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SEPARATE_KV: tl.constexpr,
):
    """One program: BLOCK_M queries of one (sequence, head); online softmax over key blocks."""
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start_q, seqlen_q, start_k, seqlen_k, fits = _sequence_bounds(
        CU_SEQLENS, CU_SEQLENS_K, seq, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV
    )
    _fill_unplaced(O, pid_m, seq, start_q, seqlen_q, fits, T, head, stride_ot, stride_oh, stride_od, HEAD_DIM, BLOCK_D, BLOCK_M)
    _fill_unplaced(LSE, pid_m, seq, start_q, seqlen_q, fits, T, head, 1, stride_lse_h, 0, 1, 1, BLOCK_M)
    if (pid_m * BLOCK_M >= seqlen_q) | ~fits:
        return
    start_q = start_q.to(tl.int64)  # T * stride_t may pass 2**31 for large batches
    start_k = start_k.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    rows_q = start_q + offs_m

    q = tl.load(
        Q + rows_q[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        rows_k = start_k + cols
        # k is loaded transposed, [BLOCK_D, BLOCK_N], so the score tile is a plain q @ kT
        kt = tl.load(
            K + rows_k[None, :] * stride_kt + head * stride_kh + offs_d[:, None] * stride_kd,
            mask=mask_n[None, :] & mask_d[:, None], other=0.0,
        )
        v = tl.load(
            V + rows_k[:, None] * stride_vt + head * stride_vh + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # the first block always holds key 0 of a non-empty key sequence, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SEPARATE_KV:  # no keys: l_i = 0 and acc = 0; write zeros (flash-attn's convention), not 0/0
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_i[:, None]
    tl.store(
        O + rows_q[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
        acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(LSE + head * stride_lse_h + rows_q, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _probabilities(scores, lse, one_key):
    """Softmax probabilities ``exp2(scores - lse)`` recomputed in the backward. Over one key the
    probability is exactly 1 (NaN for a non-finite score, as in the forward), but a recomputed score
    may differ from the forward's by a rounding (another product order): ``lse - lse`` is 0 exactly
    where the forward's score was finite."""
    return tl.exp2(tl.where(one_key, lse, scores) - lse)


@triton.jit
def _score_gradients(p, dp, delta, one_key):
    """dS = P * (dP - delta) with delta = rowsum(dO * O). Over one key O = v, so delta = dP and
    dS = 0 exactly (dq = dk = 0): the delta of the preprocess sums dO * O in another order, and
    its rounding would leave a gradient of ~1e-7 where there is none."""
    return p * (dp - tl.where(one_key, dp, delta))


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, T,
    stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod,
    stride_delta_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32): the softmax-gradient row term."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_t.to(tl.int64)
    o = tl.load(O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_delta_h + rows, delta, mask=offs_t < T)


@triton.jit(do_not_specialize=["T", "T_K", "MAX_SEQLEN", "MAX_SEQLEN_K"])  # they vary per batch: one compile
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS, CU_SEQLENS_K,
    T, T_K, MAX_SEQLEN, MAX_SEQLEN_K,
    sm_scale, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    stride_lse_h,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SEPARATE_KV: tl.constexpr,
):
    """One program: dk, dv of BLOCK_N keys of one (sequence, head), looping over query blocks.

    With P^T = exp2(k q^T * qk_scale - lse): dv = P^T dO, dS^T = P^T * (v dO^T - delta),
    dk = sm_scale * dS^T q. Each program owns its key rows, so no atomics are needed.
    """
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start_q, seqlen_q, start_k, seqlen_k, fits = _sequence_bounds(
        CU_SEQLENS, CU_SEQLENS_K, seq, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV
    )
    _fill_unplaced(DK, pid_n, seq, start_k, seqlen_k, fits, T_K, head, stride_dkt, stride_dkh, stride_dkd, HEAD_DIM, BLOCK_D, BLOCK_N)
    _fill_unplaced(DV, pid_n, seq, start_k, seqlen_k, fits, T_K, head, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, BLOCK_D, BLOCK_N)
    if (pid_n * BLOCK_N >= seqlen_k) | ~fits:
        return
    start_q = start_q.to(tl.int64)
    start_k = start_k.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen_k
    mask_d = offs_d < HEAD_DIM
    rows_k = start_k + offs_n
    mask_kd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + rows_k[:, None] * stride_kt + head * stride_kh + offs_d[None, :] * stride_kd, mask=mask_kd, other=0.0)
    v = tl.load(V + rows_k[:, None] * stride_vt + head * stride_vh + offs_d[None, :] * stride_vd, mask=mask_kd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for start_m in range(0, seqlen_q, BLOCK_M):  # no queries (seqlen_q = 0): dk = dv = 0
        cols = start_m + offs_m
        mask_m = cols < seqlen_q
        rows_q = start_q + cols
        # q and dO loaded transposed, [BLOCK_D, BLOCK_M]
        mask_dm = mask_d[:, None] & mask_m[None, :]
        qt = tl.load(Q + rows_q[None, :] * stride_qt + head * stride_qh + offs_d[:, None] * stride_qd, mask=mask_dm, other=0.0)
        dot_t = tl.load(DO + rows_q[None, :] * stride_dot + head * stride_doh + offs_d[:, None] * stride_dod, mask=mask_dm, other=0.0)
        lse = tl.load(LSE + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)

        pt = _probabilities(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale, lse[None, :], seqlen_k == 1)
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(v.dtype), tl.trans(dot_t), input_precision=DOT_PRECISION)
        dpt = tl.dot(v, dot_t, input_precision=DOT_PRECISION)
        dst = _score_gradients(pt, dpt, delta[None, :], seqlen_k == 1)
        dk += tl.dot(dst.to(k.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + rows_k[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=mask_kd)
    tl.store(DV + rows_k[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask_kd)


@triton.jit(do_not_specialize=["T", "T_K", "MAX_SEQLEN", "MAX_SEQLEN_K"])  # they vary per batch: one compile
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, CU_SEQLENS_K,
    T, T_K, MAX_SEQLEN, MAX_SEQLEN_K,
    sm_scale, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh, stride_dqd,
    stride_lse_h,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SEPARATE_KV: tl.constexpr,
):
    """One program: dq of BLOCK_M queries of one (sequence, head): dq = sm_scale * dS k."""
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start_q, seqlen_q, start_k, seqlen_k, fits = _sequence_bounds(
        CU_SEQLENS, CU_SEQLENS_K, seq, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV
    )
    _fill_unplaced(DQ, pid_m, seq, start_q, seqlen_q, fits, T, head, stride_dqt, stride_dqh, stride_dqd, HEAD_DIM, BLOCK_D, BLOCK_M)
    if (pid_m * BLOCK_M >= seqlen_q) | ~fits:
        return
    start_q = start_q.to(tl.int64)
    start_k = start_k.to(tl.int64)
    if SEPARATE_KV:
        # both sequence offsets move into the base pointers, so no int64 offset stays live over the
        # loop: with the two offsets held, fp32 32x16 tiles spilled 8-24 B on sm_70/86/89 (compile report)
        K += start_k * stride_kt
        V += start_k * stride_vt
        start_k = 0
        Q += start_q * stride_qt
        DO += start_q * stride_dot
        DQ += start_q * stride_dqt
        LSE += start_q
        DELTA += start_q
        start_q = 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    rows_q = start_q + offs_m
    mask_qd = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + rows_q[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd, mask=mask_qd, other=0.0)
    do = tl.load(DO + rows_q[:, None] * stride_dot + head * stride_doh + offs_d[None, :] * stride_dod, mask=mask_qd, other=0.0)
    lse = tl.load(LSE + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen_k, BLOCK_N):  # no keys (seqlen_k = 0): dq = 0, as the output is constant
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        rows_k = start_k + cols
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kt = tl.load(K + rows_k[None, :] * stride_kt + head * stride_kh + offs_d[:, None] * stride_kd, mask=mask_dn, other=0.0)
        vt = tl.load(V + rows_k[None, :] * stride_vt + head * stride_vh + offs_d[:, None] * stride_vd, mask=mask_dn, other=0.0)
        p = _probabilities(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale, lse[:, None], seqlen_k == 1)
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = _score_gradients(p, dp, delta[:, None], seqlen_k == 1)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + rows_q[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask_qd)


# ----------------------------------------------------------------------------------------------
# Launch configuration. GPU tile sizes are autotuned per (head dim, sequence-length bucket,
# dtypes) among the configs launch.TritonKernel keeps for the GPU generation. The compile report
# (bench/results/compile, `python -m msvit_kernels.compile_report`) shows every kept config at zero
# spills and within shared memory: the flash-attention tiles (64-128 rows) spill 1-60 KB per thread
# in fp32 (IEEE dots run on FMA units) and on sm_70/75, so they are kept to fp16/bf16 on sm_80+;
# each list ends with a tile that is clean everywhere. Wide head dims (BLOCK_D > 64: D = 80, 128,
# 256) keep one 16x16 tile on 8 warps (2 or 4 warps spill 0.6-5 KB at D=128); it is clean for
# D <= 128 in fp16/bf16 on every target, but D = 256 still spills ~1 KB in the backward on sm_70/75
# and in fp32 (see the report): correct, slower there.
# ----------------------------------------------------------------------------------------------


def _big(capability: int, meta: dict) -> bool:
    return half_on_ampere(capability, meta) and meta["BLOCK_D"] <= 64


def _narrow(capability: int, meta: dict) -> bool:
    return meta["BLOCK_D"] <= 64


def _wide(capability: int, meta: dict) -> bool:
    return meta["BLOCK_D"] > 64


# RTX 30xx / 40xx (sm_86 / 89): since the kernels write NaN for rows unchecked input leaves
# uncomputed (_fill_unplaced), two 8-warp tiles spill there (compile report: dq 64x64 12 B, the
# separate-key forward 128x64 44 B); sm_80 / 90 compile them clean. Those GPUs take the others.
CONSUMER = (86, 89)


def _big_not_consumer(capability: int, meta: dict) -> bool:
    return _big(capability, meta) and capability not in CONSUMER


def _big_self_on_consumer(capability: int, meta: dict) -> bool:
    return _big(capability, meta) and not (meta.get("SEPARATE_KV") and capability in CONSUMER)


# fp32 backward on sm_75/80: the narrow tiles spill 8 B there since the NaN guards (compile
# report); those take the 16x16 tile instead.
def _fp32_spills(capability: int, meta: dict) -> bool:
    return meta.get("DOT_PRECISION") == "ieee" and capability in (75, 80)


def _narrow_backward(capability: int, meta: dict) -> bool:
    return _narrow(capability, meta) and not _fp32_spills(capability, meta)


def _wide_or_small_backward(capability: int, meta: dict) -> bool:
    return _wide(capability, meta) or _fp32_spills(capability, meta)


_FWD_CONFIGS = [
    (triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3), _big_self_on_consumer),
    (triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3), _big),
    (triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1), _narrow),
    (triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=8, num_stages=1), _wide),
]
_BWD_CONFIGS = [  # BLOCK_N: keys a dk/dv program owns (queries a dq program owns: BLOCK_M)
    (triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3), _big),
    (triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=1), _big),
    (triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1), _narrow_backward),
    (triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=8, num_stages=1), _wide_or_small_backward),
]
_DQ_CONFIGS = [
    (triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=1), _big_not_consumer),
    (triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2), _big),
    (triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1), _narrow_backward),
    (triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=8, num_stages=1), _wide_or_small_backward),
]
_AUTOTUNE_KEY = ["HEAD_DIM", "SEQ_BUCKET"]  # the autotuner adds the tensor dtypes itself
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}  # the interpreter's cost is per tile op, not per FLOP

_fwd = TritonKernel(_attn_fwd_kernel, _FWD_CONFIGS, _AUTOTUNE_KEY, _INTERPRET_META)
_bwd_dkdv = TritonKernel(_attn_bwd_dkdv_kernel, _BWD_CONFIGS, _AUTOTUNE_KEY, _INTERPRET_META)
_bwd_dq = TritonKernel(_attn_bwd_dq_kernel, _DQ_CONFIGS, _AUTOTUNE_KEY, _INTERPRET_META)
_bwd_delta = TritonKernel(_attn_bwd_delta_kernel)  # the launcher fixes its tile


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
# torch.library ops: opaque to torch.compile (no graph break), differentiable via register_autograd
# (which plays the role of a torch.autograd.Function: save q, k, v, out, lse; call the backward op).
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("msvit::triton_varlen_attention", mutates_args=())
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


@torch.library.custom_op("msvit::triton_varlen_attention_backward", mutates_args=())
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
