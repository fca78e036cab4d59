"""The layout of a list of images of different sizes (native resolution, docs/design.md section 11):
one ``ScaleTree`` per image laid out as one global node table (``TreeBatch``), its mask-independent
maps (``BatchLayout``, built on the host once per size mix) and the packed index of a flat decision
mask (``batch_index``, the list counterpart of ``scale_tree.tree_index``)."""

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .scale_tree import ScaleTree, _cumsum, _index, _sized, tracing
from .varlen import MixedScaleIndex, StaticShape, lengths_within


@dataclass(frozen=True)
class TreeBatch:
    """The trees of a list of images of different sizes, laid out as one node table.

    Global node table: scale by scale, finest first, and in each scale image by image (raster
    order inside an image): the node ``i`` of scale ``s`` of image ``b`` is entry
    ``scale_starts[s] + image_starts[s][b] + i``. The candidate-pixel table, the position table and
    RoPE's table of a mixed-size batch follow this order, so a token's ``source`` and ``position``
    are both its global node. Decisions (the gate's outputs, the hard mask): one flat ``[sum D_b]``
    tensor, image by image, each image's ``D_b`` entries in ``ScaleTree``'s order (coarsest first).
    A batch of equal sizes is the special case where every tree is the same.
    """

    trees: Tuple[ScaleTree, ...]

    @classmethod
    def of(cls, fine_grids, ratio: int, scales: int) -> "TreeBatch":
        trees = []
        for b, grid in enumerate(fine_grids):
            try:
                trees.append(ScaleTree.of(grid, ratio, scales))
            except ValueError as error:
                raise ValueError(f"images[{b}]: {error}") from None
        return cls(tuple(trees))

    @property
    def batch(self) -> int:
        return len(self.trees)

    @property
    def scales(self) -> int:
        return self.trees[0].scales

    def nodes_at(self, s: int) -> Tuple[int, ...]:
        """Nodes of scale ``s`` of every image."""
        return tuple(tree.counts[s] for tree in self.trees)

    @property
    def scale_starts(self) -> Tuple[int, ...]:
        """First global node of each scale (finest first), then the table's size."""
        return tuple([0] + list(_cumsum(sum(self.nodes_at(s)) for s in range(self.scales))))

    @property
    def decisions(self) -> Tuple[int, ...]:
        """``D_b`` of every image: its entries in the flat decision tensor."""
        return tuple(tree.decisions for tree in self.trees)

    @property
    def coarsest_regions(self) -> Tuple[int, ...]:
        return self.nodes_at(self.scales - 1)

    def node_table(self, tables, dim: int = -2) -> Tensor:
        """The global node table from per-image ones (each ``ScaleTree``'s node order along ``dim``):
        one concatenation of views, no copy per image."""
        parts = []
        for s in range(self.scales):
            for tree, table in zip(self.trees, tables):
                parts.append(table.narrow(dim, tree.offsets[s], tree.counts[s]))
        return torch.cat(parts, dim)

    def layout(self, device=None) -> "BatchLayout":
        """The mask-independent maps of the batch (``BatchLayout``), built once per size mix and
        device: on the host from the sizes (host metadata), then one copy to ``device``."""
        return _batch_layout(self, torch.device(device) if device is not None else torch.device("cpu"))

    def node_pixels(self, fine_patch: int, chans: int, device=None) -> Tensor:
        """int64 ``[4, n_nodes]``: every global node's pixel origin in the list's flat pixel buffer
        (each ``[C, H_b, W_b]`` image flattened in turn), row stride (``W_b``), channel stride
        (``H_b W_b``) and averaging factor ``r**s``: the pack kernel's geometry of a list. Built on
        the host from the sizes once per size mix and device (cached), then one copy."""
        key = (self, int(fine_patch), int(chans), torch.device(device) if device is not None else torch.device("cpu"))
        cached = _LAYOUTS.get(key)
        if cached is None:
            cached = _node_pixels(self, int(fine_patch), int(chans)).to(key[-1], non_blocking=True)
            _remember(key, cached)
        return cached

    def nodes_of_images(self, s: int, device=None) -> Tuple[Tensor, Tensor]:
        """int64 ``[sum N_s]`` each: the image of every scale-``s`` node (global order) and its
        index inside its image (cached per size mix, as ``layout``)."""
        key = (self, "nodes", s, torch.device(device) if device is not None else torch.device("cpu"))
        cached = _LAYOUTS.get(key)
        if cached is None:
            counts = torch.tensor(self.nodes_at(s))
            image = torch.repeat_interleave(torch.arange(self.batch), counts, output_size=sum(self.nodes_at(s)))
            local = torch.cat([torch.arange(n) for n in self.nodes_at(s)])
            cached = (image.to(key[-1], non_blocking=True), local.to(key[-1], non_blocking=True))
            _remember(key, cached)
        return cached

    def decision_nodes(self, device=None) -> Tensor:
        """int64 ``[sum D_b]``: the global node of every entry of the flat decision tensor (the
        inverse of ``BatchLayout.decision`` over the nodes of scales >= 1), so that a gate computed
        in global node order (scale by scale) gives the flat decisions with one gather, ``out[nodes
        - scale_starts[1]]``. Cached per size mix, as ``layout``."""
        key = (self, "decision_nodes", torch.device(device) if device is not None else torch.device("cpu"))
        cached = _LAYOUTS.get(key)
        if cached is None:
            starts = self.scale_starts
            nodes = torch.arange(starts[1], starts[-1])
            cached = torch.empty_like(nodes)
            cached[self.layout().decision[starts[1] :]] = nodes
            cached = cached.to(key[-1], non_blocking=True)
            _remember(key, cached)
        return cached

    def token_weights(self, decisions: Tensor) -> Tensor:
        """``ScaleTree.token_weights`` of every image at once, in global node order: ``[n_nodes]``
        (bool for a bool flat mask ``[sum D_b]``, float for straight-through values)."""
        layout = self.layout(decisions.device)
        return node_token_weights(decisions, layout.parent, layout.decision, self.scale_starts)

    def static_shape(self, num_prefix: int, capacity: Optional[int] = None, splits=None) -> StaticShape:
        """``tree_static_shape`` of the batch: image ``b`` has ``P + roots_b`` to ``P + N0_b`` rows,
        exactly ``P + tokens(splits[b])`` with per-image ``splits`` (a budget)."""
        if splits is None:
            shortest = [num_prefix + tree.roots for tree in self.trees]
            longest = [num_prefix + tree.counts[0] for tree in self.trees]
        else:
            shortest = longest = [num_prefix + tree.tokens(k) for tree, k in zip(self.trees, splits)]
        if capacity is not None and not isinstance(capacity, bool) and isinstance(capacity, int):
            at, fits = 0, None
            for b, n in enumerate(shortest):
                at += n
                if at > capacity and fits is None:
                    fits = b
            if fits is not None:
                raise ValueError(
                    f"capacity {capacity} is too small for this list of images: image {fits} takes the packed rows "
                    f"past it ({at - shortest[fits]} before it, at least {shortest[fits]} of its own); the list "
                    f"needs at least {sum(shortest)} rows"
                )
        return lengths_within(shortest, longest, capacity, exact=splits is not None)


