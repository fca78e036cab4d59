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
