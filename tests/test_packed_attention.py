"""packed_attention with the reference backend against a float64 oracle, and its input checks."""

import pytest
import torch

from msvit_kernels import available_backends, cu_seqlens_from_lengths, packed_attention

LENGTHS = [7, 0, 1, 63, 129, 1]


def oracle(q, k, v, cu_seqlens, scale=None):
    """Plain float64 softmax attention, one sequence at a time."""
    out = torch.zeros_like(q, dtype=torch.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[a:b].double().transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax(qi @ ki.transpose(-1, -2) * scale, -1)
        out[a:b] = (probs @ vi).transpose(0, 1)
    return out


def make_qkv(lengths, heads=2, dim=16, dtype=torch.float32, strided=False, seed=0):
    torch.manual_seed(seed)
    total = sum(lengths)
    if strided:  # views of one packed [T, 3, H, D] tensor, as a fused qkv projection makes them
        qkv = torch.randn(total, 3, heads, dim, dtype=dtype, requires_grad=True)
        q, k, v = qkv.unbind(1)
        leaves = [qkv]
    else:
        q, k, v = (torch.randn(total, heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))
        leaves = [q, k, v]
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    return q, k, v, cu, max(lengths), leaves


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_forward_backward_matches_oracle(dtype, tol, strided, scale):
    q, k, v, cu, max_len, leaves = make_qkv(LENGTHS, dtype=dtype, strided=strided)
    out = packed_attention(q, k, v, cu, max_len, scale=scale, backend="reference")
    expected = oracle(q, k, v, cu, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert ((out.double() - expected).abs().max() / expected.abs().max()) <= tol
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    want = torch.autograd.grad(expected, leaves, grad_out)
    for g, w in zip(got, want):
        assert ((g.double() - w.double()).abs().max() / w.double().abs().max()) <= tol * 10


def test_reference_float16_within_flash_attn_rule():
    q, k, v, cu, max_len, _ = make_qkv([5, 0, 33], dtype=torch.float16)
    out = packed_attention(q, k, v, cu, max_len, backend="reference")
    expected = oracle(q, k, v, cu)
    assert out.dtype == torch.float16
    assert (out.double() - expected).abs().max() < 2e-3


def test_empty_batch_and_all_empty_sequences():
    q = torch.randn(0, 2, 8)
    assert packed_attention(q, q, q, torch.zeros(4, dtype=torch.int32), 0).shape == (0, 2, 8)
    assert packed_attention(q, q, q, torch.zeros(1, dtype=torch.int32), 0).shape == (0, 2, 8)


def test_auto_runs_grouped_sdpa_on_cpu_and_the_reference_is_listed():
    assert {"reference", "grouped_sdpa"} <= set(available_backends("cpu"))
    q, k, v, cu, max_len, _ = make_qkv([3, 4])
    torch.testing.assert_close(
        packed_attention(q, k, v, cu, max_len), packed_attention(q, k, v, cu, max_len, backend="reference")
    )


GOOD = dict(q=torch.randn(10, 2, 8), cu=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=6)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(cu=torch.tensor([0, 4, 10], dtype=torch.int64)), TypeError, "int32"),
        (dict(cu=[0, 4, 10]), TypeError, "int32"),
        (dict(cu=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, "1-D"),
        (dict(cu=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "end at T=10"),
        (dict(cu=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "start at 0"),
        (dict(cu=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(max_seqlen=5), ValueError, "max_seqlen=5 is smaller"),
        (dict(max_seqlen=6.0), TypeError, "max_seqlen"),
        (dict(q=torch.randn(10, 16)), ValueError, r"\[T, H, D\]"),
        (dict(q=torch.randint(0, 3, (10, 2, 8))), TypeError, "float16"),
    ],
)
def test_bad_calls_raise_clear_errors(change, error, match):
    args = {**GOOD, **change}
    q = args["q"]
    with pytest.raises(error, match=match):
        packed_attention(q, q, q, args["cu"], args["max_seqlen"])


def test_qkv_mismatches_raise():
    q, cu = GOOD["q"], GOOD["cu"]
    with pytest.raises(TypeError, match="share one dtype"):
        packed_attention(q, q.double(), q, cu, 6)
    with pytest.raises(ValueError, match="has shape"):
        packed_attention(q, q[:, :1], q, cu, 6)
    with pytest.raises(ValueError, match="has shape"):
        packed_attention(q, q, q[:9], cu, 6)


def test_unknown_or_unavailable_backend_raises():
    q, cu = GOOD["q"], GOOD["cu"]
    with pytest.raises(ValueError, match="unknown packed-attention backend 'bogus'"):
        packed_attention(q, q, q, cu, 6, backend="bogus")


@pytest.mark.gpu
def test_cu_seqlens_on_another_device_raises():
    q = GOOD["q"].cuda()
    with pytest.raises(ValueError, match="q's device"):
        packed_attention(q, q, q, GOOD["cu"], 6)
