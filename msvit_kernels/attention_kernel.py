"""Varlen flash attention in Triton: forward and backward over a packed batch.

Layout (flash-attn's varlen layout): q, k, v are ``[T, H, D]`` with any strides (views of one
packed ``[T, 3, H, D]`` qkv tensor work without copies), ``cu_seqlens`` int32 ``[B+1]`` marks where
each sequence starts. Attention is non-causal and runs independently within each sequence.
Keys and values may have a layout of their own (``cu_seqlens_k`` over ``[T_k, H, D]``; query
sequence b attends to key sequence b). That is a constexpr switch (``SEPARATE_KV``): the
self-attention kernels compile exactly as before, with no extra loads; only the separate-layout
variant reads the second offsets and guards queries whose key sequence is empty (they get zeros,
as in flash-attn, and a zero gradient).

This file holds the kernels, read top to bottom (forward, backward preprocess, dk/dv, dq), and
their launch configurations; ``attention_launch.py`` the launchers, the ``torch.library`` ops and
the functional entry point ``triton_packed_attention`` (one op: read this file, then that one).

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
import triton
import triton.language as tl

from ._triton import TritonKernel, half_on_ampere

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
    ``count / 64`` pairs of 64-wide loads of cu_seqlens (cached) per forward program (compile
    report: 128-wide and 32-wide scans made fp32 16x16 tiles spill 8-20 B on sm_80/86/89). The
    backward does not scan: the forward wrote NaN into every row's lse, so every gradient it
    computes is NaN, and rows two sequences claim get NaN from both."""
    decreasing = 0
    for first in range(0, count, 64):
        offs = first + tl.arange(0, 64)
        inside = offs < count
        lower = tl.load(CU_SEQLENS + offs, mask=inside, other=0)
        upper = tl.load(CU_SEQLENS + offs + 1, mask=inside, other=0)
        decreasing += tl.sum((upper < lower).to(tl.int32), 0)
    return decreasing > 0


@triton.jit
def _program_sequence(CU_SEQLENS, CU_SEQLENS_K, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV: tl.constexpr,
                      SCAN: tl.constexpr):
    """This program's (block, sequence, head) and its sequence's (query start, query length, key
    start, key length, fits); without SEPARATE_KV the keys are the queries' rows and nothing more
    is loaded. ``fits``: the sequence is within max_seqlen (keys: max_seqlen_k) and ends within
    the T (T_K) rows there are, and (SCAN, the forward) cu_seqlens (cu_seqlens_k) decreases
    nowhere; one that does not (unchecked input) is not computed, and its rows get NaN
    (``_fill_unplaced``): with decreasing offsets, every row."""
    seq = tl.program_id(1)
    count = tl.num_programs(1)
    start_q = tl.load(CU_SEQLENS + seq)
    len_q = tl.load(CU_SEQLENS + seq + 1) - start_q
    fits = (len_q <= MAX_SEQLEN) & (start_q + len_q <= T)
    if SCAN:
        fits = fits & ~_decreases(CU_SEQLENS, count)
    if SEPARATE_KV:
        start_k = tl.load(CU_SEQLENS_K + seq)
        len_k = tl.load(CU_SEQLENS_K + seq + 1) - start_k
        fits = fits & (len_k <= MAX_SEQLEN_K) & (start_k + len_k <= T_K)
        if SCAN:
            fits = fits & ~_decreases(CU_SEQLENS_K, count)
    else:
        start_k = start_q
        len_k = len_q
    return tl.program_id(0), seq, tl.program_id(2), start_q, len_q, start_k, len_k, fits


