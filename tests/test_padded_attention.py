"""``padded_sdpa``, the host-free packed attention (msvit_kernels/padded_attention.py): equal to a
float64 oracle forward and backward on odd lengths (self and separate key layouts, empty
sequences), no host read; and how a static forward chooses its backend
(``resolve_host_free_backend``). Unchecked layouts (NaN where a row cannot be computed):
tests/test_unchecked_attention.py."""

import pytest
import torch
from test_separate_kv_attention import LENGTHS_K, LENGTHS_Q, check

from msvit.host_reads import count_host_reads
from msvit_kernels import cu_seqlens_from_lengths, packed_attention
from msvit_kernels.attention import resolve_host_free_backend

from helpers import attention_oracle

LENGTHS = [1, 7, 0, 63, 129, 2]


def test_self_attention_on_odd_lengths_matches_the_oracle_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(sum(LENGTHS), 3, 24, generator=gen, dtype=torch.float64) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu = cu_seqlens_from_lengths(torch.tensor(LENGTHS))
    out = packed_attention(q, k, v, cu, max(LENGTHS), scale=0.2, backend="padded_sdpa")
    grads = torch.autograd.grad(out, (q, k, v), grad)
    want = attention_oracle(q, k, v, cu, grad, 0.2)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dim", [16, 24])
def test_separate_key_layouts_with_empty_sequences(dim):
    out, dq, dkv = check("padded_sdpa", LENGTHS_Q, LENGTHS_K, dim=dim)
    assert torch.all(out[1:4] == 0) and torch.all(dq[1:4] == 0)  # queries without keys: zeros


def test_a_static_bound_and_padding_sequences_change_nothing_and_read_nothing():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(LENGTHS) + 9, 2, 16, generator=gen)
    cu = cu_seqlens_from_lengths(torch.tensor(LENGTHS + [9, 0]))  # a padding sequence, an empty one
    with count_host_reads() as reads:
        bound = packed_attention(q, q, q, cu, 200, backend="padded_sdpa", check_values=False)
    assert reads.count == 0, reads.report()
    exact = packed_attention(q, q, q, cu, max(LENGTHS), backend="reference")
    torch.testing.assert_close(bound, exact, rtol=1e-5, atol=1e-6)


def test_static_forwards_take_a_host_free_backend():
    cpu = torch.device("cpu")
    assert resolve_host_free_backend("auto", cpu, torch.float32, 64).name == "padded_sdpa"
    assert resolve_host_free_backend("padded_sdpa", cpu, torch.float64, 64).name == "padded_sdpa"
    with pytest.raises(ValueError, match="reads sequence lengths on the host"):
        resolve_host_free_backend("reference", cpu, torch.float32, 64)
    with pytest.raises(RuntimeError, match="cannot run here"):
        resolve_host_free_backend("flash_attn", cpu, torch.float16, 64)
