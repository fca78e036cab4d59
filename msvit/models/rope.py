"""Rotary position embeddings (RoPE) of timm's ``Eva`` models on mixed-scale tokens.

timm computes a RoPE angle as a linear function of a token's grid coordinates: the axial variants
(``RotaryEmbeddingCat``: EVA02, PE, RoPE-ViT axial; ``RotaryEmbeddingDinoV3``) multiply each
coordinate by fixed frequencies, the mixed variant (``RotaryEmbeddingMixed``, RoPE-ViT mixed)
by learned per-block, per-head 2D frequencies. Here:

- a fine token takes its fine-grid coordinates, built by timm's own grid function with the
  model's settings (index / pixel / centred grid, offset, ``ref_feat_shape`` rescale, indexing),
  so it gets exactly timm's embedding at that grid;
- a coarse token takes the centre of the ``r x r`` fine cells it covers: the mean of their
  coordinates (position first, then frequencies: the angles of the mean, not the mean of the
  rotations; for factor 2 the same rule as the 2x2 mean of the absolute position embedding).

All-coarse equals timm on the ``r x`` average-pooled image when timm's coordinates of the pooled
grid are those centres: DINOv3's centred, size-normalised coordinates (cell ``j`` of ``n`` at
``(j + 0.5) / n``). For index grids (EVA02, PE, RoPE-ViT) a coarse token sits at fine coordinate
``r * j + (r - 1) / 2`` while timm's pooled grid puts cell ``j`` at ``j`` (EVA02's
``ref_feat_shape`` rescale: ``j * ref / n``), a different frame; there the rule above is the
definition. Prefix tokens (cls, registers) are not rotated, as in timm. Train-time coordinate
augmentation (DINOv3's shift / jitter / rescale) draws one transform per forward and applies it to
fine and coarse coordinates alike, as timm applies one per forward to its grid.
"""

import copy
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from msvit.models.table_cache import TableCache
from msvit.models.timm_support import ROPE


class PackedRope(nn.Module):
    """timm's RoPE module of an ``Eva`` model, evaluated at mixed-scale token positions.

    Args:
        rope: the model's ``rope`` (kept as a submodule: the mixed variant's frequencies train).
        ratio: coarse patch / fine patch.
        rotate_half: the attention's rotation layout (timm's ``attn.rotate_half``).

    Position ids (``positions``) index the table of ``table``: 0 is the identity rotation (prefix
    tokens), ``1 + i`` fine cell ``i``, ``1 + Nf + j`` coarse region ``j`` (raster orders); with
    more ``scales``, ``1 +`` the node-table entry (``msvit_kernels.scale_tree``).
    """

    def __init__(self, rope: nn.Module, ratio: int, rotate_half: bool, scales: int = 2):
        super().__init__()
        self.kind = type(rope).__name__
        if self.kind not in ROPE:
            raise NotImplementedError(f"RoPE module {self.kind} is not supported (supported: {sorted(ROPE)})")
        self.rope = rope
        self.ratio = ratio
        self.scales = scales
        self.rotate_half = rotate_half
        self.mixed = self.kind == "RotaryEmbeddingMixed"
        self._tables = TableCache()

    def fine_coords(self, grid: Tuple[int, int]) -> Tensor:
        """float32 ``[h*w, 2]`` coordinates of the fine cells, exactly as timm builds them."""
        from timm.layers.pos_embed_sincos import _build_grid, get_mixed_grid

        rope = self.rope
        if self.mixed:
            t_x, t_y = get_mixed_grid(list(grid), grid_indexing=rope.grid_indexing, device=rope.freqs.device)
            return torch.stack([t_x, t_y], -1)
        if self.kind == "RotaryEmbeddingDinoV3":
            kind, ref, device = "centered", None, None  # timm builds DINOv3's grid on the CPU
        else:
            kind, ref, device = rope.grid_type, rope.ref_feat_shape, rope.bands.device
        coords = _build_grid(
            list(grid),
            grid_type=kind,
            ref_feat_shape=ref,
            grid_offset=rope.grid_offset,
            grid_indexing=rope.grid_indexing,
            normalize_coords=rope.normalize_coords,
            device=device,
        )
        return coords.flatten(0, -2)

    def coords(self, grid: Tuple[int, int]) -> Tensor:
        """``[Nf + Nc, 2]``: fine cells, then the coarse regions at the mean of their fine cells
        (more scales: every scale's nodes in turn, each at the mean of the fine cells it covers)."""
        from timm.layers.pos_embed_sincos import _apply_coord_augs

        coords = mixed_scale_coords(self.fine_coords(grid), grid, self.ratio, self.scales)
        rope = self.rope
        if rope.training and rope.aug_active:  # an affine map: augmenting then averaging is the same
            coords = _apply_coord_augs(coords, rope.shift_coords, rope.jitter_coords, rope.rescale_coords)
        return coords

    def embed(self, coords: Tensor) -> Tensor:
        """timm's concatenated ``[sin, cos]`` embedding at arbitrary coordinates ``[N, 2]``:
        ``[N, 2D]`` (axial) or ``[depth, H, N, 2D]`` (mixed), computed as timm computes it."""
        from timm.layers.pos_embed_sincos import _rope_layout, get_mixed_freqs

        rope = self.rope
        if self.mixed:
            return get_mixed_freqs(rope.freqs, coords[:, 0], coords[:, 1])
        if self.kind == "RotaryEmbeddingDinoV3":
            sin, cos = rope._get_pos_embed_from_coords(coords)
        else:
            angles = (coords.to(rope.bands.device)[..., None] * rope.bands).flatten(-2)
            sin, cos = (_rope_layout(f(angles), rope.rotate_half) for f in (torch.sin, torch.cos))
        return torch.cat([sin, cos], -1)

    def table(self, grid: Tuple[int, int]) -> Tensor:
        """The embedding of every position id (see the class docstring) for an image's fine grid."""
        emb = self.embed(self.coords(grid))
        half = emb.shape[-1] // 2
        identity = torch.cat([emb.new_zeros(half), emb.new_ones(half)])  # sin 0, cos 1: x unchanged
        return torch.cat([identity.expand(*emb.shape[:-2], 1, -1), emb], -2)

    def rotary(self, grid: Tuple[int, int], positions: Tensor) -> Callable[[int, Tensor], Tensor]:
        """``rotary(block_index, t)``: t ``[..., H, D]`` (tokens at ``positions [...]``) rotated."""
        return self.rotary_of(self.grid_table(grid), positions)

    def grid_table(self, grid: Tuple[int, int]) -> Tensor:
        """``table(grid)``, built once per grid at inference (``msvit.models.table_cache``)."""
        rope = self.rope
        if rope.training and getattr(rope, "aug_active", False):  # a fresh coordinate augmentation per forward
            return self.table(grid)
        tensors = [*rope.parameters(), *rope.buffers()]
        return self._tables.get(tuple(grid), tensors, lambda: self.table(grid))

    def batch_table(self, batch, grids) -> Tensor:
        return batch_rope_table(batch, [self.grid_table(grid) for grid in grids])

    def rotary_of(self, table: Tensor, positions: Tensor) -> Callable[[int, Tensor], Tensor]:
        """``rotary`` with the table given (``grid_table`` or ``batch_table``)."""
        from timm.layers import apply_rot_embed_cat

        shared = None if self.mixed else table[positions].unsqueeze(-2)  # one rotation for all heads

        def rotate(block_index: int, t: Tensor) -> Tensor:
            emb = shared if shared is not None else table[block_index][:, positions].movedim(0, -2)
            return apply_rot_embed_cat(t, emb, half=self.rotate_half)

        return rotate