class BatchLayout(NamedTuple):
    """Device maps of a ``TreeBatch`` (global node order unless said otherwise).

    order: int64 ``[n]`` global nodes in packed order (image by image, each in its tree's packed
    order); entry_image: int64 ``[n]`` the image of each packed-order entry; image, scale: int64
    ``[n]`` of each node; region: int64 ``[n]`` flat coarsest region of the node's root
    (``sum_{c<b} N_{S-1,c} + j``) or ``-1 - b`` when the root is not a coarsest node; parent:
    int64 ``[n]`` the parent's index inside the next scale's slice, or -1; decision: int64 ``[n]``
    the node's entry in the flat decision tensor (scale 0: 0, never read); ancestors: int64
    ``[S, N0]`` each finest node's ancestor at every scale (global node), or -1.
    """

    order: Tensor
    entry_image: Tensor
    image: Tensor
    scale: Tensor
    region: Tensor
    parent: Tensor
    decision: Tensor
    ancestors: Tensor


_LAYOUTS: dict = {}  # (TreeBatch, device) -> BatchLayout: a few size mixes are served again and again
_MAX_LAYOUTS = 16


def _batch_layout(batch: TreeBatch, device: torch.device) -> BatchLayout:
    key = (batch, device)
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached
    starts = batch.scale_starts
    n = starts[-1]
    image, scale, region, parent, decision = (torch.zeros(n, dtype=torch.long) for _ in range(5))
    orders, ancestors = [], []
    image_start = [0] * batch.scales  # next free entry of each scale's slice
    region_start = decision_start = 0
    for b, tree in enumerate(batch.trees):  # on the host, once per size mix
        to_global = torch.cat([starts[s] + image_start[s] + torch.arange(tree.counts[s]) for s in range(tree.scales)])
        local = tree.layout()
        orders.append(to_global[local.order])
        image[to_global] = b
        scale[to_global] = local.scale
        region[to_global] = torch.where(local.region >= 0, region_start + local.region, -1 - b)
        for s in range(tree.scales):
            nodes = to_global[tree.offsets[s] : tree.offsets[s + 1]]
            if s + 1 < tree.scales:
                up = tree.parents(s)
                parent[nodes] = torch.where(up >= 0, image_start[s + 1] + up, -1)
            else:
                parent[nodes] = -1
            if s >= 1:
                decision[nodes] = decision_start + tree.decision_offsets[s] + torch.arange(tree.counts[s])
        rows = tree.finest_ancestors()
        ancestors.append(torch.where(rows >= 0, to_global[rows.clamp_min(0)], -1))
        for s in range(tree.scales):
            image_start[s] += tree.counts[s]
        region_start += tree.counts[-1]
        decision_start += tree.decisions
    order = torch.cat(orders)
    host = BatchLayout(order, image[order], image, scale, region, parent, decision, torch.cat(ancestors, 1))
    layout = BatchLayout(*(t.to(device, non_blocking=True) for t in host))
    _remember(key, layout)
    return layout


