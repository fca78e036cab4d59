"""Mixed-scale tokenizer with embeddings shared across scales (Section 2.1, Eq. 4-5).

One linear patch embedding and one fine-grid position embedding serve both scales: a coarse
patch is area-averaged down to the fine patch size before the shared embedding, and the coarse
position embedding is the fine one resampled bilinearly (``align_corners=False``, no antialias;
for a factor of 2 this is the 2x2 mean), or, with ``coarse_pos="apt"``, as APT's code resamples
it (timm's ``resample_abs_pos_embed``: bicubic, antialiased; docs/design.md section 15). With an
``aggregation`` module (APT's zero-initialised aggregation, ``msvit.models.aggregation``) every
coarse token also gets a term computed from the embeddings of its fine sub-patches, in every mode.
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvit.models.aggregation import packed_regions, per_entry, sub_patch_pixels
from msvit.models.checks import check_choice
from msvit.models.table_cache import TableCache
from msvit_kernels.dispatch import compute_dtype, use_triton
from msvit_kernels.index_kernel import triton_mixed_scale_index
from msvit_kernels.pack_kernel import gather_embed_pack
from msvit_kernels.reference import COARSE_PIXELS, coarse_patches_at_fine_size, pack_reference, patchify
from msvit_kernels.scale_tree import ScaleTree, tree_index
from msvit_kernels.tree_batch import TreeBatch, batch_index
from msvit_kernels.tree_index_kernel import triton_tree_index
from msvit_kernels.varlen import (
    MixedScaleIndex,
    StaticShape,
    count_border_cells,
    fine_cells_of_regions,
    mixed_scale_index,
)

# How a coarser scale's position table comes from the fine one: "bilinear" (the package's, with which
# the all-coarse model equals timm on the pooled image) or "apt" (APT's code: timm's bicubic,
# antialiased resample_abs_pos_embed)
COARSE_POS = ("bilinear", "apt")


class PositionTables(NamedTuple):
    """prefix: ``[P, d]`` or None (prefix tokens take no position); patches: ``[Nf + Nc, d]`` (fine
    rows first, then coarse) or None when the model has no position embedding."""

    prefix: Optional[Tensor]
    patches: Optional[Tensor]


class MixedScaleTokenizer(nn.Module):
    """Embeds fine and coarse patches with shared weights and lays them out packed or dense.

    Args:
        embed: ``nn.Linear(C * p * p, d)``, the patch embedding in (C, p, p) flattening order.
        fine_patch: S_f; ratio: S_c / S_f (an integer >= 1).
        grid: fine grid (h, w) the position embedding was learned at.
        pos_embed: ``[1, P_pos + h*w, d]`` or None; P_pos = num_prefix unless ``no_embed_class``.
        prefix_tokens: ``[1, P, d]`` (cls then registers) or None.
        embed_norm: applied to every patch embedding before the position is added (timm's
            ``patch_embed.norm``; usually Identity).
        aggregation: None (``aggregate="shared"``: a coarse token is the shared embedding of its
            downsampled patch) or a ``ZeroConvAggregation`` whose output is added to each coarse
            token's (normed) embedding before its position (``msvit.models.aggregation``).
        coarse_pos: ``"bilinear"`` or ``"apt"`` (``COARSE_POS``): how every coarser scale's position
            table is resampled from the fine one.
        coarse_pixels: ``"area"`` or ``"apt"`` (``reference.COARSE_PIXELS``): how a coarser patch
            comes down to the fine size before the shared embedding: the mean of each r**s x r**s
            block (Eq. 5), or APT's bilinear resize (for 64 px tokens the mean of each 4x4 block's
            centre 2x2; the torch path only: the fused pack kernel averages whole blocks).
        grid_positions: instead of ``pos_embed``, a module whose ``forward(fine_grid)`` gives the
            fine table ``[h*w, d]`` of any grid by the model's own rule (the VLM towers: Qwen's
            align_corners=True resampling, Gemma 4's factorised lookup); coarser scales are then
            resampled from it as from ``pos_embed``'s.

    Attribute ``kernels`` (``"auto" | "triton" | "reference"``, set by ``MSViT.kernels``): ``pack``
    runs the fused Triton kernels (``msvit_kernels.index_kernel`` and ``pack_kernel``) or torch;
    auto = Triton on CUDA. A non-Identity ``embed_norm`` or an ``aggregation`` always takes the
    torch path (the fused pack kernel does neither; a known cost of ``aggregate="zero_conv"``).
    """

    def __init__(
        self,
        embed: nn.Linear,
        fine_patch: int,
        ratio: int,
        grid: Tuple[int, int],
        pos_embed: Optional[nn.Parameter],
        prefix_tokens: Optional[nn.Parameter],
        no_embed_class: bool = False,
        embed_norm: Optional[nn.Module] = None,
        aggregation: Optional[nn.Module] = None,
        scales: int = 2,
        coarse_pos: str = "bilinear",
        grid_positions: Optional[nn.Module] = None,
        coarse_pixels: str = "area",
    ):
        super().__init__()
        check_choice("coarse_pos", coarse_pos, COARSE_POS)
        check_choice("coarse_pixels", coarse_pixels, COARSE_PIXELS)
        if grid_positions is not None and pos_embed is not None:
            raise ValueError("pass pos_embed or grid_positions, not both")
        if scales > 2 and ratio < 2:
            raise ValueError(f"more than two scales need a ratio >= 2 between scales, got {ratio}")
        self.scales = int(scales)
        self.embed = embed
        self.fine_patch = fine_patch
        self.ratio = ratio
        self.grid = tuple(grid)
        self.pos_embed = pos_embed
        self.prefix_tokens = prefix_tokens
        self.no_embed_class = no_embed_class
        self.embed_norm = embed_norm if embed_norm is not None else nn.Identity()
        self.aggregation = aggregation
        self.coarse_pos = coarse_pos
        self.coarse_pixels = coarse_pixels
        self.grid_positions = grid_positions
        self.kernels = "auto"
        self._tables = TableCache()

    @property
    def num_prefix(self) -> int:
        return 0 if self.prefix_tokens is None else self.prefix_tokens.shape[1]

    @property
    def aggregate(self) -> str:
        """The ``from_timm`` name of the coarse-token embedding: "shared" or "zero_conv"."""
        return "shared" if self.aggregation is None else "zero_conv"

    @property
    def coarse_patch(self) -> int:
        """The next patch size up (S_c); the coarsest is ``patch_sizes[-1]``."""
        return self.fine_patch * self.ratio

    @property
    def patch_sizes(self) -> Tuple[int, ...]:
        """Every scale's patch size, finest first: ``(p, p*r)``, or ``(p, p*r, p*r*r, ...)``."""
        return tuple(self.fine_patch * self.ratio**s for s in range(self.scales))

    def tree(self, fine_grid: Tuple[int, int]) -> ScaleTree:
        """The quadtree of a finest grid (``msvit_kernels.scale_tree``; more than two scales)."""
        return ScaleTree.of(fine_grid, self.ratio, self.scales)

    def batch_of(self, images: Sequence[Tensor]) -> TreeBatch:
        """The trees of a list of ``[C, H_b, W_b]`` images (docs/design.md section 11); refuses,
        naming the image, one without a whole coarsest patch."""
        return TreeBatch.of([self.grids(image)[0] for image in images], self.ratio, self.scales)

    def grids(self, images: Tensor) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(fine grid, coarse grid) of a batch of images."""
        h, w = images.shape[-2:]
        return (h // self.fine_patch, w // self.fine_patch), (h // self.coarse_patch, w // self.coarse_patch)

    def position_tables(self, fine_grid: Tuple[int, int]) -> PositionTables:
        """Position embeddings for an image's grids: the fine one (resampled like timm's
        ``dynamic_img_size`` when the grid differs from the trained one) and the coarse one.
        Built once per grid at inference (``msvit.models.table_cache``)."""
        if self.grid_positions is not None:
            params = list(self.grid_positions.parameters())
        elif self.pos_embed is not None:
            params = [self.pos_embed]
        else:
            return PositionTables(None, None)
        return self._tables.get(tuple(fine_grid), params, lambda: self._position_tables(fine_grid))

    def _position_tables(self, fine_grid: Tuple[int, int]) -> PositionTables:
        from timm.layers import resample_abs_pos_embed  # timm is the source of truth for this resampling

        n_pos_prefix = 0 if self.no_embed_class or self.grid_positions is not None else self.num_prefix
        if self.grid_positions is not None:
            prefix, fine = None, self.grid_positions(tuple(fine_grid))
        else:
            pos = self.pos_embed
            if tuple(fine_grid) != self.grid:
                pos = resample_abs_pos_embed(
                    pos, new_size=list(fine_grid), old_size=list(self.grid), num_prefix_tokens=n_pos_prefix
                )
            prefix, fine = pos[0, :n_pos_prefix], pos[0, n_pos_prefix:]
        d = fine.shape[-1]
        fine_map = fine.transpose(0, 1).reshape(1, d, *fine_grid)
        tables = [fine]
        for s in range(1, self.scales):  # every coarser scale: the fine embedding resampled
            factor = self.ratio**s
            grid = (fine_grid[0] // factor, fine_grid[1] // factor)
            # resampled from the whole cells' fine cells only: border cells (a size that is not a
            # whole number of cells) are no cell's, and a divisible grid is left as it was
            cropped = fine_map[:, :, : grid[0] * factor, : grid[1] * factor]
            if self.coarse_pos == "apt":  # APT's TokenizedZeroConvPatchAttn.forward: timm's defaults
                whole = cropped.shape[-2:]
                rows = cropped.flatten(2).transpose(1, 2)
                coarse = resample_abs_pos_embed(rows, new_size=list(grid), old_size=list(whole), num_prefix_tokens=0)
                tables.append(coarse[0])
                continue
            coarse = F.interpolate(cropped, size=grid, mode="bilinear", align_corners=False, antialias=False)
            tables.append(coarse.reshape(d, -1).transpose(0, 1))
        return PositionTables(prefix if n_pos_prefix else None, torch.cat(tables))

    def batch_position_tables(self, images: Sequence[Tensor], batch: TreeBatch) -> PositionTables:
        """``position_tables`` of a list of images: each image's tables at its own grid (resampled as
        timm's ``dynamic_img_size``, cached per grid), the patch rows in ``batch``'s global node order."""
        tables = [self.position_tables(self.grids(image)[0]) for image in images]
        if tables[0].patches is None:
            return tables[0]
        return PositionTables(tables[0].prefix, batch.node_table([t.patches for t in tables]))

    def prefix_rows(self, positions: PositionTables, dtype: torch.dtype) -> Optional[Tensor]:
        """``[P, d]`` prefix tokens with their position (if they have one), or None."""
        if self.prefix_tokens is None:
            return None
        prefix = self.prefix_tokens[0].to(dtype)
        return prefix + positions.prefix if positions.prefix is not None else prefix

    def pack(
        self, images: Tensor, hard: Tensor, st: Tensor, shape: Optional[StaticShape] = None
    ) -> Tuple[Tensor, MixedScaleIndex]:
        """Packed tokens ``[T, d]`` of the surviving tokens and their index.

        hard: bool ``[B, Nc]`` (True = fine); st: ``[B, Nc]`` straight-through values. Every patch
        token is multiplied by its straight-through value (fine: st, coarse: 1 - st), which is 1 in
        the forward pass and routes the task gradient to the gate (docs/design.md section 2).
        shape: a ``varlen.StaticShape`` (T = its capacity, padding rows, no host read) or None.
        More than two scales: hard and st are ``[B, D]`` split decisions (``scale_tree``).
        """
        if isinstance(images, (list, tuple)):
            return self._pack_list(images, hard, st, shape)
        if self.scales > 2:
            return self._pack_tree(images, hard, st, shape)
        fine_grid, coarse_grid = self.grids(images)
        fused = use_triton(self.kernels, images, self._fallback(images))
        build_index = triton_mixed_scale_index if fused else mixed_scale_index
        index = build_index(hard, coarse_grid, self.ratio, self.num_prefix, shape, fine_grid)
        positions = self.position_tables(fine_grid)
        st = st if st.requires_grad else None  # st is 1 in value: scaling only routes the gradient
        extra = None
        if self.aggregation is not None:
            fixed = self.num_prefix + count_border_cells(fine_grid, self.ratio)
            regions = packed_regions(hard, index, fixed, self.ratio)
            if regions.numel():  # an all-fine batch has no coarse token
                extra = per_entry(self.aggregated(images, regions), regions, index, hard.numel())
        return self._embed_pack(images, index, positions, st, fused, extra), index

    def _pack_tree(
        self, images: Tensor, hard: Tensor, st: Tensor, shape: Optional[StaticShape]
    ) -> Tuple[Tensor, MixedScaleIndex]:
        """``pack`` for more than two scales (docs/design.md section 10): every token is scaled by
        its token weight (the product of the split values on its path), 1 in the forward pass."""
        fine_grid = self.grids(images)[0]
        tree = self.tree(fine_grid)
        fused = use_triton(self.kernels, images, self._fallback(images))
        build_index = triton_tree_index if fused else tree_index
        index = build_index(hard, tree, self.num_prefix, shape)
        positions = self.position_tables(fine_grid)
        weights = torch.cat(tree.token_weights(st), 1) if st.requires_grad else None
        extra = None
        if self.aggregation is not None:  # every node's term; each token reads its own
            n_top = max(tree.counts[-1], 1)
            image = torch.where(index.region >= 0, index.region // n_top, -1 - index.region)
            extra = self.tree_aggregated(images, tree)[image, index.position]
        return self._embed_pack(images, index, positions, weights, fused, extra), index

    def _pack_list(
        self, images: Sequence[Tensor], hard: Tensor, st: Tensor, shape: Optional[StaticShape]
    ) -> Tuple[Tensor, MixedScaleIndex]:
        """``pack`` of a list of images of different sizes (docs/design.md section 11): hard and st
        are flat ``[sum D_b]`` (``TreeBatch``), every token scaled by its token weight."""
        batch = self.batch_of(images)
        fused = use_triton(
            self.kernels, images[0], self._fallback(next((i for i in images if i.requires_grad), images[0]))
        )
        index = batch_index(hard, batch, self.num_prefix, shape)
        positions = self.batch_position_tables(images, batch)
        weights = batch.token_weights(st) if st.requires_grad else None
        if self.aggregation is not None:  # each image's node terms (its own grid), then each token's own
            terms = [self.tree_aggregated(image[None], tree)[0] for image, tree in zip(images, batch.trees)]
            extra = batch.node_table(terms, dim=0)[index.position]
            return self._embed_pack(list(images), index, positions, weights, False, extra), index
        if fused:  # one launch over the flat pixel buffer; each node carries its pixel geometry
            pixels = torch.cat([image.reshape(-1) for image in images])
            node_pixels = batch.node_pixels(self.fine_patch, images[0].shape[0], pixels.device)
            return self._embed_pack(pixels, index, positions, weights, True, node_pixels=node_pixels), index
        return self._embed_pack(list(images), index, positions, weights, False), index

    def pack_padded(self, pixels: Tensor, index: MixedScaleIndex, positions: PositionTables, node_pixels: Tensor):
        """Packed tokens ``[T, d]`` of a padded list (captured inference of lists, docs/design.md
        section 19): the flat pixel buffer, ``padded_batch.padded_batch_index``'s index, the
        padded position table and node pixel table; no straight-through weights (inference)."""
        fused = use_triton(self.kernels, pixels, self._fallback(pixels))
        return self._embed_pack(pixels, index, positions, None, fused, node_pixels=node_pixels)

    def _embed_pack(self, images, index, positions, st, fused: bool, extra=None, node_pixels=None) -> Tensor:
        """Packed tokens of ``index``: the fused kernel in the compute dtype, or the torch reference
        (``st``: the straight-through values of ``pack``, or a tree's token-weight table)."""
        if fused:
            dtype = compute_dtype(images)
            bias = self.embed.bias.to(dtype) if self.embed.bias is not None else None
            return gather_embed_pack(
                images.to(dtype),
                index,
                self.embed.weight.to(dtype),
                bias,
                positions.patches,
                st,
                self.prefix_rows(positions, dtype),
                self.fine_patch,
                self.ratio,
                scales=self.scales,
                node_pixels=node_pixels,
            )
        return pack_reference(
            images,
            index,
            self.embed.weight,
            self.embed.bias,
            positions.patches,
            st,
            self.prefix_rows(positions, (images[0] if isinstance(images, list) else images).dtype),
            self.fine_patch,
            self.ratio,
            norm=self.embed_norm,
            extra=extra,
            scales=self.scales,
            node_pixels=node_pixels,
            coarse_pixels=self.coarse_pixels,
        )

    def _fallback(self, images: Tensor) -> str:
        """Why this batch cannot take the fused path ('' when it can)."""
        if not isinstance(self.embed_norm, nn.Identity):
            return f"the fused tokenizer does not apply embed_norm ({type(self.embed_norm).__name__})"
        if self.aggregation is not None:
            return "the fused tokenizer does not aggregate sub-patch embeddings (aggregate='zero_conv')"
        if self.coarse_pixels != "area":
            return f"the fused tokenizer averages whole blocks, not coarse_pixels={self.coarse_pixels!r} (APT's resize)"
        if images.requires_grad:
            return "the fused tokenizer gives no gradient to pixels, and these require one"
        return ""

    def dense(self, images: Tensor, st: Tensor) -> Tuple[Tensor, Tensor]:
        """All ``P + Nf + Nc`` tokens of every image, and the key weight of each (Eq. 10).

        Returns tokens ``[B, P + Nf + Nc, d]`` (prefix, fine in raster order, coarse in raster
        order) and weights ``[B, P + Nf + Nc]``: 1 for prefix tokens, st of the region for fine
        tokens, 1 - st for coarse ones (Eq. 1-3 in this package's convention, True = fine).
        """
        if self.scales > 2:
            return self._dense_tree(images, st)
        fine_grid, coarse_grid = self.grids(images)
        pixels = torch.cat(
            [
                patchify(images, self.fine_patch),
                coarse_patches_at_fine_size(images, self.fine_patch, self.ratio, self.coarse_pixels),
            ],
            1,
        )
        tokens = self.embed_norm(self.embed(pixels))
        if self.aggregation is not None:  # every region's coarse token exists in the dense layout
            batch, n_fine, n_coarse = images.shape[0], fine_grid[0] * fine_grid[1], coarse_grid[0] * coarse_grid[1]
            terms = self.aggregated(images, torch.arange(batch * n_coarse, device=images.device))
            coarse = tokens[:, n_fine:] + terms.view(batch, n_coarse, tokens.shape[-1])
            tokens = torch.cat([tokens[:, :n_fine], coarse], 1)
        positions = self.position_tables(fine_grid)
        if positions.patches is not None:
            tokens = tokens + positions.patches
        fine_region = region_of_fine_cells(coarse_grid, self.ratio, images.device, fine_grid)
        in_region = fine_region >= 0  # border cells are always fine: weight 1
        weights = torch.cat([torch.where(in_region, st[:, fine_region.clamp_min(0)], 1), 1 - st], 1)
        prefix = self.prefix_rows(positions, tokens.dtype)
        if prefix is not None:
            tokens = torch.cat([prefix.expand(images.shape[0], -1, -1), tokens], 1)
            weights = torch.cat([weights.new_ones(images.shape[0], self.num_prefix), weights], 1)
        return tokens, weights

    def _dense_tree(self, images: Tensor, st: Tensor) -> Tuple[Tensor, Tensor]:
        """``dense`` for more than two scales: every node of every scale (the node table's order:
        finest scale first), weighted by its token weight; st: ``[B, D]`` split values."""
        fine_grid = self.grids(images)[0]
        tree = self.tree(fine_grid)
        pixels = torch.cat(
            [patchify(images, self.fine_patch)]
            + [
                coarse_patches_at_fine_size(images, self.fine_patch, self.ratio**s, self.coarse_pixels)
                for s in range(1, self.scales)
            ],
            1,
        )
        tokens = self.embed_norm(self.embed(pixels))
        if self.aggregation is not None:
            tokens = tokens + self.tree_aggregated(images, tree)
        positions = self.position_tables(fine_grid)
        if positions.patches is not None:
            tokens = tokens + positions.patches
        weights = torch.cat(tree.token_weights(st), 1)
        prefix = self.prefix_rows(positions, tokens.dtype)
        if prefix is not None:
            tokens = torch.cat([prefix.expand(images.shape[0], -1, -1), tokens], 1)
            weights = torch.cat([weights.new_ones(images.shape[0], self.num_prefix), weights], 1)
        return tokens, weights

    def aggregated(self, images: Tensor, regions: Tensor) -> Tensor:
        """``[K, d]``: the aggregation term of the coarse tokens of the flat regions ``regions``
        (int64 ``[K]``), from the embeddings (``embed_norm(embed(.))``, as fine tokens) of their
        fine sub-patches only."""
        pixels = sub_patch_pixels(images, regions, self.fine_patch, self.ratio)
        sub = self.embed_norm(self.embed(pixels))
        return self.aggregation(sub.view(regions.numel(), self.ratio * self.ratio, sub.shape[-1]))

    def tree_aggregated(self, images: Tensor, tree: ScaleTree) -> Tensor:
        """``[B, n_nodes, d]``: the aggregation term of every node of ``tree`` (node-table order,
        finest first; 0 on the finest scale), from the embeddings of every finest cell
        (``ZeroConvAggregation.tree_terms``; host-free, so static shapes keep working)."""
        fine = self.embed_norm(self.embed(patchify(images, self.fine_patch)))  # [B, N_0, d]
        batch, n_fine, d = fine.shape
        terms = self.aggregation.tree_terms(fine.transpose(1, 2).reshape(batch, d, *tree.grids[0]), self.scales)
        return torch.cat([fine.new_zeros(batch, n_fine, d), terms], 1)


def region_of_fine_cells(
    coarse_grid: Tuple[int, int], ratio: int, device=None, fine_grid: Optional[Tuple[int, int]] = None
) -> Tensor:
    """int64 ``[Nf]``: the coarse region C(i) of every fine cell, in fine-grid raster order (-1 for
    border cells, outside every whole region, when ``fine_grid`` has them)."""
    fine_grid = (coarse_grid[0] * ratio, coarse_grid[1] * ratio) if fine_grid is None else fine_grid
    cells = fine_cells_of_regions(coarse_grid, ratio, device, fine_grid[1])
    region = torch.full((fine_grid[0] * fine_grid[1],), -1, dtype=torch.long, device=device)
    region[cells.flatten()] = torch.arange(cells.shape[0], device=device).repeat_interleave(cells.shape[1])
    return region
