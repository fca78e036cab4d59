"""packed_attention with keys in a layout of their own (cu_seqlens_k / max_seqlen_k, flash-attn's
varlen cross-attention): reference and Triton (interpreter on CPU) against a float64 oracle,
forward and backward, empty query and key sequences; bad layouts rejected clearly."""

import pytest
import torch

from msvit_kernels import attention, cu_seqlens_from_lengths, packed_attention

from helpers import DEVICE, attention_oracle, needs_triton

# query / key lengths per sequence: queries without keys (3, 0), keys without queries (0, 5),
# both empty, one query over many keys (the pooling shape), more queries than keys.
LENGTHS_Q = [1, 0, 3, 1, 0, 17, 2]
LENGTHS_K = [7, 5, 0, 33, 0, 2, 16]
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def make_inputs(lengths_q, lengths_k, heads=2, dim=16, dtype=torch.float32, seed=0):
    """q ``[T, H, D]`` and k, v views of one ``[T_k, 2, H, D]`` leaf (a fused kv projection's
    layout), both cu_seqlens, both max lengths, the leaves and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    kv = torch.randn(sum(lengths_k), 2, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    k, v = kv.unbind(1)
    cu_q = cu_seqlens_from_lengths(torch.tensor(lengths_q, device=DEVICE))
    cu_k = cu_seqlens_from_lengths(torch.tensor(lengths_k, device=DEVICE))
    grad_out = torch.randn(sum(lengths_q), heads, dim, generator=gen).to(DEVICE, dtype)
    return q, k, v, cu_q, cu_k, max(lengths_q, default=0), max(lengths_k, default=0), [q, kv], grad_out


def check(backend, lengths_q, lengths_k, dim=16, scale=None):
    q, k, v, cu_q, cu_k, max_q, max_k, leaves, grad_out = make_inputs(lengths_q, lengths_k, dim=dim)
    out = packed_attention(q, k, v, cu_q, max_q, cu_seqlens_k=cu_k, max_seqlen_k=max_k, scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    dq, dkv = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    dq = torch.zeros_like(q) if dq is None else dq  # no query meets a key: nothing depends on q
    want = attention_oracle(q, k, v, cu_q, grad_out, scale, cu_seqlens_k=cu_k)
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, dq, *dkv.unbind(1)), want):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return out, dq, dkv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [16, 24])
def test_separate_layouts_match_the_oracle(backend, dim):
    out, dq, dkv = check(backend, LENGTHS_Q, LENGTHS_K, dim=dim, scale=0.3 if dim == 24 else None)
    # queries of sequence 2 have no keys: zeros out, zero gradient (flash-attn's convention);
    # keys of sequence 1 have no queries: zero gradient
    rows_q, rows_k = slice(1, 4), slice(7, 12)
    assert torch.all(out[rows_q] == 0) and torch.all(dq[rows_q] == 0)
    assert torch.all(dkv[rows_k] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_query_per_image_over_ragged_keys(backend):
    # the attention-pool shape: one latent query per image; a 20-key image spans two key tiles
    check(backend, [1, 1, 1], [20, 1, 9])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_at_all_gives_zeros(backend):
    q, k, v, cu_q, cu_k, max_q, max_k, leaves, grad_out = make_inputs([2, 3], [0, 0])
    out = packed_attention(q, k, v, cu_q, max_q, cu_seqlens_k=cu_k, max_seqlen_k=max_k, backend=backend)
    assert out.shape == (5, 2, 16) and torch.all(out == 0)
    out.backward(grad_out)
    assert q.grad is None or torch.all(q.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries_at_all_gives_zero_key_gradients(backend):
    q, k, v, cu_q, cu_k, max_q, max_k, leaves, grad_out = make_inputs([0, 0], [4, 3])
    out = packed_attention(q, k, v, cu_q, max_q, cu_seqlens_k=cu_k, max_seqlen_k=max_k, backend=backend)
    assert out.shape == (0, 2, 16)
    (out.sum() + 0 * leaves[1].sum()).backward()
    assert torch.all(leaves[1].grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_layout_equal_to_the_query_layout_is_self_attention(backend):
    q, k, v, cu, _, max_len, _, _, _ = make_inputs([5, 0, 18], [5, 0, 18])
    own = packed_attention(q, k, v, cu, max_len, cu_seqlens_k=cu, max_seqlen_k=max_len, backend=backend)
    torch.testing.assert_close(own, packed_attention(q, k, v, cu, max_len, backend=backend), rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_op_with_a_key_layout_passes_opcheck():
    q, k, v, cu_q, cu_k, max_q, max_k, _, _ = make_inputs([1, 3, 0], [5, 0, 2])
    op = torch.ops.msvit.triton_varlen_attention.default
    torch.library.opcheck(op, (q, k, v, cu_q, max_q, 0.25, cu_k, max_k))


Q = torch.randn(6, 2, 8)
KV = torch.randn(9, 2, 8)
CU_Q = torch.tensor([0, 1, 6], dtype=torch.int32)
CU_K = torch.tensor([0, 4, 9], dtype=torch.int32)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(max_k=None), ValueError, "cu_seqlens_k was given without max_seqlen_k"),
        (dict(cu_k=None), ValueError, "max_seqlen_k was given without cu_seqlens_k"),
        (dict(cu_k=torch.tensor([0, 9], dtype=torch.int32)), ValueError, "same batch count"),
        (dict(cu_k=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, r"cu_seqlens_k must end at T=9 \(k"),
        (dict(cu_k=torch.tensor([0, 4, 9], dtype=torch.int64)), TypeError, "cu_seqlens_k must be int32"),
        (dict(cu_k=torch.tensor([0, 10, 9], dtype=torch.int32)), ValueError, "cu_seqlens_k must be non-decreasing"),
        (dict(max_k=4), ValueError, r"max_seqlen_k=4 is smaller than the longest sequence \(5\)"),
        (dict(max_k=5.0), TypeError, "max_seqlen_k must be a non-negative Python int"),
        (dict(v=KV[:8]), ValueError, "v has shape .* but k has"),
        (dict(k=KV[:, :1], v=KV[:, :1]), ValueError, r"expected equal \[H, D\]"),
        (dict(cu_q=torch.tensor([0, 1, 9], dtype=torch.int32)), ValueError, r"cu_seqlens must end at T=6"),
    ],
)
def test_bad_key_layouts_raise_clear_errors(change, error, match):
    args = dict(q=Q, k=KV, v=KV, cu_q=CU_Q, cu_k=CU_K, max_q=5, max_k=5, **{})
    args.update(change)
    with pytest.raises(error, match=match):
        packed_attention(
            args["q"], args["k"], args["v"], args["cu_q"], args["max_q"], cu_seqlens_k=args["cu_k"],
            max_seqlen_k=args["max_k"],
        )  # fmt: skip


def test_different_row_counts_without_a_key_layout_say_how_to_pass_one():
    with pytest.raises(ValueError, match="pass cu_seqlens_k= and max_seqlen_k="):
        packed_attention(Q, KV, KV, CU_Q, 5)


def test_a_backend_without_separate_key_layouts_is_refused_by_name_and_skipped_by_auto(monkeypatch):
    old_style = attention.Backend("old_style", lambda q, k, v, cu, max_len, scale: q, lambda *a: None)
    monkeypatch.setitem(attention.BACKENDS, "old_style", old_style)
    monkeypatch.setattr(attention, "AUTO_ORDER", ["old_style", *attention.AUTO_ORDER])
    kwargs = dict(cu_seqlens_k=CU_K, max_seqlen_k=5)
    with pytest.raises(RuntimeError, match="backend 'old_style' cannot run here: .*separate key layout"):
        packed_attention(Q, KV, KV, CU_Q, 5, backend="old_style", **kwargs)
    assert attention.resolve_backend("auto", Q.device, Q.dtype, 8, separate_kv=True).name != "old_style"
    # self-attention calls still reach it with the old six-argument signature
    assert packed_attention(Q, Q, Q, CU_Q, 5) is Q


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "torch_varlen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_backends_with_separate_layouts(backend, dtype):
    # ViT-like key lengths, one query per image, plus the empty cases; fp16/bf16 within 2e-2 of float64
    reason = attention.BACKENDS[backend].support(DEVICE, dtype, 64)
    if reason is not None:
        pytest.skip(reason)
    lengths_k = torch.randint(50, 261, (30,), generator=torch.Generator().manual_seed(0)).tolist() + [0, 7]
    lengths_q = [1] * 30 + [1, 0]
    q, k, v, cu_q, cu_k, max_q, max_k, leaves, grad_out = make_inputs(lengths_q, lengths_k, heads=6, dim=64)
    q, kv = (t.detach().to(dtype).requires_grad_() for t in leaves)
    k, v = kv.unbind(1)
    out = packed_attention(q, k, v, cu_q, max_q, cu_seqlens_k=cu_k, max_seqlen_k=max_k, backend=backend)
    dq, dkv = torch.autograd.grad(out, (q, kv), grad_out.to(dtype))
    want = attention_oracle(q, k, v, cu_q, grad_out, cu_seqlens_k=cu_k)
    for name, got, w in zip(("out", "dq", "dk", "dv"), (out, dq, *dkv.unbind(1)), want):
        torch.testing.assert_close(got.double(), w, rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