def _remember(key, value) -> None:
    if tracing():
        return
    _LAYOUTS[key] = value
    while len(_LAYOUTS) > _MAX_LAYOUTS:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))


def node_token_weights(decisions: Tensor, parent: Tensor, decision: Tensor, starts) -> Tensor:
    """Every node's token weight from the flat ``decisions`` (``TreeBatch.token_weights``), given the
    node maps ``parent`` and ``decision`` of a ``BatchLayout`` and the first node of each scale
    (``starts``, the table's size last): a loop over scales, not over images. A padded layout
    (``padded_batch``) passes its own maps and starts."""
    hard = decisions.dtype == torch.bool
    scales = len(starts) - 1
    weights: List[Tensor] = [None] * scales
    reach = None
    for s in range(scales - 1, -1, -1):
        nodes = slice(starts[s], starts[s + 1])
        if reach is not None:
            up = parent[nodes]
            reach = torch.where(up >= 0, reach[up.clamp_min(0)], True if hard else 1)
        if s == 0:
            weights[0] = reach
            break
        m = decisions[decision[nodes]]
        keep = ~m if hard else 1 - m
        weights[s] = keep if reach is None else (reach & keep if hard else reach * keep)
        reach = m if reach is None else (reach & m if hard else reach * m)
    return torch.cat(weights)


