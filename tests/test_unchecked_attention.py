"""packed_attention on input nobody checked (``check_values=False``, what the model passes to skip a
host read): every backend answers a row it cannot compute with NaN, never stale memory or attention
over a truncated sequence, and keeps every other row exact, forward and backward; a static layout
(an upper bound, padding sequences) stays exact. NaN in a query gives NaN in its row (issue 21).
Decreasing offsets make every row NaN (issue 26)."""

import contextlib

import pytest
import torch

from msvit_kernels import packed_attention, reference

from helpers import DEVICE, needs_triton

BACKENDS = ["reference", "padded_sdpa", pytest.param("triton", marks=needs_triton)]
HOST_FREE = ["padded_sdpa", pytest.param("triton", marks=needs_triton)]

# id: (cu_seqlens, rows T, max_seqlen, the sequences (start, end) that stay exact). The Triton
# interpreter's tiles are 16 rows: 20-row runs reach past a program's block and past the grid.
CASES = {
    "max_seqlen_0": ([0, 3, 8], 8, 0, []),
    "max_seqlen_below_the_longest": ([0, 3, 23], 23, 3, [(0, 3)]),
    "cu_seqlens_ends_before_T": ([0, 3, 7], 27, 7, [(0, 3), (3, 7)]),
    "cu_seqlens_starts_after_0": ([2, 5, 9], 9, 4, [(2, 5), (5, 9)]),
    "no_sequence": ([0], 4, 0, []),
    "static_bound_and_padding_sequences": ([0, 3, 10, 10, 14], 14, 40, [(0, 3), (3, 10), (10, 14)]),
    # rows in two sequences (issue 26): no row's sequence is known, every row is NaN; the second
    # decreases far from sequence 3 (rows 3:4), which overlaps sequence 0 (rows 0:20) all the same
    "decreasing": ([0, 5, 3, 10], 10, 7, []),
    "decreasing_far_before": ([0, 20, 2, 3, 4, 24], 24, 20, []),
    "decreasing_at_the_end": ([0, 10, 4], 12, 40, []),  # rows 10, 11 lie past every offset; 3 blocks each
}


def leaves(rows, heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, dim, generator=gen).to(DEVICE).requires_grad_() for _ in range(3)]


def int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def unchecked(backend, q, k, v, cu_seqlens, max_seqlen, **key_layout):
    return packed_attention(q, k, v, int32(cu_seqlens), max_seqlen, backend=backend, check_values=False, **key_layout)


def exact(q, k, v, start, end):
    """One sequence's attention, its layout checked."""
    q, k, v = q[start:end], k[start:end], v[start:end]
    return packed_attention(q, k, v, int32([0, end - start]), end - start, backend="reference")


def check_rows(got, want_parts, rows):
    """Rows of the exact sequences equal ``want_parts``; every other row is NaN."""
    placed = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    for (start, end), want in want_parts:
        torch.testing.assert_close(got[start:end], want, rtol=1e-5, atol=1e-5)
        placed[start:end] = True
    assert torch.isnan(got[~placed]).all(), f"rows {(~placed).nonzero().flatten().tolist()} should all be NaN"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_no_backend_can_compute_are_nan_the_others_exact(backend, case):
    cu, rows, max_seqlen, sequences = CASES[case]
    q, k, v = leaves(rows)
    out = unchecked(backend, q, k, v, cu, max_seqlen)
    check_rows(out, [(s, exact(q, k, v, *s)) for s in sequences], rows)


