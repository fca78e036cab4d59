"""The Triton unpack-to-grid kernel against ``unpack_to_grid_reference``, forward and backward.

On a CPU-only machine the kernel runs in the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``); on a GPU the same tests run it compiled on CUDA. The op is a copy, so the
forward must match exactly; the backward sums at most r*r values per row (float64 oracle, 1e-6).
"""

import pytest
import torch

from msvit_kernels import _triton, mixed_scale_index
from msvit_kernels import unpack_kernel as unpack_mod
from msvit_kernels.reference import unpack_to_grid_reference
from msvit_kernels.unpack_kernel import triton_unpack_to_grid, unpack_to_grid

from helpers import DEVICE, needs_triton


def packed_batch(batch, masks, channels, prefix=1, dtype=torch.float32, seed=0):
    """Random packed tokens ``[T, C]`` for 96x160 images (patch 8, coarse 16: fine grid 12x20)."""
    coarse_grid, ratio = (6, 10), 2
    gen = torch.Generator().manual_seed(seed)
    if masks == "fine":
        mask = torch.ones(batch, 60, dtype=torch.bool)
    elif masks == "coarse":
        mask = torch.zeros(batch, 60, dtype=torch.bool)
    else:
        mask = torch.rand(batch, 60, generator=gen) < 0.4
    index = mixed_scale_index(mask.to(DEVICE), coarse_grid, ratio, prefix)
    tokens = torch.randn(index.total, channels, generator=gen).to(DEVICE, dtype)
    return tokens, index, (12, 20)


@needs_triton
@pytest.mark.parametrize("batch, channels", [(1, 48), (3, 20), (3, 48)])
@pytest.mark.parametrize("masks", ["fine", "coarse", "random"])
def test_forward_and_backward_match_the_reference(batch, channels, masks):
    tokens, index, grid = packed_batch(batch, masks, channels)
    tokens.requires_grad_()
    out = triton_unpack_to_grid(tokens, index.fine_to_row, grid)
    ref_tokens = tokens.detach().double().requires_grad_()
    ref = unpack_to_grid_reference(ref_tokens, index.fine_to_row, grid)
    assert out.shape == (batch, 12, 20, channels) and out.dtype == tokens.dtype and out.is_contiguous()
    assert torch.equal(out.double(), ref.detach())
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert torch.allclose(tokens.grad.double(), ref_tokens.grad, rtol=1e-6, atol=1e-6)
    prefix_rows = index.prefix_rows.flatten()
    assert torch.all(tokens.grad[prefix_rows] == 0)  # prefix tokens cover no cell


@needs_triton
def test_strided_tokens_and_float16():
    tokens, index, grid = packed_batch(3, "random", 40, dtype=torch.float16)
    wide = torch.cat([tokens, tokens], 1)[:, ::2]  # stride 2 along C: a view, not a copy
    assert not wide.is_contiguous()
    out = triton_unpack_to_grid(wide, index.fine_to_row, grid)
    assert torch.equal(out, unpack_to_grid_reference(wide, index.fine_to_row, grid))


def test_auto_picks_the_reference_off_cuda_and_validates_inputs():
    tokens, index, grid = packed_batch(2, "random", 8, dtype=torch.float64)
    out = unpack_to_grid(tokens, index.fine_to_row, grid)  # float64: the reference on any device
    assert torch.equal(out, unpack_to_grid_reference(tokens, index.fine_to_row, grid))
    with pytest.raises(ValueError, match="unknown unpack backend"):
        unpack_to_grid(tokens, index.fine_to_row, grid, backend="cuda")
    with pytest.raises(ValueError, match="does not match"):
        unpack_to_grid(tokens, index.fine_to_row, (12, 19))
    with pytest.raises(TypeError, match="int64"):
        unpack_to_grid(tokens, index.fine_to_row.int(), grid)
    with pytest.raises(TypeError, match=r"\[T, C\]"):
        unpack_to_grid(tokens[None], index.fine_to_row, grid)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        triton_unpack_to_grid(tokens, index.fine_to_row, grid)


def test_missing_triton_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(_triton, "triton", None)  # the one guarded import every kernel consults
    tokens, index, grid = packed_batch(1, "random", 8)
    assert torch.equal(
        unpack_to_grid(tokens, index.fine_to_row, grid), unpack_to_grid_reference(tokens, index.fine_to_row, grid)
    )
    with pytest.raises(RuntimeError, match="triton is not installed"):
        triton_unpack_to_grid(tokens, index.fine_to_row, grid)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_auto_uses_the_kernel_and_matches(dtype, monkeypatch):
    tokens, index, grid = packed_batch(3, "random", 384, prefix=2, dtype=dtype)
    tokens.requires_grad_()
    launches = []
    launch = unpack_mod._launch
    monkeypatch.setattr(unpack_mod, "_launch", lambda *args: launches.append(1) or launch(*args))
    out = unpack_to_grid(tokens, index.fine_to_row, grid)
    assert launches == [1], "backend='auto' on CUDA must run the Triton kernel"
    assert torch.equal(out, unpack_to_grid_reference(tokens, index.fine_to_row, grid))
    out.float().sum().backward()
    counts = torch.bincount(index.fine_to_row.flatten(), minlength=index.total).to(dtype)
    assert torch.equal(tokens.grad, counts[:, None].expand_as(tokens.grad))


@needs_triton
def test_model_unpack_goes_through_the_kernel_dispatch(monkeypatch):
    import msvit

    from helpers import tiny_vit

    model = msvit.from_timm(tiny_vit()).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 64, 64), mask=torch.rand(2, 16) < 0.5)
    launches = []
    launch = unpack_mod._launch
    monkeypatch.setattr(unpack_mod, "_launch", lambda *args: launches.append(1) or launch(*args))
    grid, prefix = msvit.unpack_to_grid(features, backend="triton")
    assert launches == [1]
    ref, ref_prefix = msvit.unpack_to_grid(features, backend="reference")
    assert torch.equal(grid, ref) and torch.equal(prefix, ref_prefix)


def test_unpack_op_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        tokens, rows = torch.empty(10, 6), torch.zeros(24, dtype=torch.int64)
        out = torch.ops.msvit.unpack_to_grid(tokens, rows)
    assert out.shape == (24, 6) and out.dtype == tokens.dtype
