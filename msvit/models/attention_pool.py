"""SigLIP's ``map`` pooling (timm's ``AttentionPoolLatent``) on packed tokens.

A learned latent query (``latent_len`` rows, usually one) per image attends over that image's
tokens. On the packed layout that is varlen attention with separate query and key layouts: the
queries are ``B * latent_len`` rows (``cu_seqlens_q = b * latent_len``), the keys are the
image's packed rows (``cu_seqlens_k`` of the patch rows, or of all rows with the prefix), so no
image is padded to the batch's longest. The modules are timm's own (copied), so the weights and the
arithmetic order are those of ``AttentionPoolLatent.forward``.
"""

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from msvit.models.layers import attention_backend_for, masked_attention
from msvit_kernels import packed_attention


class PackedAttentionPool(nn.Module):
    """``AttentionPoolLatent`` over packed ``[T, C]`` tokens (and dense masked ``[B, N, C]`` ones).

    Args:
        pool: the timm ``AttentionPoolLatent`` to convert (its modules are deep-copied). Its
            absolute ``pos_embed`` (``pos_embed='abs'``, one row per token of a fixed-length
            sequence) has no meaning on a mixed-scale token set and is refused.
    """

    def __init__(self, pool: nn.Module):
        super().__init__()
        if getattr(pool, "pos_embed", None) is not None:
            raise NotImplementedError(
                "AttentionPoolLatent with pos_embed='abs' is not supported: its per-position rows assume a "
                "fixed token sequence, which mixed-scale tokens do not have"
            )
        self.num_heads = pool.num_heads
        self.head_dim = pool.head_dim
        self.scale = pool.scale
        self.latent_len = pool.latent_len
        self.pool_type = pool.pool
        self.latent = nn.Parameter(pool.latent.detach().clone())
        for name in ("q", "kv", "q_norm", "k_norm", "proj", "proj_drop", "norm", "mlp"):
            setattr(self, name, copy.deepcopy(getattr(pool, name)))

    def _queries(self) -> Tensor:
        """The latent queries ``[latent_len, H, D]``, projected and normed (shared by all images)."""
        q = self.q(self.latent[0]).unflatten(-1, (self.num_heads, self.head_dim))
        return self.q_norm(q)

    def _keys_values(self, x: Tensor):
        kv = self.kv(x).unflatten(-1, (2, self.num_heads, self.head_dim))
        k, v = kv.unbind(-3)
        return self.k_norm(k), v

    def _output(self, x: Tensor) -> Tensor:
        """``[B, latent_len, E]`` attention output -> pooled ``[B, out]``: proj, MLP residual, pool."""
        x = self.proj_drop(self.proj(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool_type == "token":
            return x[:, 0]
        if self.pool_type == "avg":
            return x.mean(1)
        return x

    def forward(self, x: Tensor, index, include_prefix: bool = False, backend: str = "auto") -> Tensor:
        """Pool packed tokens ``x [T, C]`` per image: ``[B, out]``.

        index: the batch's ``MixedScaleIndex`` (or any index with ``cu_seqlens``, ``rows``,
        ``row_image``, optionally ``max_seqlen``); include_prefix: the keys are all of an image's
        rows (timm's ``pool_include_prefix``) or only its patch rows; backend: packed attention's.
        """
        batch = getattr(index, "batch", index.cu_seqlens.numel() - 1)
        # one query sequence per image, then an empty one per padding sequence of a static layout:
        # both layouts list the same sequences and read nothing back to the host
        sequence = torch.arange(index.cu_seqlens.numel(), device=x.device, dtype=torch.int32)
        cu_q = sequence.clamp_max(batch) * self.latent_len
        if include_prefix:
            keys, cu_k = x, index.cu_seqlens
        else:  # patch rows are contiguous per image in packed order: drop P rows per image before
            keys = x[index.rows]
            cu_k = index.cu_seqlens - sequence.clamp_max(batch) * index.prefix_rows.shape[1]
        # an upper bound of the longest key sequence is enough (the kernels mask past each end)
        max_k = getattr(index, "max_seqlen", None)
        if max_k is None:
            max_k = int((cu_k[1:] - cu_k[:-1]).max()) if batch else 0
        k, v = self._keys_values(keys)
        q = self._queries().to(k.dtype).repeat(batch, 1, 1)  # [B * latent_len, H, D]
        backend = attention_backend_for(backend, q, getattr(index, "static", False))
        o = packed_attention(
            q, k, v, cu_q, self.latent_len, cu_seqlens_k=cu_k, max_seqlen_k=max_k, scale=self.scale,
            backend=backend, check_values=False,
        )  # fmt: skip
        return self._output(o.reshape(batch, self.latent_len, -1))

    def dense(self, x: Tensor, weights: Tensor) -> Tensor:
        """Pool dense tokens ``x [B, N, C]`` whose keys are weighted by ``weights [B, N]`` (masked
        mode's Eq. 10 softmax: masked tokens take no part, straight-through gradients reach the gate)."""
        k, v = self._keys_values(x)
        q = self._queries().to(k.dtype).expand(x.shape[0], -1, -1, -1)  # [B, latent_len, H, D]
        o = masked_attention(q, k, v, self.scale, weights)
        return self._output(o.flatten(-2))


def convert_attention_pool(pool: Optional[nn.Module]) -> Optional[PackedAttentionPool]:
    """timm's ``model.attn_pool`` as a ``PackedAttentionPool`` (None stays None); other pools
    (``AttentionPoolPrr``, ...) raise NotImplementedError naming them."""
    if pool is None:
        return None
    from timm.layers import AttentionPoolLatent

    if not isinstance(pool, AttentionPoolLatent):
        raise NotImplementedError(
            f"attention pooling {type(pool).__name__} is not supported; only global_pool='map' (AttentionPoolLatent)"
        )
    return PackedAttentionPool(pool)