@pytest.mark.parametrize("case", ["max_seqlen_below_the_longest", "cu_seqlens_ends_before_T"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_the_exact_sequences_stay_exact(backend, case):
    cu, rows, max_seqlen, sequences = CASES[case]
    q, k, v = leaves(rows)
    grad = torch.randn(rows, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = unchecked(backend, q, k, v, cu, max_seqlen)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for start, end in sequences:
        want = torch.autograd.grad(exact(q, k, v, start, end), (q, k, v), grad[start:end])
        for got_t, want_t in zip(grads, want):
            torch.testing.assert_close(got_t[start:end], want_t[start:end], rtol=1e-5, atol=1e-5)
    if backend == "triton":  # its gradients of the other rows are NaN too, not stale memory
        placed = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
        for start, end in sequences:
            placed[start:end] = True
        assert all(torch.isnan(g[~placed]).all() for g in grads)


@pytest.mark.parametrize("backend", HOST_FREE)
def test_a_layout_running_past_the_rows_is_nan_not_out_of_bounds(backend):
    q, k, v = leaves(10)
    out = unchecked(backend, q, k, v, [0, 3, 12], 9)
    check_rows(out, [((0, 3), exact(q, k, v, 0, 3))], 10)


def test_the_reference_refuses_a_layout_running_past_the_rows():
    q, k, v = leaves(10)
    with pytest.raises(RuntimeError, match="split"):
        unchecked("reference", q, k, v, [0, 3, 12], 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_over_max_seqlen_k_make_their_queries_nan(backend):
    q, (k, v) = leaves(2)[0], leaves(23, seed=1)[:2]
    out = unchecked(backend, q, k, v, [0, 1, 2], 1, cu_seqlens_k=int32([0, 3, 23]), max_seqlen_k=3)
    key_layout = dict(cu_seqlens_k=int32([0, 3]), max_seqlen_k=3)
    want = packed_attention(q[:1], k[:3], v[:3], int32([0, 1]), 1, **key_layout, backend="reference")
    torch.testing.assert_close(out[:1], want)
    assert torch.isnan(out[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_one_query_row_gives_nan_in_that_row_only(backend):
    """The reference used to return zeros there: CPU's flash SDPA treats a row of NaN scores as fully masked."""
    q, k, v = (t.detach() for t in leaves(10))
    q[2, 1, 5] = float("nan")
    out = packed_attention(q, k, v, int32([0, 4, 10]), 6, backend=backend)
    nan = torch.isnan(out)
    assert nan[2, 1].all() and nan.sum() == out.shape[-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_every_key_gives_nan_in_every_query_of_the_sequence(backend):
    q, k, v = (t.detach() for t in leaves(10))
    k[:4, 0, 3] = float("nan")
    out = packed_attention(q, k, v, int32([0, 4, 10]), 6, backend=backend)
    assert torch.isnan(out[:4, 0]).all() and torch.isfinite(out[:4, 1]).all() and torch.isfinite(out[4:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_query_without_keys_still_gets_zeros(backend):
    q, (k, v) = leaves(3)[0].detach(), leaves(3, seed=1)[:2]
    q[1] = float("nan")
    out = packed_attention(q, k, v, int32([0, 1, 3]), 2, cu_seqlens_k=int32([0, 3, 3]), max_seqlen_k=3, backend=backend)
    assert torch.isfinite(out[0]).all() and torch.all(out[1:] == 0)


def test_the_reference_keeps_its_fast_sdpa_for_finite_half_precision_input():
    # the non-finite check sums in fp32: 4096 values of 60000 overflow an fp16 sum, not this one
    q = torch.full((4096, 1, 8), 6e4, dtype=torch.float16, device=DEVICE)
    assert isinstance(reference._softmax_backend(q, q), contextlib.nullcontext)
    q[7, 0, 0] = float("inf")
    assert not isinstance(reference._softmax_backend(q, q), contextlib.nullcontext)


@pytest.mark.parametrize("backend", HOST_FREE)
def test_decreasing_offsets_give_nan_gradients_or_none_through_nan_rows(backend):
    """The Triton backward writes NaN for every row (as for the forward's); padded_sdpa's rows are a
    where over NaN, so no gradient reaches q, k or v through them."""
    q, k, v = leaves(24)
    grads = torch.autograd.grad(unchecked(backend, q, k, v, [0, 20, 2, 3, 4, 24], 20), (q, k, v), torch.ones(24, 2, 16))
    if backend == "triton":
        assert all(torch.isnan(g).all() for g in grads)
    else:
        assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decreasing_key_offsets_make_every_query_nan(backend):
    q, (k, v) = leaves(3)[0], leaves(10, seed=1)[:2]
    out = unchecked(backend, q, k, v, [0, 1, 2, 3], 6, cu_seqlens_k=int32([0, 6, 4, 10]), max_seqlen_k=6)
    assert torch.isnan(out).all()
