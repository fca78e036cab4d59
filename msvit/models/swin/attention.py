"""Swin window attention on the tokens that exist, with relative position bias and shift masks.

This is a pure-torch path (not the Triton varlen kernel): the present tokens are scattered into
their non-empty windows, each padded to the full window, and one SDPA call runs over that reduced
batch of windows with an additive mask = timm's relative position bias + the shifted-window mask
(-100 between regions, as timm) + a large negative for the slots without a key. The qkv and output
projections run on the token rows only, so padding costs only the two N x N products.
docs/design.md section 8.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvit.models.swin.windows import WindowLayout


def absent_key_bias(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf: exp() of it is exactly 0 next to any present key, and a window
    whose keys are all absent (dense-masked mode) still gives finite softmax rows, never NaN. Half
    of the dtype's range, so adding the bias and the -100 shift mask cannot overflow to -inf."""
    return -torch.finfo(dtype).max / 2


def window_mask(layout: WindowLayout, shift_mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """The additive mask ``[windows, 1, 1 or N, N]`` every block of one layout shares: timm's
    shifted-window mask of each window (shift_mask ``[windows per image, N, N]``, or None for
    unshifted blocks) and ``absent_key_bias`` on the slots without a key. Built once per layout."""
    n = layout.key_present.shape[1]
    if shift_mask is None:
        mask = torch.zeros(layout.windows, 1, 1, n, dtype=dtype, device=layout.key_present.device)
    else:
        mask = shift_mask.to(dtype)[layout.window_in_image, None]
    return mask.masked_fill(~layout.key_present[:, None, None, :], absent_key_bias(dtype))


def window_attention(attn: nn.Module, h: Tensor, layout: WindowLayout, mask: Tensor) -> Tensor:
    """timm ``WindowAttention`` ``attn`` on normed token rows ``h [T, C]`` laid out by ``layout``.

    mask: the layout's ``window_mask``; the block's relative position bias is added to it.
    Returns ``[T, C]`` (after the output projection), row for row.
    """
    n = layout.key_present.shape[1]
    heads = attn.num_heads
    qkv = attn.qkv(h)
    buffer = qkv.new_zeros(layout.windows * n, qkv.shape[-1]).index_copy(0, layout.dest, qkv)
    head_dim = qkv.shape[-1] // (3 * heads)
    q, k, v = buffer.view(layout.windows, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attn._get_rel_pos_bias().to(h.dtype) + mask  # [windows, heads, N, N]
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=attn.scale)
    out = out.transpose(1, 2).reshape(layout.windows * n, heads * head_dim)[layout.dest]
    return attn.proj_drop(attn.proj(out))
