"""timm's Gemma 4 vision tower (``gemma4_vit_*``: classifier, ``_enc``) as an MSViT.

What differs from a ViT, and how each part runs on packed mixed-scale tokens:

- **Embedding**: a bias-free linear layer on (C, p, p)-flattened patches of ``2 * (x - 0.5)``
  (images come in [0, 1]); folded here into one linear layer of ``x`` (weight ``2W``, bias
  ``-W 1``), so a coarse patch is area-averaged in pixel space like every other family's.
- **Positions**: a factorised table, ``T[0, column] + T[1, row]``, looked up for any grid
  (``Gemma4GridPositions``); a coarse token takes the tokenizer's resampling of its cells'.
  2D RoPE (``Gemma4PackedRope``): each half of a head rotated by one axis ('half' layout per
  half), theta 100; fine tokens at their (column, row), coarse ones at the mean of their cells'.
- **Blocks** (``MixedScaleGemma4Block``): sandwich norms (RMSNorm before and after attention and
  MLP), separate q/k/v projections (optionally clamped), RMSNorm on q, k (with gain) and v
  (without), attention scale 1, grouped-query attention by repeating k and v as timm does, a
  gated GELU-tanh MLP. No final norm.
- **Projector** (``_enc``: ``global_pool='soft'``): the mean of each 3x3 cell window times
  ``sqrt(D)`` (and the 570m's standardisation), on the fine grid (``msvit.models.vlm_tower``);
  the default coarse patch is its window (48 px at patch 16).
"""

import copy
import math
from typing import Callable, Optional, Tuple

import torch
from timm.models.gemma4_vit import Gemma4Block, Gemma4VitClassifier, Gemma4VitEncoder, apply_multidimensional_rope
from torch import Tensor, nn

from msvit.models.rope import batch_rope_table, mixed_scale_coords
from msvit.models.table_cache import TableCache
from msvit.models.timm_support import TOKENWISE, _check_tokenwise, _known_name, refuse
from msvit.models.vlm_families import classifier_parts
from msvit.models.vlm_tower import GridProjector, TowerParts

# the modules of a Gemma 4 block: the attention core is MixedScaleGemma4Block's, the rest tokenwise
BLOCK_MODULES = TOKENWISE | {"Gemma4Block", "Gemma4Attention", "Gemma4ClippableLinear", "Gemma4GatedMlp"}


class Gemma4GridPositions(nn.Module):
    """The fine position table ``[h*w, d]``: ``table[0, column] + table[1, row]`` (timm's one-hot lookup)."""

    def __init__(self, table: Tensor):
        super().__init__()
        self.table = nn.Parameter(table.detach().clone())

    def forward(self, fine_grid: Tuple[int, int]) -> Tensor:
        h, w = fine_grid
        size = self.table.shape[1]
        if h > size or w > size:
            raise ValueError(
                f"Gemma 4's position table holds {size} positions per axis; images of {h}x{w} patches exceed it"
            )
        return (self.table[0, :w][None] + self.table[1, :h][:, None]).reshape(h * w, -1)


class Gemma4PackedRope(nn.Module):
    """timm's ``Gemma4RotaryEmbedding2D`` at mixed-scale token positions (``MSViT.rope``'s interface:
    ``rotary(grid, positions)``; position ids as in ``msvit.models.rope.PackedRope``)."""

    def __init__(self, rotary: nn.Module, ratio: int, scales: int):
        super().__init__()
        self.rope = rotary  # the name msvit.io.architecture reads a RoPE module by
        self.rotate_half = True  # each half of a head in the "half" layout (timm's apply_multidimensional_rope)
        self.ratio = ratio
        self.scales = scales
        self._tables = TableCache()

    def table(self, grid: Tuple[int, int]) -> Tensor:
        """``[2, 1 + N, head_dim]``: cos and sin of every position id (0: the identity)."""
        h, w = grid
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        fine = torch.stack([cols.flatten(), rows.flatten()], -1).float()  # timm's internal (x, y)
        coords = mixed_scale_coords(fine, grid, self.ratio, self.scales).to(self.rope.inv_freq.device)
        inv_freq = self.rope.inv_freq.float()
        freqs = [coords[:, i, None] * inv_freq for i in range(2)]
        emb = torch.cat([torch.cat([f, f], -1) for f in freqs], -1)
        table = torch.stack([emb.cos(), emb.sin()])
        identity = torch.stack([table.new_ones(table.shape[-1]), table.new_zeros(table.shape[-1])])
        return torch.cat([identity[:, None], table], 1)

    def rotary(self, grid: Tuple[int, int], positions: Tensor) -> Callable[[int, Tensor], Tensor]:
        return self.rotary_of(self.grid_table(grid), positions)

    def grid_table(self, grid: Tuple[int, int]) -> Tensor:
        return self._tables.get(tuple(grid), [self.rope.inv_freq], lambda: self.table(grid))

    def batch_table(self, batch, grids) -> Tensor:
        """A list of images of different sizes: ``rope.batch_rope_table`` of every image's table."""
        return batch_rope_table(batch, [self.grid_table(grid) for grid in grids])

    def rotary_of(self, table: Tensor, positions: Tensor) -> Callable[[int, Tensor], Tensor]:
        """``rotary`` with the table given (``grid_table`` or ``batch_table``)."""
        cos, sin = table[:, positions]

        def rotate(block_index: int, t: Tensor) -> Tensor:
            return apply_multidimensional_rope(t, cos.to(t.dtype), sin.to(t.dtype), ndim=2, unsqueeze_dim=-2)

        return rotate


