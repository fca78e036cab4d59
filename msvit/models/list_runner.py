"""Captured or compiled packed inference for lists of images of different sizes (docs/design.md
section 19): ``msvit.compile_packed(model, max_images, max_pixels=N)``.

A list's eager forward has shapes that follow its size mix (the node tables, the decisions, the
pixel buffer), so a graph would be rebuilt for every mix. Here a maximum image count, a maximum
pixel count (sum of ``H_b * W_b``) and a token capacity (the bucket) fix every shape:

- **Host metadata, before the graph.** A mix's layout tables (``padded_batch.padded_layout``),
  its position rows (each image's table at its grid, as the eager list forward resamples them),
  its gate position rows and, with a budget, each image's count of fine regions are built on the
  host or from the weights once per mix (cached), padded to the fixed sizes and copied into
  static input buffers (vLLM's way): a copy into the graph's inputs, not a read back.
- **Inside the graph**: the gate over the flat pixel buffer, the budget's ranking, the padded
  index, the pack, the blocks and the head: no host read, no shape that depends on the mix.
  Padding images are sequences of their prefix rows only; padding rows and nodes are never
  attended to by a real row (``varlen.StaticShape``).
- **Buckets** as for a batch: with a budget every image's length is host-known, so the bucket is
  chosen on the host (no read at all); without one the gate's graph runs first and its token
  count is the one host read. A list past the largest bucket runs eagerly (``fallbacks``).

Scope: the learned two-scale gate (threshold or budget), ``budget=1.0`` (all fine), RoPE models
(their table padded like the position table). Other gates and more than two scales are refused
by name.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from msvit.models.gate import Budget, MixedScaleGate, budget_regions, list_budget_regions, ranked_mask
from msvit.models.layers import packed_blocks
from msvit.models.mixed_scale_vit import MSViT, PackedFeatures
from msvit.models.packed_runner import DEFAULT_FINE_FRACTIONS, PackedRunner, check_bucket_count
from msvit.models.rope import packed_positions
from msvit.models.table_cache import TableCache
from msvit.models.tokenizer import PositionTables
from msvit_kernels.padded_batch import (
    ListCapacity,
    PaddedLayout,
    padded_batch_index,
    padded_layout,
    padded_node_rows,
    padded_tokens,
)
from msvit_kernels.tree_batch import TreeBatch
from msvit_kernels.varlen import StaticShape, lengths_within


class ListInputs(NamedTuple):
    """The static inputs of a list's graph (fixed shapes for every mix).

    pixels: ``[C * max_pixels]`` the images flattened in turn, zero after them; layout: the
    mix's ``PaddedLayout``; positions: ``[n_nodes, d]`` the position row of every padded node (or
    None: no position embedding); prefix_positions: ``[P_pos, d]`` or None; gate_positions:
    ``[decisions, hidden]`` the gate's position row of every region; keep: int64 ``[images + 1]``
    fine regions each image keeps with a budget (0 for padding images and the padding row);
    rope: RoPE models' table (``PackedRope.batch_table``) in the padded numbering, or None.
    """

    pixels: Tensor
    layout: PaddedLayout
    positions: Optional[Tensor]
    prefix_positions: Optional[Tensor]
    gate_positions: Tensor
    keep: Tensor
    rope: Optional[Tensor]


def _clone(table: Optional[Tensor]) -> Optional[Tensor]:
    return None if table is None else table.clone()


def list_refusal(model: MSViT) -> str:
    """Why ``compile_packed`` cannot serve lists for this model ('' when it can)."""
    if model.native_resolution_refusal:
        return model.native_resolution_refusal
    if type(model.gate) is not MixedScaleGate:
        return (
            f"compile_packed serves lists with the learned two-scale gate (MixedScaleGate) only, not "
            f"{type(model.gate).__name__}; run model(images) eagerly, or compile a [B, C, H, W] batch"
        )
    if model.tokenizer.scales != 2:
        return f"compile_packed serves lists with two scales only, not {model.tokenizer.scales}; run model(images)"
    if model.tokenizer.aggregation is not None:
        return "compile_packed does not serve lists with aggregate='zero_conv'; run model(images) eagerly"
    if model.tokenizer.coarse_pixels != "area":  # the padded pixel buffer is read by area-average taps
        return "compile_packed does not serve lists with coarse_pixels='apt'; run model(images) eagerly"
    if model.tokenizer.grid_positions is not None:  # timm's per-grid position rule: not in the padded tables yet
        return "compile_packed does not serve lists for a converted NaFlexViT yet; run model(images) eagerly"
    return ""


def list_capacity(model: MSViT, max_images: int, max_pixels: int) -> ListCapacity:
    tokenizer = model.tokenizer
    return ListCapacity(max_images, max_pixels // tokenizer.fine_patch**2, tokenizer.ratio, tokenizer.scales)


def default_list_buckets(model: MSViT, capacity: ListCapacity) -> List[int]:
    """Capacities for lists with up to 25, 50, 75 and 100% of the most finest patches the pixel
    capacity holds, on top of every image's prefix: the last holds every list that fits."""
    base = capacity.images * model.tokenizer.num_prefix
    return sorted({base + math.ceil(f * capacity.fine_nodes) for f in DEFAULT_FINE_FRACTIONS})


