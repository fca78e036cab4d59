"""A list of images of different sizes laid out in tables of fixed sizes, so that one captured or
compiled forward serves any mix of sizes that fits (docs/design.md section 19).

A ``TreeBatch``'s tables (its global node table, ``BatchLayout``, ``node_pixels``) have sizes that
follow the size mix: a graph built on them would be rebuilt for every mix. ``ListCapacity`` fixes
them from a maximum image count and a maximum pixel count (sum of ``H_b * W_b``): at most
``max_pixels / p**2`` finest nodes, ``/ r**2`` of those at the next scale, and so on. ``padded_layout``
builds a mix's tables on the host (host metadata, known from the sizes; cached per mix) and pads
them to those sizes; ``padded_batch_index`` is ``tree_batch.batch_index`` over them, with no
host read and no shape that depends on the mix. Padding nodes are never tokens; padding images
(past the list's length) are sequences of their prefix rows only, which no real row attends to.
"""

from typing import NamedTuple, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .scale_tree import tracing
from .tree_batch import BatchLayout, TreeBatch, index_of_nodes, node_token_weights
from .varlen import MixedScaleIndex, StaticShape


class ListCapacity(NamedTuple):
    """The fixed sizes of a padded list: ``images`` (the most images per call), ``fine_nodes`` (the
    most finest nodes, ``max_pixels // p**2``), ``ratio`` and ``scales`` of the model."""

    images: int
    fine_nodes: int
    ratio: int
    scales: int

    @property
    def nodes_per_scale(self) -> Tuple[int, ...]:
        return tuple(self.fine_nodes // self.ratio ** (2 * s) for s in range(self.scales))

    @property
    def starts(self) -> Tuple[int, ...]:
        """First padded node of each scale (finest first), then the table's size."""
        starts = [0]
        for n in self.nodes_per_scale:
            starts.append(starts[-1] + n)
        return tuple(starts)

    @property
    def decisions(self) -> int:
        """Entries of the padded flat decision tensor: the real ones first, in ``TreeBatch`` order."""
        return sum(self.nodes_per_scale[1:])


class PaddedLayout(NamedTuple):
    """A mix's tables padded to a ``ListCapacity`` (padded node numbering: scale ``s`` occupies
    ``starts[s] : starts[s + 1]``, its real nodes first in ``TreeBatch`` order).

    maps: the ``BatchLayout`` in that numbering (padding nodes come after the real ones in
    ``order``); alive: bool ``[n]`` real nodes; node_pixels: int64 ``[4, n]``
    (``TreeBatch.node_pixels``; padding nodes read pixel 0 with strides 1); region_image,
    region_local: int64 ``[decisions]`` each decision's image and index in it (padding entries:
    image ``images``, a row of their own, so a budget ranks them apart)."""

    maps: BatchLayout
    alive: Tensor
    node_pixels: Tensor
    region_image: Tensor
    region_local: Tensor


_PADDED: dict = {}  # (TreeBatch, capacity, patch, chans, device) -> PaddedLayout
_MAX_PADDED = 16


def padded_layout(batch: TreeBatch, capacity: ListCapacity, fine_patch: int, chans: int, device) -> PaddedLayout:
    """The tables of ``batch`` padded to ``capacity``, built on the host once per size mix and
    device (cached), then one copy each. Refuses a list that does not fit, naming the image."""
    device = torch.device(device)
    key = (batch, capacity, int(fine_patch), int(chans), device)
    cached = _PADDED.get(key)
    if cached is not None:
        return cached
    check_fits(batch, capacity)
    host = batch.layout("cpu")
    starts, padded_starts = batch.scale_starts, capacity.starts
    size = padded_starts[-1]
    to_padded = torch.cat([padded_starts[s] + torch.arange(starts[s + 1] - starts[s]) for s in range(batch.scales)])
    # padding nodes: each scale's slice past its real nodes (Python ints: no host read to count)
    dead = torch.cat(
        [torch.arange(padded_starts[s] + starts[s + 1] - starts[s], padded_starts[s + 1]) for s in range(batch.scales)]
    )

    def scatter(values: Tensor, fill: int) -> Tensor:
        out = torch.full((size,), fill, dtype=values.dtype)
        out[to_padded] = values
        return out

    ancestors = torch.full((batch.scales, capacity.fine_nodes), -1, dtype=torch.long)
    real = host.ancestors >= 0
    ancestors[:, : host.ancestors.shape[1]] = torch.where(real, to_padded[host.ancestors.clamp_min(0)], -1)
    node_pixels = torch.ones(4, size, dtype=torch.long)
    node_pixels[0] = 0
    node_pixels[:, to_padded] = batch.node_pixels(fine_patch, chans, "cpu")
    image, local = batch.nodes_of_images(1, "cpu")  # two scales: decision d is the d-th region
    spare = capacity.decisions - image.numel()
    maps = BatchLayout(
        order=torch.cat([to_padded[host.order], dead]),
        entry_image=torch.cat([host.entry_image, torch.zeros(dead.numel(), dtype=torch.long)]),
        image=scatter(host.image, 0),
        scale=scatter(host.scale, 1),
        region=scatter(host.region, 0),
        parent=scatter(host.parent, -1),
        decision=scatter(host.decision, 0),
        ancestors=ancestors,
    )
    layout = PaddedLayout(
        maps=maps,
        alive=scatter(torch.ones(to_padded.numel(), dtype=torch.bool), False),
        node_pixels=node_pixels,
        region_image=torch.cat([image, torch.full((spare,), capacity.images, dtype=torch.long)]),
        region_local=torch.cat([local, torch.arange(spare)]),
    )
    layout = tree_map(lambda t: t.to(device, non_blocking=True), layout)
    if not tracing():
        _PADDED[key] = layout
        while len(_PADDED) > _MAX_PADDED:
            _PADDED.pop(next(iter(_PADDED)))
    return layout


def padded_node_rows(rows: Tensor, batch: TreeBatch, capacity: ListCapacity, dim: int = 0) -> Tensor:
    """A table with a row per global node of ``batch`` (``TreeBatch`` order along ``dim``: position
    or RoPE rows) in the padded numbering: each scale's rows at its padded start, zeros after."""
    shape = list(rows.shape)
    shape[dim] = capacity.starts[-1]
    out = rows.new_zeros(shape)
    starts, padded = batch.scale_starts, capacity.starts
    for s in range(batch.scales):
        count = starts[s + 1] - starts[s]
        out.narrow(dim, padded[s], count).copy_(rows.narrow(dim, starts[s], count))
    return out


def check_fits(batch: TreeBatch, capacity: ListCapacity) -> None:
    """A clear error, naming the first image past a limit, for a list ``capacity`` cannot hold."""
    if batch.scales != capacity.scales or batch.scales != 2:
        raise NotImplementedError(f"a padded list layout has two scales; this list has {batch.scales}")
    if batch.batch > capacity.images:
        raise ValueError(
            f"images[{capacity.images}]: at most {capacity.images} images fit, got a list of {batch.batch}"
        )
    used = 0
    for b, tree in enumerate(batch.trees):
        used += tree.counts[0]
        if used > capacity.fine_nodes:
            raise ValueError(
                f"images[{b}] takes the list past its pixel capacity: {used} finest patches after it, "
                f"room for {capacity.fine_nodes}"
            )


def padded_batch_index(
    mask: Tensor, layout: PaddedLayout, capacity: ListCapacity, num_prefix: int, shape: StaticShape
) -> MixedScaleIndex:
    """``tree_batch.batch_index`` of a padded list: mask bool ``[capacity.decisions]`` (padding
    entries ignored), a ``StaticShape`` for ``capacity.images`` images (padding images have their
    prefix rows only). No host read; every shape follows from ``capacity`` and ``shape``."""
    valid = padded_tokens(mask, layout, capacity)
    return index_of_nodes(valid, layout.maps, capacity.images, capacity.starts[1], num_prefix, shape)


def padded_tokens(mask: Tensor, layout: PaddedLayout, capacity: ListCapacity) -> Tensor:
    """bool ``[n]``: the padded nodes ``mask`` makes tokens (``TreeBatch.token_weights``, padding
    nodes never)."""
    return node_token_weights(mask, layout.maps.parent, layout.maps.decision, capacity.starts) & layout.alive
