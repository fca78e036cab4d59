"""Patch sizes past two scales: the quadtree of an image's tokens (docs/design.md section 10).

A model with ``S`` scales has patch sizes ``p, p*r, ..., p*r**(S-1)`` (APT: 16/32/64 px, r = 2).
Scale ``s`` (0 = finest) tiles the image in a grid ``grid_s = (h0 // r**s, w0 // r**s)`` of
*nodes*; node ``(y, x)`` of scale ``s >= 1`` covers the ``r x r`` nodes ``(r*y + i, r*x + j)`` of
scale ``s - 1``, its children. A node whose parent cell does not exist (the border of a size that
is not a whole number of the coarser patches) is a *root*; every whole coarsest region is one.

Decisions: a gate says, for every node of scale ``s >= 1``, whether it *splits* into its
children. The hard mask (and the gate's soft outputs) is ``[B, D]`` with one entry per
splittable node, the scales concatenated from the coarsest to ``s = 1`` (raster order in each),
``D = N_{S-1} + ... + N_1``; with two scales this is the coarse grid, True = fine, as before.
A node is a token when every ancestor splits and it does not (scale 0 never splits); the entry
of a node below a kept ancestor is ignored. Each split turns one token into ``r*r``.

Token weight of a node (straight-through values, Eq. 1-3 generalised): the product of its
ancestors' split values times ``1 - m`` of its own (``s >= 1``), or times 1 (``s = 0``): 1 in
the forward pass for tokens, 0 for the rest, and the gradient of every level's gate on the path.
With two scales: ``m`` of the region for fine tokens, ``1 - m`` for coarse ones (roots: 1).

Node table: every node of every scale, finest scale first (``offsets[s]`` is scale ``s``'s
first node): the order of the position table and of the candidate-pixel table (``B * N_s``
rows per scale). Packed order of an image: its prefix tokens, then the roots from the coarsest
scale down (raster order in a scale), each followed by its subtree in pre-order with children in
raster order. With two scales this is exactly ``varlen.mixed_scale_index``'s layout (regions,
each coarse or its fine cells, then the border cells), which that builder keeps as the fast path.
"""

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .varlen import (
    MixedScaleIndex,
    StaticShape,
    cu_seqlens_from_lengths,
    layout_index,
    layout_shape,
    shape_within,
)