def smallest_bucket(model: MSViT, capacity: ListCapacity) -> int:
    """Rows a bucket needs at least: every image's prefix and the warm-up list (one image of one
    coarsest patch, all coarse: one token), which capture runs before any real list."""
    return capacity.images * model.tokenizer.num_prefix + 1


class ListRunner(PackedRunner):
    """``runner(images) -> logits``: the logits of ``model(images, budget=budget)`` for a list of
    ``[C, H_b, W_b]`` images of any sizes that fit, from one captured or compiled graph per
    bucket. Build it with ``msvit.compile_packed(model, max_images, max_pixels=...)``.

    Attributes: ``buckets``, ``batch_size`` (the most images), ``max_pixels``, ``capacity`` (the
    ``ListCapacity``), ``budget``, ``mode``, ``replays``, ``fallbacks``.
    """

    _notice_frames = 6  # compile_packed calls list_runner, which builds it

    def __init__(
        self,
        model: MSViT,
        max_images: int,
        max_pixels: int,
        budget: Budget,
        buckets: List[int],
        mode: str,
        compile_options: dict,
    ):
        self.model, self.batch_size, self.max_pixels, self.image_size = model, max_images, max_pixels, None
        self.budget, self.buckets, self.mode = budget, buckets, mode
        self.capacity = list_capacity(model, max_images, max_pixels)
        self.replays: Dict[int, int] = {capacity: 0 for capacity in buckets}
        self.fallbacks = 0
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._shapes = {c: self._static_shape(c) for c in buckets}
        self._tables = TableCache()
        size = model.tokenizer.patch_sizes[-1]  # warm-up and capture run on a real list: one smallest image
        warm = [torch.zeros(model.in_chans, size, size, device=self.device, dtype=self.dtype)]
        with torch.inference_mode():  # the warm-up keeps no region fine (no budget): every bucket holds it
            pixels = torch.zeros(model.in_chans * max_pixels, device=self.device, dtype=self.dtype)
            self._images = ListInputs(pixels, *self._mix_tables(warm, model.tokenizer.batch_of(warm), None))
        self._build(compile_options)

    def __call__(self, images: Sequence[Tensor], *, mask: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Logits ``[len(images), classes]``; ``mask``: the caller's decisions, one bool ``[D_b]`` per
        image as ``model(images, mask=...)`` takes them (a runner without a budget only)."""
        batch = self._check_list(images)
        if mask is not None and self.budget is not None:
            raise ValueError(
                "this runner was built with a budget: its graphs run the gate. Pass mask= to a runner built "
                "without one (msvit.compile_packed(model, max_images, max_pixels=..., budget=None))"
            )
        with torch.inference_mode():
            inputs = self._inputs(images, batch)
            if self.mode == "cuda_graphs":  # the graphs read their static buffers
                for static, new in zip(tree_leaves(self._images), tree_leaves(inputs)):
                    if static is not None:  # None: a table this model has not (no positions, no RoPE)
                        static.copy_(new)
                inputs = self._images
            if self.budget is not None:
                mask, tokens = None, self._budget_rows(batch)  # host-known: no read at all
            else:
                mask, total = self._decide(inputs) if mask is None else self._given(images, mask, inputs)
                tokens = int(total)  # the forward's one host read: which bucket holds this list
            capacity = next((c for c in self.buckets if c >= tokens), None)
            if capacity is None:
                self.fallbacks += 1
                if mask is None:
                    return self.model(list(images), budget=self.budget)
                return self.model(list(images), mask=list(mask[: sum(batch.decisions)].split(batch.decisions)))
            self.replays[capacity] += 1
            logits = self._forwards[capacity](inputs, mask)
            return logits[: batch.batch].clone()  # a replay overwrites its output buffer

    # -------------------------------------------------------------------------------- the stages

    def _static_shape(self, capacity: int) -> StaticShape:
        """A bucket's shape: ``max_images`` sequences of at least their prefix; an image has at most
        every finest patch the pixels hold, and at most what the bucket leaves after the others'
        prefixes (a tighter bound: fewer padded attention slots on ``padded_sdpa``)."""
        prefix, images = self.model.tokenizer.num_prefix, self.batch_size
        longest = min(prefix + self.capacity.fine_nodes, capacity - (images - 1) * prefix)
        return lengths_within([prefix] * images, [longest] * images, capacity, exact=False)

    def _gate(self, inputs: ListInputs) -> Tensor:
        """The gate's hard decisions ``[decisions]`` over the padded list (threshold, or the budget)."""
        capacity, gate = self.capacity, self.model.gate
        start = capacity.starts[1]
        regions = inputs.layout.node_pixels[:, start : start + capacity.decisions]
        logits = gate.flat_logits(inputs.pixels, regions, inputs.gate_positions, self.model.in_chans)
        if self.budget is None:
            return logits > 0
        layout, rows = inputs.layout, (capacity.images + 1, len(logits))  # padding regions: a row of their own
        return ranked_mask(logits, layout.region_image, layout.region_local, inputs.keep, rows)

    def _decide_fn(self, inputs: ListInputs):
        """The gate's decisions and the list's packed rows (0-dim), padding images' prefixes included."""
        mask = self._gate(inputs)
        return mask, self._rows(mask, inputs)

    def _given(self, images: Sequence[Tensor], mask, inputs: ListInputs):
        """``_decide_fn`` for the caller's masks (checked by the model, naming the entry), padded."""
        hard = self.model.decide(list(images), mask=mask).hard
        padded = torch.cat([hard, hard.new_zeros(self.capacity.decisions - hard.numel())])
        if self._mask is not None:  # CUDA graphs: every bucket reads the gate graph's mask buffer
            padded = self._mask.copy_(padded)
        return padded, self._rows(padded, inputs)

    def _rows(self, mask: Tensor, inputs: ListInputs) -> Tensor:
        rows = padded_tokens(mask, inputs.layout, self.capacity).sum()
        return rows + self.capacity.images * self.model.tokenizer.num_prefix

    def _forward_fn(self, capacity: int):
        shape = self._shapes[capacity]
        if self.budget is not None:  # the gate runs inside the bucket's graph
            return lambda inputs, mask: self._static_forward(inputs, self._gate(inputs), shape)
        return lambda inputs, mask: self._static_forward(inputs, mask, shape)

    def _static_forward(self, inputs: ListInputs, mask: Tensor, shape: StaticShape) -> Tensor:
        """Logits ``[max_images, classes]`` of the padded list (rows past the list are padding)."""
        model, tokenizer = self.model, self.model.tokenizer
        index = padded_batch_index(mask, inputs.layout, self.capacity, tokenizer.num_prefix, shape)
        positions = PositionTables(inputs.prefix_positions, inputs.positions)
        x = tokenizer.pack_padded(inputs.pixels, index, positions, inputs.layout.node_pixels)
        rotary = None if inputs.rope is None else model.rope.rotary_of(inputs.rope, packed_positions(index))
        x = packed_blocks(model.blocks, model.norm_pre(x), index, model.attention_backend, rotary)
        return model.forward_head(PackedFeatures(model.norm(x), index, None, None))

    # ------------------------------------------------------------------------- host metadata

    def _inputs(self, images: Sequence[Tensor], batch: TreeBatch) -> ListInputs:
        """The static inputs of a list: its pixels, and its tables (cached per size mix)."""
        model = self.model
        pixels = torch.cat([image.reshape(-1) for image in images])
        pixels = torch.cat([pixels, pixels.new_zeros(model.in_chans * self.max_pixels - pixels.numel())])
        params = [model.tokenizer.pos_embed, model.gate.pos_embed]
        for module in (model.tokenizer.grid_positions, model.rope):  # tables from these too, when there
            if module is not None:
                params += [*module.parameters(), *module.buffers()]
        tables = self._tables.get(batch, params, lambda: self._mix_tables(images, batch, self.budget))
        return ListInputs(pixels, *tables)

    def _mix_tables(self, images: Sequence[Tensor], batch: TreeBatch, budget: Budget):
        """Everything of ``ListInputs`` but the pixels, for one size mix, padded to the capacity
        (``keep``: each image's fine regions under ``budget``, none without one)."""
        model, capacity = self.model, self.capacity
        tokenizer, gate = model.tokenizer, model.gate
        layout = padded_layout(batch, capacity, tokenizer.fine_patch, model.in_chans, self.device)
        tables = tokenizer.batch_position_tables(images, batch)
        positions = None if tables.patches is None else padded_node_rows(tables.patches, batch, capacity)
        rope = None
        if model.rope is not None:  # the identity row (prefix tokens), then every padded node's rows
            table = model.rope.batch_table(batch, [tokenizer.grids(image)[0] for image in images])
            nodes = padded_node_rows(table.narrow(-2, 1, table.shape[-2] - 1), batch, capacity, dim=-2)
            rope = torch.cat([table.narrow(-2, 0, 1), nodes], -2)
        gate_rows = gate.list_positions([tree.grids[1] for tree in batch.trees])
        spare = gate_rows.new_zeros(capacity.decisions - len(gate_rows), gate_rows.shape[1])
        gate_positions = torch.cat([gate_rows, spare])
        keep = [0] * (capacity.images + 1)
        if budget is not None:
            keep[: batch.batch] = list_budget_regions(budget, batch.nodes_at(1))
        keep = torch.tensor(keep, device=self.device)
        # copies of their own, made here (under inference_mode): a table can be a parameter's view (the
        # position table at the model's own grid) or a layout cached outside inference_mode, and
        # torch.compile guards on what its inputs are, so every mix must give the same kinds of tensors
        return tree_map(_clone, (layout, positions, tables.prefix, gate_positions, keep, rope))

    def _budget_rows(self, batch: TreeBatch) -> int:
        """Packed rows of a list with the budget: every image's exact length, padding images' prefixes."""
        prefix = self.model.tokenizer.num_prefix
        keep = list_budget_regions(self.budget, batch.nodes_at(1))
        return sum(prefix + tree.tokens(k) for tree, k in zip(batch.trees, keep)) + prefix * (
            self.capacity.images - batch.batch
        )

    def _check_list(self, images) -> TreeBatch:
        if not isinstance(images, (list, tuple)):
            raise TypeError(
                f"this runner takes a list of [C, H, W] images (it was built with max_pixels), got "
                f"{type(images).__name__}; for batches build one with "
                "msvit.compile_packed(model, batch_size, image_size)"
            )
        batch = self.model.batch_of(images)  # checks the list, naming the image
        if images[0].device != self.device or images[0].dtype != self.dtype:
            raise TypeError(
                f"images are {images[0].dtype} on {images[0].device}; this runner takes {self.dtype} on {self.device}"
            )
        used = 0
        for b, image in enumerate(images):
            if b >= self.batch_size:
                raise ValueError(
                    f"images[{b}]: this runner takes at most {self.batch_size} images per call (max_images), "
                    f"got {len(images)}; split the list or build a runner with more"
                )
            used += image.shape[-2] * image.shape[-1]
            if used > self.max_pixels:
                raise ValueError(
                    f"images[{b}] ({image.shape[-2]}x{image.shape[-1]}) takes the list to {used} pixels, past "
                    f"max_pixels={self.max_pixels}; split the list or build a runner with more"
                )
        return batch


def list_runner(
    model: MSViT,
    max_images: int,
    image_size,
    max_pixels,
    budget: Budget,
    buckets: Optional[Sequence[int]],
    mode: str,
    compile_options: dict,
) -> ListRunner:
    """``compile_packed``'s list case: checks its arguments and builds the ``ListRunner``."""
    if image_size is not None:
        raise ValueError(
            "pass image_size (a runner for [B, C, H, W] batches of one size) or max_pixels (a runner for lists "
            "of images of different sizes), not both"
        )
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(
            f"max_pixels must be a positive int, the most pixels (sum of H * W) of a list, got {max_pixels!r}; "
            "or pass image_size for [B, C, H, W] batches"
        )
    refusal = list_refusal(model)
    if refusal:
        raise NotImplementedError(refusal)
    smallest = model.tokenizer.patch_sizes[-1] ** 2
    if max_pixels < smallest:
        raise ValueError(f"max_pixels={max_pixels} holds no image: the smallest takes {smallest} pixels")
    capacity = list_capacity(model, max_images, max_pixels)
    if budget is not None:  # a count or a fraction, and a count some image that fits could keep
        budget_regions(budget, capacity.decisions)
    requested = default_list_buckets(model, capacity) if buckets is None else list(buckets)
    low, high = smallest_bucket(model, capacity), max(default_list_buckets(model, capacity))
    for c in requested:
        if isinstance(c, bool) or not isinstance(c, int) or not low <= c <= high:
            raise ValueError(
                f"buckets must be ints between {low} (every image's prefix and one smallest image) and {high} "
                f"(every finest patch max_pixels holds) packed rows, got {c!r}"
            )
    capacities = sorted(set(requested))
    check_bucket_count(capacities, mode)
    return ListRunner(model, max_images, max_pixels, budget, capacities, mode, compile_options)
