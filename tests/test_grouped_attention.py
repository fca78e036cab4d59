"""``grouped_sdpa``, the CPU fast path of packed attention (msvit_kernels/grouped_attention.py):
equal to a float64 oracle forward and backward on odd lengths, runs of equal lengths and empty
sequences (self and separate key layouts); a NaN stays in its own sequence; unchecked layouts get
the reference's NaN rows; ``auto`` takes it on CPU; a dynamic forward keeps its one host read."""

import pytest
import torch
from test_separate_kv_attention import LENGTHS_K, LENGTHS_Q, check

import msvit
from msvit.host_reads import count_host_reads
from msvit_kernels import cu_seqlens_from_lengths, packed_attention
from msvit_kernels.attention import resolve_backend, resolve_host_free_backend, resolved_attention
from msvit_kernels.grouped_attention import grouped_sdpa_block_attention
from msvit_kernels.varlen import host_offsets

from helpers import attention_oracle, redraw_parameters, tiny_vit

# odd lengths, an empty sequence, and runs of equal lengths (one batched call each)
LENGTHS = [1, 7, 7, 7, 0, 63, 129, 129, 2]


def inputs(lengths, dtype=torch.float64, heads=3, dim=24, seed=0):
    """q, k, v views of one fused ``[T, 3, H, D]`` leaf (the model's qkv layout), cu_seqlens, grad."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, dim, generator=gen, dtype=dtype).requires_grad_()
    grad = torch.randn(sum(lengths), heads, dim, generator=gen, dtype=dtype)
    return qkv, cu_seqlens_from_lengths(torch.tensor(lengths)), grad


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("lengths", [LENGTHS, [129], [7, 7, 7], [0, 5, 0], []])
def test_matches_the_float64_oracle_forward_and_backward(dtype, tol, lengths):
    qkv, cu, grad = inputs(lengths, dtype)
    q, k, v = qkv.unbind(1)
    out = packed_attention(q, k, v, cu, max(lengths, default=0), scale=0.2, backend="grouped_sdpa")
    assert out.shape == q.shape and out.dtype == dtype
    (dqkv,) = torch.autograd.grad(out, qkv, grad, allow_unused=True)
    dqkv = torch.zeros_like(qkv) if dqkv is None else dqkv
    want = attention_oracle(q, k, v, cu, grad, 0.2)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *dqkv.unbind(1)), want):
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dim", [16, 24])
def test_separate_key_layouts_with_empty_sequences(dim):
    out, dq, _ = check("grouped_sdpa", LENGTHS_Q, LENGTHS_K, dim=dim)
    assert torch.all(out[1:4] == 0) and torch.all(dq[1:4] == 0)  # queries without keys: zeros
    # equal (query, key) lengths in a row batch into one call
    check("grouped_sdpa", [3, 3, 3, 1], [5, 5, 5, 5])


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("lengths", [[7, 7, 7], [5, 9, 7]])
def test_a_nan_stays_in_its_own_sequence(where, lengths):
    """A NaN in sequence 1 (in a run with others, or alone) changes no other sequence's rows, and
    its own rows are NaN where textbook softmax (the reference) puts NaN: a NaN query row (which
    torch's CPU flash kernel alone would turn into zeros), every row for a NaN key or value."""
    qkv, cu, _ = inputs(lengths, torch.float32)
    qkv = qkv.detach()
    clean = packed_attention(*qkv.unbind(1), cu, max(lengths), backend="grouped_sdpa")
    poisoned = qkv.clone()
    row = lengths[0] + 2
    poisoned[row, "qkv".index(where), 1, 3] = float("nan")
    got = packed_attention(*poisoned.unbind(1), cu, max(lengths), backend="grouped_sdpa")
    expected = packed_attention(*poisoned.unbind(1), cu, max(lengths), backend="reference")
    own = slice(lengths[0], lengths[0] + lengths[1])
    others = torch.ones(sum(lengths), dtype=torch.bool)
    others[own] = False
    assert torch.equal(got[others], clean[others])
    assert torch.equal(got[own].isnan(), expected[own].isnan()) and got[own].isnan().any()
    if where == "q":
        assert got[row, 1].isnan().all() and not got[row, 0].isnan().any() and not got[own][[0, 1, 3]].isnan().any()


def test_infinite_query_rows_are_nan_as_in_the_reference():
    qkv, cu, _ = inputs([4, 6], torch.float32)
    qkv = qkv.detach()
    qkv[5, 0, 0, 0] = float("inf")
    got = packed_attention(*qkv.unbind(1), cu, 6, backend="grouped_sdpa")
    expected = packed_attention(*qkv.unbind(1), cu, 6, backend="reference")
    assert torch.equal(got.isnan(), expected.isnan()) and got[5, 0].isnan().all()
    torch.testing.assert_close(got[~got.isnan()], expected[~expected.isnan()])


def test_an_unchecked_layout_gets_the_reference_nan_rows():
    qkv, _, _ = inputs([4, 6, 3], torch.float32)
    q, k, v = qkv.detach().unbind(1)
    for cu, bound in (([0, 4, 10, 13], 5), ([2, 4, 10], 6)):  # a sequence over its bound; rows outside
        cu = torch.tensor(cu, dtype=torch.int32)
        got = packed_attention(q, k, v, cu, bound, backend="grouped_sdpa", check_values=False)
        expected = packed_attention(q, k, v, cu, bound, backend="reference", check_values=False)
        assert got.isnan().any()
        torch.testing.assert_close(got, expected, equal_nan=True)


def test_the_cached_check_follows_the_bound_and_the_rows_not_only_the_offsets():
    """The layout check is cached with the plan (one check per layout, not per block): the same
    offsets with a smaller bound, or with more rows than they cover, are still unchecked layouts."""
    qkv, cu, _ = inputs([4, 6, 3], torch.float32)
    q, k, v = qkv.detach().unbind(1)
    checked = grouped_sdpa_block_attention(q, k, v, cu, 6)  # plans (and caches) the valid layout
    assert checked.isfinite().all()
    over_bound = grouped_sdpa_block_attention(q, k, v, cu, 5)  # the 6-token sequence is over 5
    torch.testing.assert_close(
        over_bound, packed_attention(q, k, v, cu, 5, backend="reference", check_values=False), equal_nan=True
    )
    assert over_bound[4:10].isnan().all() and torch.equal(over_bound[:4], checked[:4])
    more_rows = torch.cat([q, q[:2]]), torch.cat([k, k[:2]]), torch.cat([v, v[:2]])  # rows after cu[-1]
    assert grouped_sdpa_block_attention(*more_rows, cu, 6)[13:].isnan().all()


def test_auto_takes_it_on_cpu_and_static_forwards_stay_host_free():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert resolve_backend("auto", cpu, dtype, 64).name == "grouped_sdpa"
        assert resolve_backend("auto", cpu, dtype, 64, separate_kv=True).name == "grouped_sdpa"
    assert resolved_attention("auto", cpu, torch.float32, 64) is grouped_sdpa_block_attention
    assert resolve_host_free_backend("auto", cpu, torch.float32, 64).name == "padded_sdpa"
    with pytest.raises(ValueError, match="reads sequence lengths on the host"):
        resolve_host_free_backend("grouped_sdpa", cpu, torch.float32, 64)


def test_offsets_are_read_once_per_layout_and_again_after_an_in_place_write():
    cu = cu_seqlens_from_lengths(torch.tensor([3, 4]))
    with count_host_reads() as reads:
        assert host_offsets(cu) == [0, 3, 7] and host_offsets(cu) == [0, 3, 7]
    assert reads.count == 1, reads.report()
    cu[2] = 8
    assert host_offsets(cu) == [0, 3, 8]
    with torch.inference_mode():
        frozen = cu_seqlens_from_lengths(torch.tensor([2]))
        with count_host_reads() as reads:
            assert host_offsets(frozen) == host_offsets(frozen) == [0, 2]
        assert reads.count == 1, reads.report()


@pytest.mark.parametrize("scales", [2, 3])
def test_a_dynamic_cpu_forward_keeps_its_one_host_read_and_the_reference_logits(scales):
    """The blocks plan the runs from the index builder's read: one read per forward, not per block."""
    size = 64
    vit = redraw_parameters(tiny_vit(size))
    kwargs = dict(gate="entropy", entropy_mean=(0.5,) * 3, kernels="reference")
    if scales == 2:
        kwargs["entropy_thresholds"] = (3.0,)
    else:
        kwargs.update(scales=(8, 16, 32), entropy_thresholds=(3.5, 2.5))
    model = msvit.from_timm(vit, **kwargs).eval()
    images = torch.rand(3, 3, size, size) * 2 - 1
    images[1, :, :32] = 0.2  # flat half: fewer tokens, so images differ in length
    with torch.no_grad():
        with count_host_reads() as reads:
            got = model(images)
        assert reads.count == 1, reads.report()
        model.attention_backend = "reference"
        expected = model(images)
    assert model.tokens_per_image(model.gate_mask(images), images=images).unique().numel() > 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