def packed_rope(model, ratio: int, scales: int = 2) -> Optional["PackedRope"]:
    """The ``PackedRope`` of a timm model with a ``rope`` and RoPE attention in its ``blocks`` (None without one)."""
    rope = getattr(model, "rope", None)
    if rope is None:
        return None
    layouts = {bool(getattr(b.attn, "rotate_half", False)) for b in model.blocks}
    if len(layouts) > 1:
        raise NotImplementedError("blocks with different RoPE rotation layouts (rotate_half) are not supported")
    return PackedRope(copy.deepcopy(rope), ratio, layouts.pop() if layouts else False, scales)


def mixed_scale_coords(fine: Tensor, grid: Tuple[int, int], ratio: int, scales: int) -> Tensor:
    """``[Nf + Nc, 2]`` (more scales: every scale's nodes in turn): the fine cells' coordinates
    ``fine [h*w, 2]``, then each coarser token at the mean of the fine cells it covers."""
    h, w = grid
    tables = [fine]
    for s in range(1, scales):
        r = ratio**s
        whole = fine.reshape(h, w, 2)[: h // r * r, : w // r * r]  # border cells belong to no region
        tables.append(whole.reshape(h // r, r, w // r, r, 2).mean((1, 3)).reshape(-1, 2))
    return torch.cat(tables)


def packed_positions(index) -> Tensor:
    """Position id of every packed row (``MixedScaleIndex``): 0 for prefix rows, else 1 + the
    row's entry in the tokenizer's ``cat(fine, coarse)`` position table."""
    positions = torch.zeros(index.total, dtype=torch.long, device=index.rows.device)
    positions[index.rows] = index.position + 1
    return positions


def dense_positions(num_prefix: int, num_fine: int, num_coarse: int, device=None) -> Tensor:
    """Position ids of the dense layout (prefix, fine in raster order, coarse in raster order)."""
    ids = torch.arange(1, 1 + num_fine + num_coarse, device=device)
    return torch.cat([ids.new_zeros(num_prefix), ids])


def batch_rope_table(batch, tables) -> Tensor:
    """The RoPE table of a list of images of different sizes (docs/design.md section 11) from each
    image's own table (position ids along dim -2, id 0 the identity): the identity row, then every
    image's node rows in ``batch``'s global node order (``tree_batch.TreeBatch``), so position id
    ``1 + node`` is the token's global node. Shared by every RoPE family (``PackedRope``, Gemma 4's)."""
    nodes = batch.node_table([t.narrow(-2, 1, t.shape[-2] - 1) for t in tables])
    return torch.cat([tables[0].narrow(-2, 0, 1), nodes], -2)