@triton.jit
def _block(first, start, length, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """BLOCK rows from offset ``first`` of the sequence at packed row ``start`` of ``length`` rows:
    (packed rows [BLOCK] in int64, as T * stride_t may pass 2**31, row mask, head-dim offsets
    [BLOCK_D], head-dim mask)."""
    offs = first + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return start + offs.to(tl.int64), offs < length, offs_d, offs_d < HEAD_DIM


@triton.jit
def _tile(X, rows, offs_d, mask_r, mask_d, head, stride_t, stride_h, stride_d, TRANSPOSED: tl.constexpr):
    """Pointers into ``X[rows, head, offs_d]`` and their mask: a ``[rows, D]`` tile, or with
    TRANSPOSED a ``[D, rows]`` one (the operand a dot takes on its right)."""
    if TRANSPOSED:
        ptrs = X + rows[None, :] * stride_t + head * stride_h + offs_d[:, None] * stride_d
        mask = mask_r[None, :] & mask_d[:, None]
    else:
        ptrs = X + rows[:, None] * stride_t + head * stride_h + offs_d[None, :] * stride_d
        mask = mask_r[:, None] & mask_d[None, :]
    return ptrs, mask


@triton.jit
def _load(X, rows, offs_d, mask_r, mask_d, head, stride_t, stride_h, stride_d, TRANSPOSED: tl.constexpr):
    """The ``_tile`` of X, zeros where masked (no value past a sequence's end enters a dot)."""
    ptrs, mask = _tile(X, rows, offs_d, mask_r, mask_d, head, stride_t, stride_h, stride_d, TRANSPOSED)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store(X, value, rows, offs_d, mask_r, mask_d, head, stride_t, stride_h, stride_d):
    """``X[rows, head, offs_d] = value`` (a [rows, D] tile, cast to X's dtype) within the masks."""
    ptrs, mask = _tile(X, rows, offs_d, mask_r, mask_d, head, stride_t, stride_h, stride_d, False)
    tl.store(ptrs, value.to(X.dtype.element_ty), mask=mask)


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
    final = last & (seq == tl.num_programs(1) - 1)
    lo = tl.where(fits, end, start + pid * BLOCK_R)
    # the very last program of an unfit sequence fills from its start (or end, when the offsets
    # decrease there): rows past every offset are then NaN however far its block starts
    lo = tl.where(final & ~fits, tl.minimum(start, end), lo)
    hi = tl.where(fits | last, end, tl.minimum(lo + BLOCK_R, end))
    hi = tl.where(final, rows, hi)
    _fill_nan(X, lo, tl.minimum(hi, rows), head, stride_t, stride_h, stride_d, WIDTH, BLOCK_W, BLOCK_R)
    before = tl.where((pid == 0) & (seq == 0), tl.minimum(start, rows), 0)
    _fill_nan(X, 0, before, head, stride_t, stride_h, stride_d, WIDTH, BLOCK_W, BLOCK_R)


@triton.jit(do_not_specialize=["T", "T_K", "MAX_SEQLEN", "MAX_SEQLEN_K"])  # they vary per batch: one compile
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, CU_SEQLENS_K,
    T, T_K, MAX_SEQLEN, MAX_SEQLEN_K,  # q's and k's rows, the bounds: for unchecked input (_program_sequence)
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
    pid_m, seq, head, start_q, seqlen_q, start_k, seqlen_k, fits = _program_sequence(
        CU_SEQLENS, CU_SEQLENS_K, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV, True
    )
    _fill_unplaced(O, pid_m, seq, start_q, seqlen_q, fits, T, head, stride_ot, stride_oh, stride_od, HEAD_DIM, BLOCK_D, BLOCK_M)
    _fill_unplaced(LSE, pid_m, seq, start_q, seqlen_q, fits, T, head, 1, stride_lse_h, 0, 1, 1, BLOCK_M)
    if (pid_m * BLOCK_M >= seqlen_q) | ~fits:
        return

    rows_q, mask_m, offs_d, mask_d = _block(pid_m * BLOCK_M, start_q, seqlen_q, BLOCK_M, BLOCK_D, HEAD_DIM)
    q = _load(Q, rows_q, offs_d, mask_m, mask_d, head, stride_qt, stride_qh, stride_qd, False)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen_k, BLOCK_N):
        rows_k, mask_n, offs_d, mask_d = _block(start_n, start_k, seqlen_k, BLOCK_N, BLOCK_D, HEAD_DIM)
        # k is loaded transposed, [BLOCK_D, BLOCK_N], so the score tile is a plain q @ kT
        kt = _load(K, rows_k, offs_d, mask_n, mask_d, head, stride_kt, stride_kh, stride_kd, True)
        v = _load(V, rows_k, offs_d, mask_n, mask_d, head, stride_vt, stride_vh, stride_vd, False)
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
    _store(O, acc / l_i[:, None], rows_q, offs_d, mask_m, mask_d, head, stride_ot, stride_oh, stride_od)
    tl.store(LSE + head * stride_lse_h + rows_q, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _probabilities(scores, lse, one_key):
    """Softmax probabilities ``exp2(scores - lse)`` recomputed in the backward. Over one key the
    probability is exactly 1 (NaN for a non-finite score, as in the forward), but a recomputed score
    may differ from the forward's by a rounding (another product order): ``lse - lse`` is 0 exactly
    where the forward's score was finite."""
    return tl.exp2(tl.where(one_key, lse, scores) - lse)


@triton.jit
def _zero_over_one_key(grad, one_key):
    """dq or dk accumulated over a sequence of one key: exactly 0 (dS = P * (dP - delta) with P = 1
    and delta = dP), where the sum holds only the rounding of dP - delta (~1e-7: delta sums dO * O
    in another order). ``grad * 0`` keeps a NaN (a non-finite score), as softmax's gradient does.
    After the loop, once per tile: a select inside it made fp32 16x16 tiles spill on sm_75."""
    return tl.where(one_key, grad * 0.0, grad)


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
    pid_n, seq, head, start_q, seqlen_q, start_k, seqlen_k, fits = _program_sequence(
        CU_SEQLENS, CU_SEQLENS_K, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV, False
    )
    _fill_unplaced(DK, pid_n, seq, start_k, seqlen_k, fits, T_K, head, stride_dkt, stride_dkh, stride_dkd, HEAD_DIM, BLOCK_D, BLOCK_N)
    _fill_unplaced(DV, pid_n, seq, start_k, seqlen_k, fits, T_K, head, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, BLOCK_D, BLOCK_N)
    if (pid_n * BLOCK_N >= seqlen_k) | ~fits:
        return

    rows_k, mask_n, offs_d, mask_d = _block(pid_n * BLOCK_N, start_k, seqlen_k, BLOCK_N, BLOCK_D, HEAD_DIM)
    k = _load(K, rows_k, offs_d, mask_n, mask_d, head, stride_kt, stride_kh, stride_kd, False)
    v = _load(V, rows_k, offs_d, mask_n, mask_d, head, stride_vt, stride_vh, stride_vd, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for start_m in range(0, seqlen_q, BLOCK_M):  # no queries (seqlen_q = 0): dk = dv = 0
        rows_q, mask_m, offs_d, mask_d = _block(start_m, start_q, seqlen_q, BLOCK_M, BLOCK_D, HEAD_DIM)
        # q and dO loaded transposed, [BLOCK_D, BLOCK_M]
        qt = _load(Q, rows_q, offs_d, mask_m, mask_d, head, stride_qt, stride_qh, stride_qd, True)
        dot_t = _load(DO, rows_q, offs_d, mask_m, mask_d, head, stride_dot, stride_doh, stride_dod, True)
        lse = tl.load(LSE + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)

        pt = _probabilities(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale, lse[None, :], seqlen_k == 1)
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(v.dtype), tl.trans(dot_t), input_precision=DOT_PRECISION)
        dpt = tl.dot(v, dot_t, input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(k.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

    _store(DK, _zero_over_one_key(dk, seqlen_k == 1) * sm_scale, rows_k, offs_d, mask_n, mask_d, head, stride_dkt, stride_dkh, stride_dkd)
    _store(DV, dv, rows_k, offs_d, mask_n, mask_d, head, stride_dvt, stride_dvh, stride_dvd)


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
    pid_m, seq, head, start_q, seqlen_q, start_k, seqlen_k, fits = _program_sequence(
        CU_SEQLENS, CU_SEQLENS_K, T, T_K, MAX_SEQLEN, MAX_SEQLEN_K, SEPARATE_KV, False
    )
    _fill_unplaced(DQ, pid_m, seq, start_q, seqlen_q, fits, T, head, stride_dqt, stride_dqh, stride_dqd, HEAD_DIM, BLOCK_D, BLOCK_M)
    if (pid_m * BLOCK_M >= seqlen_q) | ~fits:
        return
    if SEPARATE_KV:
        # both sequence offsets move into the base pointers, so no int64 offset stays live over the
        # loop: with the two offsets held, fp32 32x16 tiles spilled 8-24 B on sm_70/86/89 (compile report)
        K += start_k.to(tl.int64) * stride_kt
        V += start_k.to(tl.int64) * stride_vt
        start_k = 0
        Q += start_q.to(tl.int64) * stride_qt
        DO += start_q.to(tl.int64) * stride_dot
        DQ += start_q.to(tl.int64) * stride_dqt
        LSE += start_q
        DELTA += start_q
        start_q = 0

    rows_q, mask_m, offs_d, mask_d = _block(pid_m * BLOCK_M, start_q, seqlen_q, BLOCK_M, BLOCK_D, HEAD_DIM)
    q = _load(Q, rows_q, offs_d, mask_m, mask_d, head, stride_qt, stride_qh, stride_qd, False)
    do = _load(DO, rows_q, offs_d, mask_m, mask_d, head, stride_dot, stride_doh, stride_dod, False)
    lse = tl.load(LSE + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + head * stride_lse_h + rows_q, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen_k, BLOCK_N):  # no keys (seqlen_k = 0): dq = 0, as the output is constant
        rows_k, mask_n, offs_d, mask_d = _block(start_n, start_k, seqlen_k, BLOCK_N, BLOCK_D, HEAD_DIM)
        kt = _load(K, rows_k, offs_d, mask_n, mask_d, head, stride_kt, stride_kh, stride_kd, True)
        vt = _load(V, rows_k, offs_d, mask_n, mask_d, head, stride_vt, stride_vh, stride_vd, True)
        p = _probabilities(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale, lse[:, None], seqlen_k == 1)
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    _store(DQ, _zero_over_one_key(dq, seqlen_k == 1) * sm_scale, rows_q, offs_d, mask_m, mask_d, head, stride_dqt, stride_dqh, stride_dqd)


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
