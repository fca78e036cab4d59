"""MSViT: a ViT whose tokens are chosen per region at a fine or a coarse scale by a learned gate.

Three execution modes share one set of weights and give the same logits in the forward pass:
``packed`` (default; only the surviving tokens, varlen attention: compute follows the tokens),
``masked`` (the paper's Eq. 10 baseline: all N_f + N_c tokens, masked softmax in every block) and
``trimmed`` (adaptive trimming, Section 2.3: tokens sorted by mask, cut to the batch's longest).
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from msvit.models.checks import (
    MODES,
    check_batch_size,
    check_choice,
    check_counted_mask,
    check_dtype,
    check_image_list,
    check_image_size,
    check_images,
    check_mask_list,
    check_mask_or_budget,
    counted_batch,
    is_image_list,
)
from msvit.models.distilled import check_distilled, distilled_head
from msvit.models.gate import Budget, GateDecision, MixedScaleGate, budget_regions
from msvit.models.layers import dense_blocks, packed_blocks
from msvit.models.list_gates import list_decision
from msvit.models.rope import PackedRope, dense_positions, packed_positions
from msvit.models.tokenizer import MixedScaleTokenizer
from msvit.models.tree_gate import budget_splits, check_tree_mask
from msvit_kernels.dispatch import IMPLEMENTATIONS, normalize_choice, triton_installed
from msvit_kernels.scale_tree import tree_static_shape
from msvit_kernels.tree_batch import TreeBatch
from msvit_kernels.unpack_kernel import unpack_to_grid as unpack_tokens_to_grid
from msvit_kernels.varlen import MixedScaleIndex, StaticShape, count_border_cells, static_shape

Images = Union[Tensor, Sequence[Tensor]]  # a [B, C, H, W] batch, or a list of [C, H_b, W_b] images


class MSViTOutput(NamedTuple):
    """What every MSViT model returns with ``return_gate=True`` (``MSViT``, ``MSSegmenter``,
    ``PrunedMSViT``): one type, so code that reads the gate or the token counts works for all.

    logits: ``[B, num_classes]`` (``MSSegmenter``: ``[B, K, H, W]`` at the image size; for a list
        of images, a list of ``[K, H_b, W_b]``).
    gate: the batch's ``GateDecision`` (soft outputs for the gate losses).
    tokens: int64 tokens per image the transformer processed, prefix included: ``[B]``
        (``masked`` and ``trimmed`` count the padded/dense tokens actually computed);
        ``PrunedMSViT``: ``[len(layers) + 1, B]``, entering the first block and after each pruning.
    """

    logits: Tensor
    gate: GateDecision
    tokens: Tensor


class PackedFeatures(NamedTuple):
    """tokens: ``[T, C]`` final-normed packed tokens; index: their ``MixedScaleIndex``; gate: the
    batch's ``GateDecision``; fine_grid: (h, w) of the fine grid (for unpacking); for a list of
    images, a tuple of every image's (h_b, w_b)."""

    tokens: Tensor
    index: MixedScaleIndex
    gate: GateDecision
    fine_grid: Tuple[int, int]


class GridFeatures(NamedTuple):
    """grid: ``[B, h, w, C]`` features on the fine grid (coarse tokens replicated over their cells),
    or, for a list of images, a list of ``[h_b, w_b, C]``, one per image in list order;
    prefix: ``[B, P, C]`` prefix-token features (cls, registers)."""

    grid: Union[Tensor, List[Tensor]]
    prefix: Tensor


def unpack_to_grid(features: PackedFeatures, *, backend: str = "auto") -> GridFeatures:
    """Packed features -> fine-grid features for dense heads (Appendix E.1); differentiable.

    backend: as in ``msvit_kernels.unpack_kernel.unpack_to_grid``: "auto" (the Triton kernel on CUDA, the
    torch reference elsewhere), "triton" or "reference". Features of a list of images give a list
    of grids ``[h_b, w_b, C]`` (each image's own fine grid), gathered in one call.
    """
    index = features.index
    prefix = features.tokens[index.prefix_rows]
    if isinstance(features.fine_grid[0], tuple):
        # a list's fine_to_row is flat over every image's fine cells, image after image (docs/design.md
        # section 11): one gather as a single [1, sum h_b*w_b] grid, then a view per image
        cells = [h * w for h, w in features.fine_grid]
        flat = unpack_tokens_to_grid(features.tokens, index.fine_to_row[None], (1, sum(cells)), backend=backend)
        grids = [part.view(h, w, -1) for part, (h, w) in zip(flat[0, 0].split(cells), features.fine_grid)]
        return GridFeatures(grids, prefix)
    grid = unpack_tokens_to_grid(features.tokens, index.fine_to_row, features.fine_grid, backend=backend)
    return GridFeatures(grid, prefix)


