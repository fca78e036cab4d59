"""packed_attention refuses a scale, a head count or a head dim it cannot give a meaningful result for."""

import math

import pytest
import torch

from msvit_kernels import packed_attention

CU = torch.tensor([0, 4, 10], dtype=torch.int32)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.5, 0])
def test_non_finite_or_non_positive_scale_is_refused(scale):
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        packed_attention(q, q, q, CU, 6, scale=scale)


@pytest.mark.parametrize("scale", ["0.3", True, torch.tensor(0.3)])
def test_a_scale_that_is_not_a_number_is_refused(scale):
    q = torch.randn(10, 2, 8)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        packed_attention(q, q, q, CU, 6, scale=scale)


@pytest.mark.parametrize("shape", [(10, 0, 8), (10, 2, 0)])
def test_zero_heads_or_head_dim_zero_is_refused(shape):
    q = torch.randn(*shape)
    with pytest.raises(ValueError, match="at least one head and a head dim >= 1"):
        packed_attention(q, q, q, CU, 6)


def test_valid_scales_still_run():
    q = torch.randn(10, 2, 8)
    for scale in (None, 0.1, 2, 1e-6):
        assert torch.isfinite(packed_attention(q, q, q, CU, 6, scale=scale)).all()