class MixedScaleGemma4Block(Gemma4Block):
    """timm's ``Gemma4Block`` (same weights, same forward) that also runs on packed or masked tokens
    (``msvit.models.layers.run_block`` calls ``run_mixed_scale``)."""

    def run_mixed_scale(self, x: Tensor, attend, drop_path, rotate: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
        attn = self.attn
        h = self.norm1(x)
        q = attn.q_norm(attn.q_proj(h).unflatten(-1, (attn.num_heads, attn.head_dim)))
        k = attn.k_norm(attn.k_proj(h).unflatten(-1, (attn.num_kv_heads, attn.head_dim)))
        v = attn.v_norm(attn.v_proj(h).unflatten(-1, (attn.num_kv_heads, attn.head_dim)))
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        if attn.num_kv_groups > 1:  # grouped-query attention, as timm repeats the key/value heads
            k, v = (t.repeat_interleave(attn.num_kv_groups, dim=-2) for t in (k, v))
        o = attn.proj_drop(attn.o_proj(attend(q, k, v, 1.0).flatten(-2)))
        x = x + drop_path(self.drop_path, self.norm2(o))
        return x + drop_path(self.drop_path, self.norm4(self.mlp(self.norm3(x))))


class Gemma4SoftPool(nn.Module):
    """Gemma 4's soft-token pool on the fine grid: ``[B, h, w, C]`` -> the mean of each ``k x k``
    window (raster order), times ``sqrt(C)``, then ``(x - std_bias) * std_scale`` when the tower has them."""

    def __init__(self, window: int, scale: float, std_bias: Optional[Tensor], std_scale: Optional[Tensor]):
        super().__init__()
        self.window = window
        self.scale = scale
        self.register_buffer("std_bias", None if std_bias is None else std_bias.detach().clone())
        self.register_buffer("std_scale", None if std_scale is None else std_scale.detach().clone())

    def forward(self, grid: Tensor) -> Tensor:
        b, h, w, c = grid.shape
        k = self.window
        pooled = grid.float().view(b, h // k, k, w // k, k, c).mean((2, 4)).reshape(b, -1, c)
        x = pooled.to(grid.dtype) * self.scale
        return x if self.std_bias is None else (x - self.std_bias) * self.std_scale


def _embedding(proj: nn.Linear) -> nn.Linear:
    """``proj(2 * (x - 0.5))`` as one linear layer of ``x``."""
    embed = nn.Linear(proj.in_features, proj.out_features).to(device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        embed.weight.copy_(2 * proj.weight)
        bias = -proj.weight.sum(1)
        embed.bias.copy_(bias if proj.bias is None else bias + proj.bias)
    return embed


def _check(label: str, model: nn.Module, encoder: nn.Module, prefix: str) -> None:
    for i, block in enumerate(encoder.blocks):
        for path, sub in block.named_modules(prefix=f"{prefix}blocks.{i}"):
            if _known_name(sub) not in BLOCK_MODULES:
                raise refuse(label, path, sub, "a module class from_timm does not know in a Gemma 4 block")
    if encoder is model and encoder.global_pool in ("none", ""):
        feature = "no pooling (global_pool='none'): use forward_features for the tokens"
        raise refuse(label, "global_pool", model, feature)
    if encoder is not model:
        if model.global_pool != "avg":
            raise refuse(label, "global_pool", model, f"global_pool={model.global_pool!r} (no pooling)")
        for path in ("norm", "head_drop", "head"):
            _check_tokenwise(label, path, getattr(model, path))


def _grid(model: nn.Module, patch: int, img_size) -> Tuple[int, int]:
    """The nominal fine grid: ``img_size``, else the pretrained_cfg's input size (timm keeps no image size)."""
    if img_size is None:
        img_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 768, 768))[1:]
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % patch or w % patch:
        raise ValueError(f"img_size {(h, w)} must be a multiple of the patch size {patch}")
    return h // patch, w // patch


def tower_parts(model: nn.Module, label: str, img_size=None) -> TowerParts:
    """The ``TowerParts`` of a ``Gemma4VitClassifier`` or ``Gemma4VitEncoder``."""
    if not isinstance(model, (Gemma4VitClassifier, Gemma4VitEncoder)):
        raise TypeError(f"expected a timm Gemma4VitClassifier or Gemma4VitEncoder, got {type(model).__name__}")
    encoder = model.encoder if isinstance(model, Gemma4VitClassifier) else model
    prefix = "encoder." if encoder is not model else ""
    ph, pw = encoder.patch_size
    if ph != pw:
        raise refuse(label, f"{prefix}patch_embed", encoder.patch_embed, f"a non-square patch ({ph}x{pw})")
    _check(label, model, encoder, prefix)
    projector = None
    if encoder.global_pool == "soft":
        k = encoder.pooling_kernel_size
        pool = Gemma4SoftPool(k, math.sqrt(encoder.embed_dim), encoder.std_bias, encoder.std_scale)
        projector = GridProjector(pool, k, False, "Gemma 4's soft-token pool")
    blocks = nn.ModuleList(copy.deepcopy(list(encoder.blocks)))
    for block in blocks:
        block.__class__ = MixedScaleGemma4Block
    return TowerParts(
        _embedding(encoder.patch_embed.input_proj),
        ph,
        _grid(model, ph, img_size),
        Gemma4GridPositions(encoder.patch_embed.position_embedding_table),
        blocks,
        nn.Identity(),  # no final norm on Gemma 4's encoder tokens
        lambda ratio, scales: Gemma4PackedRope(copy.deepcopy(encoder.rotary_emb), ratio, scales),
        projector,
        encoder is model,
        ratio=encoder.pooling_kernel_size,
        **classifier_parts(model),
    )