@dataclass(frozen=True)
class ScaleTree:
    """The quadtree geometry of one image size (no tensors; build with :meth:`of`).

    grids: ``(h, w)`` of every scale, finest first; ratio: patch size ratio between scales.
    """

    grids: Tuple[Tuple[int, int], ...]
    ratio: int

    @classmethod
    def of(cls, fine_grid: Tuple[int, int], ratio: int, scales: int) -> "ScaleTree":
        """The tree of a finest grid ``(h, w)`` with ``scales`` scales (>= 2) of ratio ``r`` (>= 2)."""
        if isinstance(scales, bool) or not isinstance(scales, int) or scales < 2:
            raise ValueError(f"scales must be an integer >= 2 (patch sizes p, p*r, ...), got {scales!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 2:
            raise ValueError(f"a tree of scales needs an integer ratio >= 2 between scales, got {ratio!r}")
        h, w = (int(n) for n in fine_grid)
        if h < ratio ** (scales - 1) or w < ratio ** (scales - 1):
            raise ValueError(
                f"a finest grid of {h}x{w} cells has no node of the coarsest of {scales} scales: images need at "
                f"least {ratio ** (scales - 1)} finest patches per side (one coarsest patch)"
            )
        return cls(tuple((h // ratio**s, w // ratio**s) for s in range(scales)), ratio)

    @property
    def scales(self) -> int:
        return len(self.grids)

    @property
    def counts(self) -> Tuple[int, ...]:
        """Nodes per scale, finest first."""
        return tuple(h * w for h, w in self.grids)

    @property
    def offsets(self) -> Tuple[int, ...]:
        """First node of each scale in the node table (finest first), then the table's size."""
        return tuple([0] + list(_cumsum(self.counts)))

    @property
    def decision_offsets(self) -> Tuple[int, ...]:
        """First entry of scale ``s`` (``s >= 1``) in a ``[B, D]`` mask, indexed by ``s`` (entry 0 unused)."""
        starts = [0] * self.scales
        at = 0
        for s in range(self.scales - 1, 0, -1):
            starts[s] = at
            at += self.counts[s]
        return tuple(starts)

    @property
    def decisions(self) -> int:
        """D: splittable nodes (every node of scale >= 1)."""
        return sum(self.counts[1:])

    @property
    def roots(self) -> int:
        """Nodes without a parent: the tokens of an image that splits nothing."""
        return sum(self._roots_at(s) for s in range(self.scales))

    def _roots_at(self, s: int) -> int:
        if s == self.scales - 1:
            return self.counts[s]
        (h, w), (hp, wp) = self.grids[s], self.grids[s + 1]
        return h * w - hp * wp * self.ratio**2

    def tokens(self, splits: int) -> int:
        """Patch tokens of an image with ``splits`` split nodes (each split adds r*r - 1)."""
        return self.roots + (self.ratio**2 - 1) * splits

    # ---- per-scale views of a [B, D] tensor of decisions ----------------------------------

    def per_scale(self, values: Tensor) -> List[Optional[Tensor]]:
        """``[B, D]`` -> ``[None, v_1, ..., v_{S-1}]`` with ``v_s`` ``[B, N_s]`` (scale order)."""
        if values.dim() != 2 or values.shape[1] != self.decisions:
            raise ValueError(
                f"decisions must have shape [B, {self.decisions}] (one per splittable node, coarsest scale "
                f"first), got {tuple(values.shape)}"
            )
        starts = self.decision_offsets
        return [None] + [values[:, starts[s] : starts[s] + self.counts[s]] for s in range(1, self.scales)]

    def parents(self, s: int, device=None) -> Tensor:
        """int64 ``[N_s]``: each node's parent (a node of scale ``s + 1``), or -1 for a root."""
        h, w = self.grids[s]
        y = torch.arange(h, device=device)[:, None]
        x = torch.arange(w, device=device)[None, :]
        if s == self.scales - 1:
            return torch.full((h * w,), -1, dtype=torch.long, device=device)
        hp, wp = self.grids[s + 1]
        py, px = y // self.ratio, x // self.ratio
        return torch.where((py < hp) & (px < wp), py * wp + px, -1).flatten()

    def token_weights(self, decisions: Tensor) -> List[Tensor]:
        """Token weight of every node (module docstring), finest scale first: ``[B, N_s]`` each.

        decisions: bool ``[B, D]`` (hard: the weights are bool, True = the node is a token) or
        float (straight-through values: the weights carry the gradient of every level)."""
        levels = self.per_scale(decisions)
        hard = decisions.dtype == torch.bool
        weights: List[Tensor] = [None] * self.scales
        reach = None  # product of the ancestors' split values; None at the coarsest scale (all roots)
        for s in range(self.scales - 1, -1, -1):
            if reach is not None:
                parent = self.parents(s, decisions.device)
                up, has_parent = reach[:, parent.clamp_min(0)], parent >= 0
                reach = torch.where(has_parent, up, True if hard else 1)  # a root is reached
            if s == 0:  # scale 0 never splits; S >= 2, so reach is set
                weights[0] = reach
                break
            m = levels[s]
            keep = ~m if hard else 1 - m
            weights[s] = keep if reach is None else (reach & keep if hard else reach * keep)
            reach = m if reach is None else (reach & m if hard else reach * m)
        return weights

    # ---- the packed order --------------------------------------------------------------------

    def layout(self, device=None) -> "TreeLayout":
        """The mask-independent maps of the packed order (built on ``device``; no host read). On the
        CPU they are built once per tree (``_cpu_layout``): an argsort and a dozen maps over every
        node, which the torch path used to rebuild in every forward."""
        if (device is None or torch.device(device).type == "cpu") and not tracing():
            return _cpu_layout(self)
        return self._build_layout(device)

    def _build_layout(self, device=None) -> "TreeLayout":
        r = self.ratio
        keys, regions = [None] * self.scales, [None] * self.scales
        top = self.scales - 1
        pre_up = root_up = region_up = None  # the maps of the scale above, set by its iteration
        biggest = max(self.counts) if self.counts else 1
        for s in range(top, -1, -1):
            n = self.counts[s]
            raster = torch.arange(n, device=device)
            own_root = (top - s) * biggest + raster
            if s == top:
                pre, root, region = torch.zeros_like(raster), own_root, raster
            else:
                parent = self.parents(s, device)
                has_parent = parent >= 0
                h, w = self.grids[s]
                child = ((raster // w) % r) * r + (raster % w) % r
                p = parent.clamp_min(0)
                pre = torch.where(has_parent, pre_up[p] + 1 + child * _subtree(s, r), 0)
                root = torch.where(has_parent, root_up[p], own_root)
                region = torch.where(has_parent, region_up[p], -1)
            keys[s] = root * _subtree(top, r) + pre
            regions[s] = region
            pre_up, root_up, region_up = pre, root, region
        key = torch.cat(keys)
        order = torch.argsort(key)

        def per_node(values):  # one value per scale, spread over that scale's nodes (fills: no H2D copy)
            return torch.cat(
                [torch.full((n,), v, dtype=torch.long, device=device) for v, n in zip(values, self.counts)]
            )

        return TreeLayout(
            order=order,
            scale=per_node(range(self.scales)),
            region=torch.cat(regions),
            first=per_node(self.offsets[:-1]),
            count=per_node(self.counts),
        )

    def finest_ancestors(self, device=None) -> Tensor:
        """int64 ``[S, N_0]``: the node-table entry of each finest cell's ancestor at every scale
        (itself at scale 0), or -1 where it has none."""
        rows = [torch.arange(self.counts[0], device=device)]
        for s in range(self.scales - 1):
            below = rows[-1]
            parent = self.parents(s, device)
            up = torch.where(below >= 0, parent[below.clamp_min(0)] if parent.numel() else below, -1)
            rows.append(up)
        return torch.stack([torch.where(a >= 0, a + self.offsets[s], -1) for s, a in enumerate(rows)])


@functools.lru_cache(maxsize=16)
def _cpu_layout(tree: ScaleTree) -> "TreeLayout":
    """``tree.layout("cpu")``, kept per tree: a few image sizes per process. Not on CUDA, where
    a layout first built during a CUDA graph capture or a ``torch.compile`` trace would hold values
    never computed. Built outside inference mode: an inference tensor could not be saved for a later
    training step's backward."""
    with torch.inference_mode(False):
        return tree._build_layout(torch.device("cpu"))


@dataclass(frozen=True)
class TreeLayout:
    """order: int64 ``[n_nodes]`` node-table entries in packed order; scale: int64 ``[n_nodes]`` scale
    of each node-table entry; region: int64 ``[n_nodes]`` the coarsest region of each entry's root,
    or -1 when its root is not a coarsest region; first, count: int64 ``[n_nodes]`` the first
    node-table entry and the node count of each entry's scale."""

    order: Tensor
    scale: Tensor
    region: Tensor
    first: Tensor
    count: Tensor


def _subtree(s: int, r: int) -> int:
    """Nodes in the subtree of a node of scale s (itself included)."""
    return sum(r ** (2 * k) for k in range(s + 1))


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def tree_static_shape(
    batch: int, tree: ScaleTree, num_prefix: int, capacity: Optional[int] = None, splits: Optional[int] = None
) -> StaticShape:
    """``varlen.static_shape`` for a tree: an image has between ``P + roots`` and ``P + N_0`` rows;
    ``splits`` (a budget: every image splits exactly this many nodes) makes its length exact."""
    shortest, longest = num_prefix + tree.roots, num_prefix + tree.counts[0]
    if splits is not None:
        shortest = longest = num_prefix + tree.tokens(splits)
    return shape_within(batch, shortest, longest, capacity, exact=splits is not None)


def tree_index(mask: Tensor, tree: ScaleTree, num_prefix: int, shape: Optional[StaticShape] = None) -> MixedScaleIndex:
    """The packed layout of a batch of ``tree``'s images from its hard split mask (bool ``[B, D]``).

    The torch builder for any number of scales (the oracle of the Triton one); same contract as
    ``varlen.mixed_scale_index`` (one host read, none with a ``shape``), with these generalised
    fields: ``source`` indexes ``cat`` over scales of ``[B * N_s]`` candidate pixels; ``position``
    the node table; ``region`` the token's coarsest region ``b * N_{S-1} + j`` or ``-1 - b``;
    ``is_fine`` is scale 0; ``scale`` (int64) is each token's scale. With two scales every field
    equals ``mixed_scale_index``'s.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor [B, {tree.decisions}] (True = split), got {getattr(mask, 'dtype', mask)}"
        )
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix (prefix tokens per image) must be an integer >= 0, got {num_prefix!r}")
    device = mask.device
    batch = mask.shape[0]
    layout = tree.layout(device)
    n_nodes = tree.offsets[-1]
    valid_nodes = torch.cat(tree.token_weights(mask), 1)  # [B, n_nodes], node-table order
    valid = valid_nodes[:, layout.order]  # packed order
    lengths = num_prefix + valid.sum(1)
    static = shape is not None
    cu_seqlens, shape = _sized(lengths, shape)
    total = shape.capacity
    rank = torch.cumsum(valid, 1) - valid.long()
    node_row = cu_seqlens[:-1, None].long() + num_prefix + rank  # [B, n_nodes] packed order

    n_patch = total - batch * num_prefix
    candidate = torch.argsort((~valid).flatten().to(torch.uint8), stable=True)[:n_patch]
    image = candidate // n_nodes
    node = layout.order[candidate % n_nodes]
    scale = layout.scale[node]
    first = layout.first[node]
    cell = node - first
    source = batch * first + image * layout.count[node] + cell
    position = node
    root_region = layout.region[node]
    region = torch.where(root_region >= 0, image * tree.counts[-1] + root_region, -1 - image)
    rows = node_row.flatten()[candidate]
    if static:  # padding entry e fills padding row e + B*P with image 0's first scale-1 node
        entry = torch.arange(n_patch, device=device)
        real = entry < cu_seqlens[-1] - batch * num_prefix
        rows = torch.where(real, rows, entry + batch * num_prefix)
        source = torch.where(real, source, batch * tree.counts[0])
        position = torch.where(real, position, tree.counts[0])
        region = torch.where(real, region, 0)
        scale = torch.where(real, scale, 1)

    rows_by_node = torch.empty_like(node_row)
    rows_by_node[:, layout.order] = node_row
    fine_to_row = torch.zeros(batch, tree.counts[0], dtype=torch.long, device=device)
    for ancestor in tree.finest_ancestors(device):
        at = ancestor.clamp_min(0)
        token = valid_nodes[:, at] & (ancestor >= 0)
        fine_to_row = torch.where(token, rows_by_node[:, at], fine_to_row)
    return _index(cu_seqlens, lengths, shape, static, num_prefix, rows, source, position, region, scale, fine_to_row)


def _sized(lengths: Tensor, shape: Optional[StaticShape]) -> Tuple[Tensor, StaticShape]:
    """``cu_seqlens`` of the images' ``lengths`` and the layout's shape (``varlen.layout_shape``)."""
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    return cu_seqlens, layout_shape(cu_seqlens, lengths, shape)


def _index(cu_seqlens, lengths, shape, static, num_prefix, rows, source, position, region, scale, fine_to_row):
    """The ``MixedScaleIndex`` of the tree builders from their maps (``varlen.layout_index``)."""
    maps = dict(rows=rows, source=source, position=position, region=region, is_fine=scale == 0, fine_to_row=fine_to_row)
    return layout_index(cu_seqlens, lengths, shape, num_prefix, static, scale=scale, **maps)


def tracing() -> bool:
    """True inside ``torch.compile``, ``torch.export`` or any fake-tensor trace: a layout built there
    holds fake tensors, which a later eager forward would read as symbols, so it is never cached."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None
