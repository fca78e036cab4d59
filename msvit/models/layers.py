"""Pre-norm ViT blocks run on packed ``[T, C]`` tokens or on dense masked ``[B, N, C]`` tokens.

The blocks are timm's own ``Block`` / ``EvaBlock`` modules (their weights are the model's weights);
only the way attention sees its neighbours changes. One function runs a block; the two layouts differ
in the ``attend`` function (varlen attention vs masked softmax, Eq. 10) and in how stochastic depth
picks its samples (per image in both cases). RoPE models pass ``rotary(block_index, t)``, which
rotates q and k by each token's position (``msvit.models.rope``).
"""

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvit.models.timm_blocks import add_residual, layer_scale, mlp_branch, qkv_heads
from msvit_kernels.attention import resolve_host_free_backend, resolved_attention
from msvit_kernels.varlen import MixedScaleIndex

Attend = Callable[[Tensor, Tensor, Tensor, Optional[float]], Tensor]
Rotary = Callable[[int, Tensor], Tensor]


def run_block(
    block: nn.Module,
    x: Tensor,
    attend: Attend,
    drop_path: Callable[[nn.Module, Tensor], Tensor],
    rotate: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """One timm ``Block`` or ``EvaBlock`` on tokens ``x [..., C]``; ``attend(q, k, v, scale)`` maps
    ``[..., H, D]``; ``rotate`` (RoPE models) is applied to q and k after their norms, as timm does.
    A block of another layout (Gemma 4's sandwich norms) brings its own ``run_mixed_scale``."""
    own = getattr(block, "run_mixed_scale", None)
    if own is not None:
        return own(x, attend, drop_path, rotate)
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv_heads(attn, h)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    o = attend(q, k, v, attn.scale).flatten(-2)
    if hasattr(attn, "norm"):  # timm >= 1.0: optional norm before the projection
        o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x = add_residual(x, drop_path(block.drop_path1, layer_scale(block, 1, o)))
    return add_residual(x, drop_path(block.drop_path2, layer_scale(block, 2, mlp_branch(block.mlp, block.norm2(x)))))


def _drop_path_rate(module: nn.Module) -> float:
    return float(getattr(module, "drop_prob", 0.0)) if module.training else 0.0


def drop_images(module: nn.Module, y: Tensor, row_image: Tensor, batch: int) -> Tensor:
    """Stochastic depth of ``module`` (a timm DropPath or Identity) on packed rows ``y [T, C]``:
    whole images are dropped, as timm's DropPath does on ``[B, N, C]``; row_image: int64 ``[T]``
    (``batch`` for the padding rows of a static shape, which are kept)."""
    rate = _drop_path_rate(module)
    if rate == 0.0:
        return y
    keep = torch.rand(batch, device=y.device) >= rate
    scale = torch.cat([keep.to(y.dtype) / (1 - rate), y.new_ones(1)])
    return y * scale[row_image, None]


def packed_blocks(
    blocks,
    x: Tensor,
    index: MixedScaleIndex,
    backend: str = "auto",
    rotary: Optional[Rotary] = None,
) -> Tensor:
    """Run blocks on packed tokens ``[T, C]``; attention is varlen attention per image.

    A static layout (``index.static``: CUDA graphs, ``torch.compile``) resolves ``backend`` once to
    a backend that reads nothing back to the host (``padded_sdpa`` where no varlen kernel runs,
    e.g. on CPU, whose reference backend reads the lengths).
    """
    chosen = []

    def attend(q, k, v, scale):
        if not chosen:  # resolved once per forward: the layout is valid by construction, no checks per block
            static = getattr(index, "static", False)
            chosen.append(resolved_attention(backend, q.device, q.dtype, q.shape[-1], host_free=static))
        return chosen[0](q, k, v, index.cu_seqlens, index.max_seqlen, scale)

    def drop_path(module, y):
        return drop_images(module, y, index.row_image, index.batch)

    return _run_blocks(blocks, x, attend, drop_path, rotary)


def attention_backend_for(backend: str, q: Tensor, static: bool) -> str:
    """``backend``, or for a static layout the host-free backend it resolves to for q's device,
    dtype and head dim (``msvit_kernels.attention.resolve_host_free_backend``)."""
    return resolve_host_free_backend(backend, q.device, q.dtype, q.shape[-1]).name if static else backend


def _run_blocks(blocks, x: Tensor, attend: Attend, drop_path, rotary: Optional[Rotary]) -> Tensor:
    for i, block in enumerate(blocks):
        rotate = None if rotary is None else partial(rotary, i)
        x = run_block(block, x, attend, drop_path, rotate)
    return x


def masked_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], weights: Tensor) -> Tensor:
    """Eq. 10: ``softmax`` over keys weighted by the mask, ``w_j e^{s_ij} / sum_p w_p e^{s_ip}``.

    q, k, v: ``[B, N, H, D]``; weights: ``[B, N]`` in {0, 1} in the forward pass. When the weights
    carry straight-through gradients the product form is computed explicitly so that every token,
    masked or not, contributes to the gate's gradient (Appendix F.1); otherwise SDPA with a boolean
    key mask gives the same values faster.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    active = weights > 0.5
    if not weights.requires_grad:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=active[:, None, None, :], scale=scale)
        return out.transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    shift = scores.masked_fill(~active[:, None, None, :], float("-inf")).amax(-1, keepdim=True).detach()
    # Masked keys may score above every active one; clamping keeps their (zero-weighted) exponent finite.
    e = torch.exp((scores - shift).clamp(max=60.0)) * weights[:, None, None, :]
    probs = e / e.sum(-1, keepdim=True)
    return (probs @ v).transpose(1, 2)


def dense_blocks(blocks, x: Tensor, weights: Tensor, rotary: Optional[Rotary] = None) -> Tensor:
    """Run blocks on dense tokens ``[B, N, C]`` with masked attention (the paper's baseline)."""

    def attend(q, k, v, scale):
        return masked_attention(q, k, v, scale, weights)

    def drop_path(module, y):
        return module(y)  # timm's DropPath already drops per sample of [B, N, C]

    return _run_blocks(blocks, x, attend, drop_path, rotary)
