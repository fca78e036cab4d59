"""Inference writes a block's activation and residual sums in place (msvit/models/timm_blocks.py:
``mlp_branch``, ``add_residual``): the same bits as the out-of-place ops, the caller's tensors
untouched, and the autograd path (training) unchanged."""

import pytest
import torch
from timm.layers import Mlp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import msvit
from msvit.models.timm_blocks import add_residual, mlp_branch

from helpers import redraw_parameters, tiny_vit


class OpNames(TorchDispatchMode):
    """The aten ops a region calls."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


ACTIVATIONS = [nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU, nn.ReLU]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=["gelu", "gelu_tanh", "silu", "relu"])
def test_mlp_branch_equals_the_module_bit_for_bit_and_runs_in_place(act):
    torch.manual_seed(0)
    mlp = Mlp(24, 40, act_layer=act).eval()
    x = torch.randn(7, 24)
    with torch.inference_mode():
        expected = mlp(x)
        with OpNames() as ops:
            got = mlp_branch(mlp, x)
    assert torch.equal(got, expected)
    in_place_ops = [name for name in ops.names if name.split(".")[0].endswith("_")]
    assert in_place_ops, f"no in-place activation ran: {ops.names}"


def test_mlp_branch_keeps_the_graph_when_recording():
    torch.manual_seed(0)
    mlp = Mlp(24, 40).train()
    x = torch.randn(7, 24, requires_grad=True)
    mlp_branch(mlp, x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    mlp(x).square().sum().backward()
    assert torch.equal(grad, x.grad)


def test_mlp_branch_leaves_other_mlps_to_their_module():
    class Doubled(Mlp):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    mlp = Doubled(24, 40).eval()
    x = torch.randn(7, 24)
    with torch.inference_mode():
        assert torch.equal(mlp_branch(mlp, x), mlp(x))


def test_add_residual_writes_into_the_branch_not_the_input():
    x, branch = torch.randn(5, 8), torch.randn(5, 8)
    x_before, expected = x.clone(), x + branch
    with torch.inference_mode():
        got = add_residual(x, branch)
    assert torch.equal(got, expected) and torch.equal(x, x_before)
    assert got.data_ptr() == branch.data_ptr()


@pytest.mark.parametrize("case", ["autocast_dtype", "broadcast", "same_tensor", "recording", "not_contiguous"])
def test_add_residual_falls_back_where_in_place_would_differ(case):
    x, branch = torch.randn(6, 8), torch.randn(6, 8)
    if case == "autocast_dtype":  # a bf16 branch on an fp32 stream: the sum is fp32
        branch = branch.bfloat16()
    elif case == "broadcast":
        branch = branch[:1]
    elif case == "same_tensor":
        branch = x
    elif case == "recording":
        x.requires_grad_(True)
    elif case == "not_contiguous":
        branch = torch.randn(8, 6).t()
    expected = x + branch
    branch_before = branch.detach().clone()
    got = add_residual(x, branch)
    assert got.dtype == expected.dtype and torch.equal(got.detach(), expected.detach())
    assert torch.equal(branch.detach(), branch_before)
    if case == "recording":
        got.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("mode", ["packed", "masked"])
def test_model_logits_bit_equal_with_and_without_in_place(mode):
    """The same forward with autograd recording (no in-place op) and in inference mode."""
    model = msvit.from_timm(redraw_parameters(tiny_vit(img_size=64))).eval()
    torch.manual_seed(3)
    images = torch.randn(3, 3, 64, 64)
    mask = torch.rand(3, 16) > 0.5
    recorded = model(images, mask=mask, mode=mode)
    assert recorded.requires_grad
    snapshot = images.clone()
    with torch.inference_mode():
        inferred = model(images, mask=mask, mode=mode)
    assert torch.equal(inferred, recorded.detach())
    assert torch.equal(images, snapshot)