def _node_pixels(batch: TreeBatch, patch: int, chans: int) -> Tensor:
    parts = [[] for _ in range(batch.scales)]
    start = 0
    for tree in batch.trees:  # on the host, once per size mix
        height, width = tree.grids[0][0] * patch, tree.grids[0][1] * patch
        for s, (h, w) in enumerate(tree.grids):
            size = patch * tree.ratio**s
            cell = torch.arange(h * w)
            origin = start + (cell // w) * size * width + (cell % w) * size
            fill = torch.ones_like(cell)
            parts[s].append(torch.stack([origin, fill * width, fill * height * width, fill * tree.ratio**s]))
        start += chans * height * width
    return torch.cat([torch.cat(p, 1) for p in parts], 1)


def batch_index(
    mask: Tensor, batch: TreeBatch, num_prefix: int, shape: Optional[StaticShape] = None
) -> MixedScaleIndex:
    """``tree_index`` of a list of images of different sizes (any number of scales, two included).

    mask: the flat bool decisions ``[sum D_b]`` (``TreeBatch``). Same contract as ``tree_index``
    (one host read, none with a ``shape``) with global maps: ``source`` and ``position`` are the
    token's global node (``TreeBatch``), ``region`` its flat coarsest region or ``-1 - b``, and
    ``fine_to_row`` is flat, ``[sum N0_b]`` over the finest nodes in global order.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (sum(batch.decisions),):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must be a flat bool tensor [{sum(batch.decisions)}] (every image's decisions), got {got}"
        )
    layout = batch.layout(mask.device)
    return index_of_nodes(batch.token_weights(mask), layout, batch.batch, batch.scale_starts[1], num_prefix, shape)


def index_of_nodes(
    valid_nodes: Tensor,
    layout: BatchLayout,
    images: int,
    padding_node: int,
    num_prefix: int,
    shape: Optional[StaticShape] = None,
) -> MixedScaleIndex:
    """``batch_index`` from the token weights ``valid_nodes`` (bool ``[n_nodes]``: which global nodes
    are tokens) and the layout's maps; ``padding_node``: the node padding rows embed (the first
    scale-1 node, image 0's). A padded layout (``padded_batch``) calls it with its own maps."""
    device = valid_nodes.device
    valid = valid_nodes[layout.order]  # packed order
    lengths = num_prefix + torch.zeros(images, dtype=torch.long, device=device).index_add_(
        0, layout.entry_image, valid.long()
    )
    static = shape is not None
    cu_seqlens, shape = _sized(lengths, shape)
    total = shape.capacity
    # a packed-order entry's row: the tokens before it (all images) plus the prefixes up to its image's
    node_row = torch.cumsum(valid, 0) - valid.long() + num_prefix * (layout.entry_image + 1)
    n_patch = total - images * num_prefix
    candidate = torch.argsort((~valid).to(torch.uint8), stable=True)[:n_patch]
    if candidate.numel() < n_patch:  # a capacity past the all-finest total: more padding entries than nodes
        candidate = torch.cat([candidate, candidate.new_zeros(n_patch - candidate.numel())])
    node = layout.order[candidate]
    scale, region, rows = layout.scale[node], layout.region[node], node_row[candidate]
    if static:  # padding entry e fills padding row e + B*P with the first scale-1 node (image 0's)
        entry = torch.arange(n_patch, device=device)
        real = entry < cu_seqlens[-1] - images * num_prefix
        rows = torch.where(real, rows, entry + images * num_prefix)
        node = torch.where(real, node, padding_node)
        region = torch.where(real, region, 0)
        scale = torch.where(real, scale, 1)
    rows_by_node = torch.empty_like(node_row)
    rows_by_node[layout.order] = node_row
    fine_to_row = torch.zeros(layout.ancestors.shape[1], dtype=torch.long, device=device)
    for ancestor in layout.ancestors:
        at = ancestor.clamp_min(0)
        fine_to_row = torch.where(valid_nodes[at] & (ancestor >= 0), rows_by_node[at], fine_to_row)
    return _index(cu_seqlens, lengths, shape, static, num_prefix, rows, node, node, region, scale, fine_to_row)
