"""timm's Qwen3-VL / Qwen3.5 vision tower (``qwen3_vit_*``: classifier, ``_merge``, ``_enc``) as an MSViT.

The encoder is a pre-norm ViT of timm ``EvaBlock`` s (GELU-tanh MLP, fused qkv with bias, no final
norm) with two position encodings at once:

- a learned absolute grid (48 x 48 in the released towers) that timm resamples to each image's
  patch grid with bilinear ``align_corners=True``: here the same function of timm
  (``resample_pos_embed_grid``) gives the fine table of every image grid, and each coarse token
  takes the tokenizer's resampling of it (the mean of its cells' embeddings for a 2x2 region);
- axial 2D RoPE (``RotaryEmbeddingCat``, 'half' layout): fine tokens at timm's grid coordinates,
  coarse tokens at the mean of their cells' (``msvit.models.rope``).

The projector ('merger', ``_enc`` and ``_merge``: LayerNorm, 2x2 pixel-unshuffle, MLP to the LLM
width) runs on the fine grid (``msvit.models.vlm_tower``); the default coarse patch is its 2x2
window (32 px at patch 16).
"""

import copy
from typing import Tuple

import torch
from torch import nn

from msvit.models.rope import packed_rope
from msvit.models.timm_parts import conv_as_linear
from msvit.models.timm_support import (
    PATCH_EMBED,
    REFUSED_PATCH_EMBED,
    _check_block,
    _check_class,
    _check_patch_embed,
    _check_tokenwise,
    refuse,
)
from msvit.models.vlm_families import classifier_parts
from msvit.models.vlm_tower import GridProjector, TowerParts


class Qwen3GridPositions(nn.Module):
    """The fine position table ``[h*w, d]`` of any patch grid: timm's ``resample_pos_embed_grid``
    of the learned ``[1, G*G, d]`` grid (bilinear, ``align_corners=True``)."""

    def __init__(self, pos_embed: torch.Tensor, grid_size: int):
        super().__init__()
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())
        self.grid_size = grid_size

    def forward(self, fine_grid: Tuple[int, int]) -> torch.Tensor:
        from timm.models.qwen3_vit import resample_pos_embed_grid

        return resample_pos_embed_grid(self.pos_embed, self.grid_size, tuple(fine_grid))[0]


def check_tower(label: str, model: nn.Module, encoder: nn.Module, prefix: str) -> None:
    """The checks a Qwen or DeepSeek tower shares: a conv patch embedding, supported blocks, a
    supported rope, and a pooled output (``global_pool='avg'`` or the projector)."""
    _check_class(label, f"{prefix}patch_embed", encoder.patch_embed, PATCH_EMBED, REFUSED_PATCH_EMBED)
    _check_patch_embed(label, encoder.patch_embed, f"{prefix}patch_embed")
    for i, block in enumerate(encoder.blocks):
        _check_block(label, f"{prefix}blocks.{i}", block)
    if encoder is model and encoder.global_pool == "":
        raise refuse(label, "global_pool", model, "no pooling (global_pool=''): use forward_features for the tokens")
    if encoder is not model:
        if model.global_pool != "avg":
            raise refuse(label, "global_pool", model, f"global_pool={model.global_pool!r} (no pooling)")
        for path in ("norm", "head_drop", "head"):
            _check_tokenwise(label, path, getattr(model, path))


def tower_parts(model: nn.Module, label: str, img_size=None) -> TowerParts:
    """The ``TowerParts`` of a ``Qwen3VitClassifier`` or ``Qwen3VitEncoder``."""
    from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder

    if not isinstance(model, (Qwen3VitClassifier, Qwen3VitEncoder)):
        raise TypeError(f"expected a timm Qwen3VitClassifier or Qwen3VitEncoder, got {type(model).__name__}")
    if img_size is not None:
        raise ValueError("img_size applies to NaFlexVit and Gemma 4; a Qwen tower takes timm_kwargs={'img_size': ...}")
    encoder = model.encoder if isinstance(model, Qwen3VitClassifier) else model
    prefix = "encoder." if encoder is not model else ""
    check_tower(label, model, encoder, prefix)
    projector = None
    if encoder.merger is not None:
        _check_tokenwise(label, f"{prefix}merger", encoder.merger.norm)
        for name in ("fc1", "act", "fc2"):
            _check_tokenwise(label, f"{prefix}merger.{name}", getattr(encoder.merger, name))
        projector = GridProjector(copy.deepcopy(encoder.merger), encoder.merge_size, False, "Qwen's merger")
    return TowerParts(
        conv_as_linear(encoder.patch_embed.proj),
        encoder.patch_embed.proj.kernel_size[0],
        tuple(encoder.patch_embed.grid_size),
        Qwen3GridPositions(encoder.pos_embed, encoder.pos_embed_grid_size),
        nn.ModuleList(copy.deepcopy(list(encoder.blocks))),
        nn.Identity(),  # no final norm on Qwen's encoder tokens
        lambda ratio, scales: packed_rope(encoder, ratio, scales),
        projector,
        encoder is model,
        ratio=encoder.merge_size,
        **classifier_parts(model),
    )