class MSViT(nn.Module):
    """Mixed-scale ViT over timm blocks. Build it with ``msvit.from_timm``.

    Args:
        tokenizer: the shared-embedding ``MixedScaleTokenizer``.
        gate: the ``MixedScaleGate``.
        blocks: timm ``Block`` modules; norm, fc_norm, head_drop, head, norm_pre: timm's modules.
        global_pool: ``"token"`` (the cls row), ``"avg"`` (mean of each image's patch tokens) or
            ``"map"`` (``attn_pool``, a ``msvit.models.attention_pool.PackedAttentionPool``: SigLIP).
        head_dist: a distilled DeiT's distillation head (``msvit.models.distilled``); the second prefix
            token is then the dist token and the logits are timm's ``VisionTransformerDistilled``'s.
        kernels: ``"auto" | "triton" | "reference"`` (``msvit_kernels.dispatch``): the gate and
            tokenizer implementation. "triton" runs the fused kernels (``msvit_kernels.gate_kernel``,
            ``index_kernel``, ``pack_kernel``; on CPU only under TRITON_INTERPRET=1, else a
            RuntimeError at the first forward), "reference" the pure-torch ones, "auto" Triton on CUDA
            and the reference elsewhere ("torch" is the deprecated name of "reference"). Masked and
            trimmed modes always tokenize with the reference.
        attention_backend: passed to ``msvit_kernels.packed_attention`` in packed mode.
        rope: the rotary position embedding of RoPE models (``msvit.models.rope.PackedRope``), or None.
    """

    def __init__(
        self,
        tokenizer: MixedScaleTokenizer,
        gate: MixedScaleGate,
        blocks: nn.ModuleList,
        norm: nn.Module,
        head: nn.Module,
        *,
        fc_norm: Optional[nn.Module] = None,
        head_drop: Optional[nn.Module] = None,
        norm_pre: Optional[nn.Module] = None,
        global_pool: str = "token",
        pool_include_prefix: bool = False,
        attn_pool: Optional[nn.Module] = None,
        head_dist: Optional[nn.Module] = None,
        in_chans: int = 3,
        kernels: str = "auto",
        attention_backend: str = "auto",
        rope: Optional[PackedRope] = None,
    ):
        super().__init__()
        check_choice("global_pool", global_pool, ("token", "avg", "map"))
        if global_pool == "token" and tokenizer.num_prefix == 0:
            raise ValueError("global_pool='token' needs a class token; this model has no prefix tokens (use 'avg')")
        if (global_pool == "map") != (attn_pool is not None):
            raise ValueError("global_pool='map' goes with an attn_pool module, and attn_pool only with 'map'")
        check_distilled(global_pool, tokenizer.num_prefix, head_dist)
        self.tokenizer = tokenizer
        self.gate = gate
        self.blocks = blocks
        self.norm_pre = norm_pre if norm_pre is not None else nn.Identity()
        self.norm = norm
        self.fc_norm = fc_norm if fc_norm is not None else nn.Identity()
        self.head_drop = head_drop if head_drop is not None else nn.Identity()
        self.head = head
        self.global_pool = global_pool
        self.pool_include_prefix = pool_include_prefix
        self.attn_pool = attn_pool
        self.head_dist = head_dist
        self.distilled_training = False  # timm's switch: training returns (cls, dist) logits when True
        self.in_chans = in_chans
        self.kernels = kernels
        self.attention_backend = attention_backend
        self.rope = rope
        self.native_resolution_refusal: Optional[str] = None  # why this model refuses a list of images, if it does

    @property
    def kernels(self) -> str:
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        value = normalize_choice("kernels", value, IMPLEMENTATIONS, {"torch": "reference"})
        if value == "triton" and not triton_installed():
            raise RuntimeError("kernels='triton' needs triton: pip install triton (or pip install .[triton])")
        self._kernels = value
        self.tokenizer.kernels = value  # both resolve "auto" per call, from the images' device
        self.gate.kernels = value

    @property
    def num_classes(self) -> int:
        """Classifier outputs (0 when the head is not a linear layer, as in a segmenter's backbone)."""
        return getattr(self.head, "out_features", 0)

    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's switch for distilled DeiTs: training forwards return ``(cls_logits, dist_logits)``."""
        self.distilled_training = enable

    def coarse_grid(self, images: Tensor) -> Tuple[int, int]:
        return self.tokenizer.grids(images)[1]

    def fine_grid(self, images: Images):
        """The fine grid (h, w) of a batch, or the tuple of every image's of a list (what
        ``PackedFeatures.fine_grid`` holds)."""
        if is_image_list(images):
            return tuple(self.tokenizer.grids(image)[0] for image in images)
        return self.tokenizer.grids(images)[0]

    def check_images(self, images: Tensor) -> None:
        """What every entry point takes (``msvit.models.checks``): a float ``[B, C, H, W]`` batch in
        the weights' dtype, H and W multiples of the patch size and at least one coarsest region."""
        check_images(images, self.in_chans, self.tokenizer.fine_patch, self.tokenizer.patch_sizes[-1])
        check_dtype(images, self.tokenizer.embed.weight.dtype)

    def decide(self, images: Images, *, mask=None, budget: Budget = None) -> GateDecision:
        """The batch's scale decisions: the caller's mask, or the gate's (sampled when training).
        A list of images: flat decisions ``[sum D_b]`` (docs/native_resolution.md)."""
        check_mask_or_budget(mask, budget)
        if is_image_list(images):
            return self._decide_list(images, mask, budget, self.training)
        self.check_images(images)
        if self.tokenizer.scales > 2:  # the tree of this size (refuses one too small) and the mask's shape
            tree = self.tokenizer.tree(self.tokenizer.grids(images)[0])
            if mask is not None:
                check_tree_mask(mask, images.shape[0], tree)
        return self.gate.decision(images, mask, sample=self.training, budget=budget)

    def batch_of(self, images: Sequence[Tensor]) -> TreeBatch:
        """The layout geometry of a list of images (``tree_batch.TreeBatch``), after checking the
        list; ``batch_of(images).decisions`` are the per-image lengths of flat gate outputs."""
        if self.native_resolution_refusal:
            raise NotImplementedError(self.native_resolution_refusal)
        check_image_list(images, self.in_chans, self.tokenizer.fine_patch, self.tokenizer.patch_sizes[-1])
        check_dtype(images[0], self.tokenizer.embed.weight.dtype)
        return self.tokenizer.batch_of(images)

    def _decide_list(self, images: Sequence[Tensor], mask, budget: Budget, sample: bool) -> GateDecision:
        """``decide`` for a list: every image's decisions, concatenated (flat ``[sum D_b]``); the
        caller's masks (one bool ``[D_b]`` per image) or the gate's, each image with its own budget."""
        batch = self.batch_of(images)
        if mask is not None:
            hard = torch.cat(check_mask_list(mask, self._decision_names(batch))).to(images[0].device)
            return GateDecision(None, None, hard, hard.to(images[0].dtype))
        return list_decision(self.gate, images, batch, self.tokenizer.fine_patch, sample, budget)

    def _decision_names(self, batch: TreeBatch) -> List[Tuple[int, str]]:
        if self.tokenizer.scales > 2:
            return [
                (d, f"splittable node of the {tree.scales}-scale tree (coarsest first)")
                for d, tree in zip(batch.decisions, batch.trees)
            ]
        return [
            (d, f"region of the {t.grids[1][0]}x{t.grids[1][1]} coarse grid (raster order)")
            for d, t in zip(batch.decisions, batch.trees)
        ]

    @torch.no_grad()
    def gate_mask(self, images: Images, *, budget: Budget = None):
        """Hard decisions with eval semantics (threshold, or top-k with ``budget``): bool ``[B, Nc]``
        (a list of images: a list of bool ``[D_b]``, what ``mask=`` takes)."""
        if is_image_list(images):
            decision = self._decide_list(images, None, budget, sample=False)
            return list(decision.hard.split(self.tokenizer.batch_of(images).decisions))
        self.check_images(images)
        return self.gate.decide(images, sample=False, budget=budget).hard

    def static_shape(
        self, batch_size: int, image_size, *, budget: Budget = None, capacity: Optional[int] = None
    ) -> Optional[StaticShape]:
        """The packed shape of a forward known before the gate runs (docs/design.md section 9), or
        None when it depends on the mask. A budget keeps the same number of regions fine in every
        image, so the total is known (capacity defaults to it); ``capacity`` pads the packed rows
        to a fixed count. With either, a packed forward reads nothing back to the host.
        ``image_size``: ``H`` or ``(H, W)``; a size or batch the forward refuses is refused alike."""
        tokenizer = self.tokenizer
        batch_size = check_batch_size(batch_size)
        h, w = check_image_size(image_size, tokenizer.fine_patch, tokenizer.patch_sizes[-1])
        fine_grid = (h // tokenizer.fine_patch, w // tokenizer.fine_patch)
        if tokenizer.scales > 2:  # a budget splits the same number of nodes in every image
            tree = tokenizer.tree(fine_grid)
            splits = None if budget is None else budget_splits(budget, tree)
            if capacity is None and splits is None:
                return None
            return tree_static_shape(batch_size, tree, tokenizer.num_prefix, capacity, splits)
        n_regions = (fine_grid[0] // tokenizer.ratio) * (fine_grid[1] // tokenizer.ratio)
        fine_regions = None if budget is None else budget_regions(budget, n_regions)
        if capacity is None and fine_regions is None:
            return None
        n_border = count_border_cells(fine_grid, tokenizer.ratio)
        return static_shape(
            batch_size, n_regions, tokenizer.ratio, tokenizer.num_prefix, capacity, fine_regions, n_border
        )

    def tokens_per_image(self, mask, *, images: Optional[Images] = None) -> Tensor:
        """int64 ``[B]`` tokens each image gets in packed mode, prefix included. ``mask``: bool
        ``[B, Nc]`` over the coarse grid of ``images`` when given, else of the size the model was
        built for (``gate.grid``); pass the images for masks of another size. A list of images:
        ``mask`` is a list of bool ``[D_b]``, one per image (as ``mask=``)."""
        if is_image_list(images):
            batch = self.batch_of(images)
            hard = torch.cat(check_mask_list(mask, self._decision_names(batch)))
            layout = batch.layout(hard.device)
            counts = torch.zeros(batch.batch, dtype=torch.long, device=hard.device)
            return self.tokenizer.num_prefix + counts.index_add_(0, layout.image, batch.token_weights(hard).long())
        if images is not None:
            self.check_images(images)
        if self.tokenizer.scales > 2:  # a [B, D] split mask: count its tokens on the tree
            fine_grid = self.tokenizer.grid if images is None else self.tokenizer.grids(images)[0]
            tree = self.tokenizer.tree(fine_grid)
            check_tree_mask(mask, counted_batch(mask, images), tree)
            return self.tokenizer.num_prefix + torch.cat(tree.token_weights(mask), 1).sum(1)
        check_counted_mask(mask, self.gate.grid if images is None else self.coarse_grid(images), images)
        ratio = self.tokenizer.ratio
        fine_grid = self.tokenizer.grid if images is None else self.tokenizer.grids(images)[0]
        fixed = self.tokenizer.num_prefix + count_border_cells(fine_grid, ratio)  # border cells: always fine
        return fixed + mask.shape[1] + (ratio**2 - 1) * mask.sum(1)

    def forward(
        self,
        images: Tensor,
        *,
        mask: Optional[Tensor] = None,
        mode: str = "packed",
        budget: Budget = None,
        capacity: Optional[int] = None,
        return_gate: bool = False,
    ):
        """Classify ``images [B, C, H, W]``; returns logits ``[B, num_classes]``.

        mask: optional bool ``[B, Nc]`` (True = fine) overriding the gate; budget: eval-time number
        (int) or fraction (float) of regions kept fine per image (packed mode then reads nothing
        back to the host); not both (a mask fixes every decision; the pair is refused); capacity:
        packed mode only, pad the packed rows to this many (a static shape: no host read; a batch
        with more tokens fails on the device); return_gate: return an ``MSViTOutput`` with the
        gate's decisions and the token counts.
        """
        check_choice("mode", mode, MODES)
        if capacity is not None and mode != "packed":
            raise ValueError(f"capacity pads the packed rows and applies to mode='packed' only, got mode={mode!r}")
        decision = self.decide(images, mask=mask, budget=budget)
        if mode == "packed" and not is_image_list(images) and images.shape[0] == 0:
            mode = "masked"  # the modes agree; an empty batch has no packed layout, the dense path gives [0, K]
        if mode == "packed":
            shape = self._shape_of(images, budget, capacity)
            features = self._packed_features(images, decision, shape)
            logits = self.forward_head(features)
            index = features.index
            tokens = (index.cu_seqlens[1 : index.batch + 1] - index.cu_seqlens[: index.batch]).long()
        elif is_image_list(images):  # the dense baselines: one image at a time
            logits, tokens = self._dense_list(images, decision, mode)
        else:
            logits, tokens = self._dense(images, decision, mode)
        return MSViTOutput(logits, decision, tokens) if return_gate else logits

    def _dense(self, images: Tensor, decision: GateDecision, mode: str) -> Tuple[Tensor, Tensor]:
        """Logits and token counts of the masked or trimmed mode."""
        x, weights = self.tokenizer.dense(images, decision.st)
        positions = self._dense_positions(images)
        if mode == "trimmed":
            order = trim_order(weights, self.tokenizer.num_prefix)
            x, weights = take_tokens(x, order), torch.gather(weights, 1, order)
            positions = positions[order] if positions is not None else None
        x = dense_blocks(self.blocks, self.norm_pre(x), weights, self._rotary(images, positions))
        logits = self._head(self._pool_dense(x, weights))
        return logits, torch.full((images.shape[0],), x.shape[1], device=images.device)

    def _dense_list(self, images: Sequence[Tensor], decision: GateDecision, mode: str) -> Tuple[Tensor, Tensor]:
        """The masked / trimmed modes of a list: each image's dense forward with its own decisions
        (the dense layout has one size; these modes are the baselines, not the fast path)."""
        counts = self.tokenizer.batch_of(images).decisions
        hard, st = decision.hard.split(counts), decision.st.split(counts)
        outs = [
            self._dense(image[None], GateDecision(None, None, h[None], s[None]), mode)
            for image, h, s in zip(images, hard, st)
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _shape_of(self, images: Images, budget: Budget, capacity: Optional[int]) -> Optional[StaticShape]:
        """``static_shape`` of a batch or of a list of images (each with its own budget share)."""
        if not is_image_list(images):
            return self.static_shape(images.shape[0], images.shape[-2:], budget=budget, capacity=capacity)
        batch = self.tokenizer.batch_of(images)
        splits = None if budget is None else [budget_splits(budget, tree) for tree in batch.trees]
        if capacity is None and splits is None:
            return None
        return batch.static_shape(self.tokenizer.num_prefix, capacity, splits)

    def forward_features(
        self, images: Tensor, *, mask: Optional[Tensor] = None, budget: Budget = None, capacity: Optional[int] = None
    ) -> PackedFeatures:
        """The packed, final-normed token features of a batch with their varlen metadata (packed
        mode); ``forward_head`` of them gives the logits ``forward`` returns. ``capacity``: as in
        ``forward`` (the features then hold padding rows after the real ones)."""
        decision = self.decide(images, mask=mask, budget=budget)
        return self._packed_features(images, decision, self._shape_of(images, budget, capacity))

    def forward_head(self, features: PackedFeatures, pre_logits: bool = False) -> Tensor:
        """Pool the features of ``forward_features`` per image (``global_pool``), then fc_norm,
        head dropout and, unless ``pre_logits``, the classifier: ``[B, num_classes]`` (or ``[B, C]``).

        ``features.index`` needs the fields ``prefix_rows``, ``rows``, ``row_image``,
        ``cu_seqlens`` and ``total`` (a ``MixedScaleIndex``, or any index with them, such as a
        pruned batch's).
        """
        if not isinstance(features, PackedFeatures):
            raise TypeError(f"forward_head takes the PackedFeatures of forward_features, got {type(features).__name__}")
        return self._head(self._pool_packed(features.tokens, features.index), pre_logits)

    def _packed_features(
        self, images: Tensor, decision: GateDecision, shape: Optional[StaticShape] = None
    ) -> PackedFeatures:
        x, index = self.tokenizer.pack(images, decision.hard, decision.st, shape)
        rotary = self._rotary(images, packed_positions(index) if self.rope is not None else None)
        x = packed_blocks(self.blocks, self.norm_pre(x), index, self.attention_backend, rotary)
        return PackedFeatures(self.norm(x), index, decision, self.fine_grid(images))

    def _dense_positions(self, images: Tensor) -> Optional[Tensor]:
        if self.rope is None:
            return None
        (h, w), (hc, wc) = self.tokenizer.grids(images)
        if self.tokenizer.scales > 2:  # every node of every scale, as the dense layout
            nodes = self.tokenizer.tree((h, w)).offsets[-1]
            return dense_positions(self.tokenizer.num_prefix, h * w, nodes - h * w, images.device)
        return dense_positions(self.tokenizer.num_prefix, h * w, hc * wc, images.device)

    def _rotary(self, images: Tensor, positions: Optional[Tensor]):
        """RoPE models: ``rotary(block_index, t)`` for tokens at ``positions`` (see msvit.models.rope)."""
        if self.rope is not None and is_image_list(images):  # every image at its own grid
            grids = [self.tokenizer.grids(image)[0] for image in images]
            return self.rope.rotary_of(self.rope.batch_table(self.tokenizer.batch_of(images), grids), positions)
        return None if self.rope is None else self.rope.rotary(self.tokenizer.grids(images)[0], positions)

    def _head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.fc_norm(pooled))
        if self.head_dist is not None:
            return distilled_head(self, x, pre_logits)
        return x if pre_logits else self.head(x)

    def _pool_packed(self, x: Tensor, index) -> Tensor:
        """Per-image pooling of final-normed packed tokens ``x [T, C]``."""
        if self.attn_pool is not None:
            return self.attn_pool(x, index, self.pool_include_prefix, self.attention_backend)
        if self.global_pool == "token":  # a distilled model pools [B, 2, C]: the cls and the dist rows
            return x[index.prefix_rows[:, 0 if self.head_dist is None else slice(0, 2)]]
        batch, cu = index.batch, index.cu_seqlens
        counts = cu[1 : batch + 1] - cu[:batch]  # from the layout: bincount would read its size on the host
        row_image = index.row_image
        if not self.pool_include_prefix:
            x, row_image, counts = x[index.rows], row_image[index.rows], counts - index.prefix_rows.shape[1]
        # padding rows belong to image B: summed into an extra row that is dropped
        sums = x.new_zeros(batch + 1, x.shape[-1]).index_add_(0, row_image, x)[:batch]
        return sums / counts.clamp_min(1)[:, None].to(x.dtype)

    def _pool_dense(self, x: Tensor, weights: Tensor) -> Tensor:
        if self.global_pool == "token":
            return self.norm(x[:, 0 if self.head_dist is None else slice(0, 2)])
        x = self.norm(x)
        if not self.pool_include_prefix:
            start = self.tokenizer.num_prefix
            x, weights = x[:, start:], weights[:, start:]
        if self.attn_pool is not None:
            return self.attn_pool.dense(x, weights)
        return (x * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-6)


def trim_order(weights: Tensor, num_prefix: int) -> Tensor:
    """Adaptive trimming (Section 2.3): per image, sort patch tokens by mask value (active first,
    stable) and keep as many as the batch's longest image has active; prefix tokens stay first.

    weights ``[B, N]`` -> int64 ``[B, P + k]``: the kept tokens' indices, in order (``take_tokens``
    applies them to tokens, ``gather`` to weights and RoPE positions). One host read (k).
    """
    patch_weights = weights[:, num_prefix:]
    active = patch_weights.detach() > 0.5
    keep = int(active.sum(1).max()) if active.shape[0] else 0  # an empty batch keeps no patch token
    order = torch.argsort(active.to(torch.uint8), dim=1, descending=True, stable=True)[:, :keep] + num_prefix
    prefix = torch.arange(num_prefix, device=weights.device).expand(weights.shape[0], -1)
    return torch.cat([prefix, order], 1)


def take_tokens(tokens: Tensor, order: Tensor) -> Tensor:
    """``tokens[b, order[b]]``: ``[B, N, C]`` -> ``[B, K, C]``."""
    return torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]))
