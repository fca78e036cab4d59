"""The parts of a timm pre-norm block that differ between its block classes.

``msvit.models.layers.run_block`` runs timm's ``Block`` (ViT, DeiT, ...) and ``EvaBlock`` (EVA02, DINOv3,
PE, RoPE-ViT) with one code path; these two functions read the weights where each class keeps them.
``msvit.models.timm_support`` refuses every block, attention or MLP these functions do not cover.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def qkv_heads(attn: nn.Module, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[..., H, D]`` of normed tokens ``h [..., C]``.

    timm's ``Attention`` and fused ``AttentionRope`` keep one ``qkv`` Linear; ``EvaAttention`` keeps
    a bias-free ``qkv`` with separate ``q_bias`` / ``v_bias`` (k has none, its ``k_bias`` buffer is
    zero); unfused ``EvaAttention`` / ``AttentionRope`` keep ``q_proj``, ``k_proj``, ``v_proj``.
    """
    heads = attn.num_heads
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(h, attn.qkv.weight, bias)
        return qkv.unflatten(-1, (3, heads, qkv.shape[-1] // (3 * heads))).unbind(-3)
    return tuple(proj(h).unflatten(-1, (heads, -1)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def layer_scale(block: nn.Module, branch: int, y: Tensor) -> Tensor:
    """LayerScale of residual branch 1 (attention) or 2 (MLP): timm's ``ls1`` / ``ls2`` modules,
    or ``EvaBlock``'s ``gamma_1`` / ``gamma_2`` parameters (None when the block has none)."""
    module = getattr(block, f"ls{branch}", None)
    if module is not None:
        return module(y)
    gamma = getattr(block, f"gamma_{branch}", None)  # DeepSeek's block has neither
    return y if gamma is None else gamma * y


# Activations that can overwrite fc1's output when no autograd graph is recorded.
_IN_PLACE_ACTIVATIONS = {
    nn.GELU: lambda act, h: torch.ops.aten.gelu_(h, approximate=act.approximate),
    nn.SiLU: lambda act, h: F.silu(h, inplace=True),
    nn.ReLU: lambda act, h: F.relu(h, inplace=True),
}


def mlp_branch(mlp: nn.Module, x: Tensor) -> Tensor:
    """``mlp(x)``; for timm's plain ``Mlp`` with no autograd graph recorded (inference), the
    activation overwrites fc1's output instead of allocating a second ``[T, hidden]`` buffer.

    Same values, bit for bit. Why: on CPU a fresh 20 MB buffer per block is fresh pages from the
    allocator; at batch 32 (MSViT-S, ~101 tokens) the out-of-place GELU page-faulted 10-20k times
    per forward and the block stack took 1.06-1.13x timm's ViT-S at equal tokens where the in-place
    one took 0.99-1.08x (Intel Xeon, 1 thread, 7 interleaved repetitions; docs/design.md section 13).
    """
    act = getattr(mlp, "act", None)
    in_place = _IN_PLACE_ACTIVATIONS.get(type(act)) if _is_timm_mlp(mlp) else None
    if in_place is None:
        return mlp(x)
    h = mlp.fc1(x)
    h = mlp.act(h) if h.requires_grad else in_place(act, h)
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))


def _is_timm_mlp(module: nn.Module) -> bool:
    """timm's plain ``Mlp`` itself (a subclass may change its forward); by name, so that importing
    msvit does not import timm (which loads torch._inductor)."""
    cls = type(module)
    return cls.__name__ == "Mlp" and cls.__module__ == "timm.layers.mlp"


def add_residual(x: Tensor, branch: Tensor) -> Tensor:
    """``x + branch``; with no autograd graph recorded, written into ``branch`` (a block branch's
    fresh output, read by nobody else) rather than a new buffer: the same bits (addition commutes),
    one ``[T, C]`` allocation less per branch (``mlp_branch`` says why that matters on CPU)."""
    in_place = (
        not (x.requires_grad or branch.requires_grad)
        and branch.shape == x.shape
        and branch.dtype == x.dtype
        and branch.is_contiguous()
        and branch is not x
    )
    return branch.add_(x) if in_place else x + branch
