"""The varlen contract: how a mixed-scale batch is laid out as one packed ``[T, C]`` tensor.

Layout of image ``b`` (rows ``cu_seqlens[b] : cu_seqlens[b+1]``): its ``P`` prefix tokens (cls,
registers), then one entry per coarse region in raster order: a coarse region contributes one
token, a fine region its ``r*r`` fine tokens in raster order inside the region (``r`` = coarse
patch / fine patch), then its *border cells*: when the fine grid is not a whole number of coarse
regions (ViT-B/32 at 224 px: 7 x 7 fine cells, 3 x 3 regions of 2 x 2), the fine cells outside
every whole region are always fine tokens, in fine raster order, with no gate decision
(``region`` -1 - b, straight-through value 1). Every map below is built on the mask's device;
building the whole index costs exactly one host read (``T`` and ``max_seqlen``), once per
forward, or none with a static shape.

Static shapes (docs/design.md section 9): a forward whose shapes depend only on the batch, the
image size and a token *capacity* (a number of packed rows fixed before the mask is known). The
real rows come first, as above; rows ``T .. capacity`` are padding. Padding rows form their own
sequences of at most ``max_seqlen`` rows each (a fixed number of them: ``cu_seqlens`` has
``B + 1 + padding_sequences`` entries, the padding offsets ending at ``capacity``; some may be
empty), so every attention backend computes them like any row and no real row ever sees them.
Each padding row holds a copy of a real token's embedding (image 0's first coarse token: finite,
well defined) and belongs to image ``B`` in ``row_image``. ``max_seqlen`` is then a static bound
(the all-fine length of an image, or the exact length when every image keeps the same number of
fine regions, as with a token budget).
"""

import math
import numbers
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor


class MixedScaleIndex(NamedTuple):
    """Index maps of one packed mixed-scale batch (``Np = T - B*P`` patch tokens).

    cu_seqlens: int32 ``[B+1]``; max_seqlen: int; total: T (int).
    rows: int64 ``[Np]`` packed row of each patch token, in packed order.
    source: int64 ``[Np]`` row of the candidate-pixel table ``cat(fine patches [B*Nf], coarse
        patches [B*Nc])`` that each patch token embeds.
    position: int64 ``[Np]`` row of the position table ``cat(fine pos [Nf], coarse pos [Nc])``.
    region: int64 ``[Np]`` flat coarse region ``b*Nc + j`` each patch token belongs to (``-1 - b``:
        a border cell of image b, in no region; the pack kernel reads the image from it).
    is_fine: bool ``[Np]``.
    prefix_rows: int64 ``[B, P]`` packed rows of the prefix tokens.
    row_image: int64 ``[T]`` image of every packed row.
    fine_to_row: int64 ``[B, Nf]`` packed row covering each fine cell (fine-grid raster order,
        border cells too): the fine token itself, or the coarse token of its region. Used to
        unpack to the grid.
    padding_sequences: sequences after the B images that hold padding rows (static shapes; 0
        otherwise). ``batch`` is the number of images.
    static: the shape was fixed before the mask was known: the layout's consumers must read
        nothing back to the host (attention then takes a host-free backend).
    scale: int64 ``[Np]`` each patch token's scale (0 = finest) in a layout of more than two
        scales (``scale_tree.tree_index``, where ``source`` and ``position`` index tables of every
        scale); None from the two-scale builders, where it is ``~is_fine``.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    total: int
    rows: Tensor
    source: Tensor
    position: Tensor
    region: Tensor
    is_fine: Tensor
    prefix_rows: Tensor
    row_image: Tensor
    fine_to_row: Tensor
    padding_sequences: int = 0
    static: bool = False
    scale: Optional[Tensor] = None

    @property
    def batch(self) -> int:
        """Images in the batch (``cu_seqlens`` also lists the padding sequences of a static shape)."""
        return self.cu_seqlens.numel() - 1 - self.padding_sequences


class StaticShape(NamedTuple):
    """The shape of a packed batch fixed before its mask is known (see the module docstring).

    capacity: packed rows (real + padding); max_seqlen: bound on every sequence, padding ones
    included; padding_sequences: how many sequences after the images hold the padding rows.
    """

    capacity: int
    max_seqlen: int
    padding_sequences: int


def static_shape(
    batch: int,
    n_coarse: int,
    ratio: int,
    num_prefix: int,
    capacity: Optional[int] = None,
    fine_regions=None,
    n_border: int = 0,
) -> StaticShape:
    """The ``StaticShape`` of ``batch`` images of ``n_coarse`` regions with room for ``capacity`` rows.

    fine_regions: when every image keeps exactly this many regions fine (a token budget), each image
    has the same known length and ``capacity`` defaults to the exact total (no padding). Otherwise
    an image has between ``P + Nc`` (all coarse) and ``P + Nc*r*r`` (all fine) rows, plus its
    ``n_border`` border cells, ``capacity`` must lie between ``B`` times those, and ``max_seqlen``
    is the all-fine length.
    """
    fixed = num_prefix + n_border
    shortest, longest = fixed + n_coarse, fixed + n_coarse * ratio * ratio
    if fine_regions is not None:
        if not 0 <= fine_regions <= n_coarse:
            raise ValueError(f"fine_regions must be between 0 and {n_coarse}, got {fine_regions}")
        shortest = longest = fixed + n_coarse + (ratio * ratio - 1) * fine_regions
    return shape_within(batch, shortest, longest, capacity, exact=fine_regions is not None)


def shape_within(batch: int, shortest: int, longest: int, capacity: Optional[int], exact: bool) -> StaticShape:
    """The ``StaticShape`` of ``batch`` images of ``shortest`` to ``longest`` rows each in
    ``capacity`` rows (default, when every image has the same known length (``exact``): the total)."""
    if capacity is None:
        if not exact:
            raise ValueError("a static shape needs a capacity (packed rows) unless every image has a known length")
        capacity = batch * shortest
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int number of packed rows, got {capacity!r}")
    if not batch * shortest <= capacity <= batch * longest:
        raise ValueError(
            f"capacity must be between {batch * shortest} and {batch * longest} packed rows for {batch} images "
            f"of {shortest} to {longest} tokens, got {capacity}"
        )
    slack = capacity - batch * shortest  # the most padding rows a batch can leave
    return StaticShape(capacity, longest, math.ceil(slack / longest) if longest else 0)


def lengths_within(shortest, longest, capacity: Optional[int], exact: bool) -> StaticShape:
    """``shape_within`` for images of different sizes: image ``b`` has ``shortest[b]`` to
    ``longest[b]`` rows (a list of images of different sizes, docs/design.md section 11). Any
    capacity from the shortest total up serves: a fixed bucket pads whatever mix of sizes it gets."""
    low = sum(shortest)
    if capacity is None:
        if not exact:
            raise ValueError("a static shape needs a capacity (packed rows) unless every image has a known length")
        capacity = low
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int number of packed rows, got {capacity!r}")
    if capacity < low:
        raise ValueError(
            f"capacity must be at least {low} packed rows for these {len(shortest)} images, got {capacity!r}"
        )
    bound = max(longest, default=0)
    slack = capacity - low  # the most padding rows a batch can leave
    return StaticShape(capacity, bound, math.ceil(slack / bound) if bound else 0)


def padded_cu_seqlens(cu_seqlens: Tensor, shape: StaticShape) -> Tensor:
    """int32 ``[B + 1 + padding_sequences]``: the images' offsets, then padding sequences of at most
    ``max_seqlen`` rows each up to ``capacity`` (on the device: no host read)."""
    if shape.padding_sequences == 0:
        return cu_seqlens
    steps = torch.arange(1, shape.padding_sequences + 1, device=cu_seqlens.device, dtype=torch.int32)
    tail = (cu_seqlens[-1:] + steps * shape.max_seqlen).clamp_max(shape.capacity)
    return torch.cat([cu_seqlens, tail])


def padded_row_image(lengths: Tensor, shape: StaticShape) -> Tensor:
    """int64 ``[capacity]``: the image of every packed row, ``B`` for padding rows."""
    batch = lengths.numel()
    lengths = torch.cat([lengths.reshape(-1).long(), shape.capacity - lengths.sum().reshape(1).long()])
    images = torch.arange(batch + 1, device=lengths.device)
    return torch.repeat_interleave(images, lengths, output_size=shape.capacity)


def layout_shape(cu_seqlens: Tensor, lengths: Tensor, shape: Optional[StaticShape]) -> StaticShape:
    """The shape a builder lays ``lengths`` (int ``[B]``, offsets ``cu_seqlens``) out in: ``shape``,
    its capacity checked on the device, or (None) the exact shape, read back in one host read."""
    if shape is not None:
        check_capacity(cu_seqlens[-1], shape.capacity)
        return shape
    total, max_seqlen = host_total_and_longest(cu_seqlens)  # remembered for the attention's plan
    return StaticShape(total, max_seqlen, 0)


def layout_index(cu_seqlens: Tensor, lengths: Tensor, shape: StaticShape, num_prefix: int, static: bool, **maps):
    """The ``MixedScaleIndex`` of a batch laid out in ``shape`` (``layout_shape``): the fields that
    follow from the offsets (padding sequences, each row's image, the prefix rows), and the
    builder's token ``maps`` (rows, source, position, region, is_fine, fine_to_row, scale)."""
    return MixedScaleIndex(
        cu_seqlens=padded_cu_seqlens(cu_seqlens, shape),
        max_seqlen=shape.max_seqlen,
        total=shape.capacity,
        prefix_rows=cu_seqlens[:-1, None].long() + torch.arange(num_prefix, device=cu_seqlens.device),
        row_image=padded_row_image(lengths, shape),
        padding_sequences=shape.padding_sequences,
        static=static,
        **maps,
    )


def check_capacity(total: Tensor, capacity: int) -> None:
    """Fail on the device (no host read) when the real rows ``total`` (0-dim) exceed ``capacity``."""
    torch._assert_async(total <= capacity, "packed tokens exceed the static capacity: choose a larger bucket")


_HOST_OFFSETS: list = []  # [(weak reference to a cu_seqlens, its version, its values)], newest first
_HOST_OFFSETS_KEPT = 8  # a forward's layouts: images, keys of an attention pool, each pruning stage


def host_offsets(cu_seqlens: Tensor) -> List[int]:
    """``cu_seqlens.tolist()``, read once per tensor: the values are remembered by the tensor's
    identity (and version, where it has one: an in-place write is a new layout), so the index
    builders' one host read of a forward also serves every attention call that needs the lengths
    on the host (``grouped_attention``'s plan), with no read per block."""
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    for ref, seen_version, values in _HOST_OFFSETS:
        if ref() is cu_seqlens and seen_version == version:
            return values
    values = cu_seqlens.tolist()
    _HOST_OFFSETS.insert(0, (weakref.ref(cu_seqlens), version, values))
    del _HOST_OFFSETS[_HOST_OFFSETS_KEPT:]
    return values


def host_total_and_longest(cu_seqlens: Tensor) -> Tuple[int, int]:
    """T and the longest sequence of an exact layout: the forward's one host read (``host_offsets``)."""
    bounds = host_offsets(cu_seqlens)
    return bounds[-1], max((b - a for a, b in zip(bounds, bounds[1:])), default=0)


def cu_seqlens_from_lengths(lengths: Tensor) -> Tensor:
    """int32 ``[B+1]`` cumulative lengths (starting at 0) from per-sequence lengths ``[B]``."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths.reshape(-1), 0)
    return cu


def fine_cells_of_regions(
    coarse_grid: Tuple[int, int], ratio: int, device=None, fine_width: Optional[int] = None
) -> Tensor:
    """int64 ``[Nc, r*r]``: the fine-grid raster index of each fine cell of each coarse region.
    fine_width: the fine grid's width (default ``wc * r``: no border column)."""
    hc, wc = coarse_grid
    r = ratio
    width = wc * r if fine_width is None else fine_width
    jy = torch.arange(hc, device=device).view(hc, 1, 1, 1)
    jx = torch.arange(wc, device=device).view(1, wc, 1, 1)
    ky = torch.arange(r, device=device).view(1, 1, r, 1)
    kx = torch.arange(r, device=device).view(1, 1, 1, r)
    fine_index = (jy * r + ky) * width + (jx * r + kx)
    return fine_index.reshape(hc * wc, r * r)


def border_cells(fine_grid: Tuple[int, int], ratio: int, device=None) -> Tensor:
    """int64 ``[n_border]``: fine cells (raster order) outside every whole coarse region: the last
    ``h % r`` rows and ``w % r`` columns of the fine grid. They are always fine tokens."""
    h, w = fine_grid
    y = torch.arange(h, device=device)[:, None]
    x = torch.arange(w, device=device)[None, :]
    outside = (y >= (h // ratio) * ratio) | (x >= (w // ratio) * ratio)
    # a stable sort puts the border cells first, in raster order: a boolean index would read its size
    order = torch.argsort((~outside.expand(h, w)).flatten().to(torch.uint8), stable=True)
    return order[: count_border_cells(fine_grid, ratio)]


def count_border_cells(fine_grid: Tuple[int, int], ratio: int) -> int:
    """How many fine cells lie outside every whole coarse region (no tensor, no host read)."""
    h, w = fine_grid
    return h * w - (h // ratio) * (w // ratio) * ratio * ratio


def mixed_scale_index(
    mask: Tensor,
    coarse_grid: Tuple[int, int],
    ratio: int,
    num_prefix: int,
    shape: Optional[StaticShape] = None,
    fine_grid: Optional[Tuple[int, int]] = None,
) -> MixedScaleIndex:
    """Build the packed layout of a batch from its hard mask.

    mask: bool ``[B, Nc]`` (True = fine), ``Nc = coarse_grid[0] * coarse_grid[1]``; ratio: coarse
    patch / fine patch (integer >= 1); num_prefix: prefix tokens per image (integer >= 0); shape: a
    ``StaticShape`` (no host read; padding rows as the module docstring says), or None for the
    exact shape (one host read); fine_grid: (h, w) of the fine grid when it has border cells
    (default ``coarse_grid * ratio``: none).
    """
    _check_index_args(mask, coarse_grid, ratio, num_prefix)
    device = mask.device
    batch, n_coarse = mask.shape
    r2 = ratio * ratio
    fine_grid = (coarse_grid[0] * ratio, coarse_grid[1] * ratio) if fine_grid is None else tuple(fine_grid)
    n_fine = fine_grid[0] * fine_grid[1]
    border = border_cells(fine_grid, ratio, device)
    n_border = border.numel()
    per_region = torch.where(mask, r2, 1)  # tokens each region contributes
    region_tokens = per_region.sum(1)
    lengths = num_prefix + region_tokens + n_border
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    static = shape is not None
    shape = layout_shape(cu_seqlens, lengths, shape)
    total = shape.capacity

    # Packed row of every candidate token of an image: (j, k) of every region (k > 0 is only real in
    # a fine region), then its border cells; candidates enumerate in packed order.
    region_start = cu_seqlens[:-1, None].long() + num_prefix + (torch.cumsum(per_region, 1) - per_region)
    sub = torch.arange(r2, device=device)
    border_start = cu_seqlens[:-1, None].long() + num_prefix + region_tokens[:, None]
    candidate_row = torch.cat(
        [(region_start[:, :, None] + sub).flatten(1), border_start + torch.arange(n_border, device=device)], 1
    )
    valid = torch.cat([(mask[:, :, None] | (sub == 0)).flatten(1), mask.new_ones(batch, n_border)], 1)
    per_image = n_coarse * r2 + n_border

    # Stable sort keeps the enumeration order, which is the packed order, without a host sync. With
    # a static shape the entries past the real tokens are absent candidates: a (b, j, k > 0) of a
    # coarse region, whose maps name that region's coarse token; they fill the padding rows.
    n_patch = total - batch * num_prefix
    candidate = torch.argsort((~valid).flatten().to(torch.uint8), stable=True)[:n_patch]
    image = candidate // per_image
    local = candidate % per_image
    in_region = local < n_coarse * r2
    region_in_image = torch.where(in_region, local // r2, 0)
    decided = mask.reshape(-1)[image * n_coarse + region_in_image] if n_coarse else torch.zeros_like(in_region)
    is_fine = ~in_region | decided
    fine_cells = fine_cells_of_regions(coarse_grid, ratio, device, fine_grid[1])
    cell_of_candidate = torch.cat([fine_cells.flatten(), border])
    fine_cell = cell_of_candidate[local] if cell_of_candidate.numel() else local
    source = torch.where(is_fine, image * n_fine + fine_cell, batch * n_fine + image * n_coarse + region_in_image)
    position = torch.where(is_fine, fine_cell, n_fine + region_in_image)
    region = torch.where(in_region, image * n_coarse + region_in_image, -1 - image)  # border cells: no region

    rows = candidate_row.flatten()[candidate]
    if static:  # padding entry e fills padding row e + B*P with image 0's first coarse token
        entry = torch.arange(n_patch, device=device)
        real = entry < cu_seqlens[-1] - batch * num_prefix
        rows = torch.where(real, rows, entry + batch * num_prefix)
        source = torch.where(real, source, batch * n_fine)
        position = torch.where(real, position, n_fine)
        region = torch.where(real, region, 0)
        is_fine = is_fine & real
    region_rows = candidate_row[:, : n_coarse * r2].view(batch, n_coarse, r2)
    covering = torch.where(mask[:, :, None], region_rows, region_rows[:, :, :1])
    fine_to_row = torch.empty(batch, n_fine, dtype=torch.long, device=device)
    fine_to_row[:, fine_cells.flatten()] = covering.reshape(batch, n_coarse * r2)
    fine_to_row[:, border] = candidate_row[:, n_coarse * r2 :]
    maps = dict(rows=rows, source=source, position=position, region=region, is_fine=is_fine, fine_to_row=fine_to_row)
    return layout_index(cu_seqlens, lengths, shape, num_prefix, static, **maps)


def _check_index_args(mask, coarse_grid, ratio, num_prefix) -> None:
    """The arguments of ``mixed_scale_index`` (and of ``triton_mixed_scale_index``), with messages
    that say what was expected: ratio 0 used to return a layout, a long mask, a mask of another
    region count or num_prefix -1 failed with raw torch errors deep in the index maps. Host-side
    checks of Python values and tensor metadata only: no device sync."""

    def integer(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    grid_ok = isinstance(coarse_grid, (tuple, list, torch.Size)) and len(coarse_grid) == 2
    if not grid_ok or not all(integer(n) and n >= 1 for n in coarse_grid):
        raise ValueError(f"coarse_grid must be (h, w), two integers >= 1, got {coarse_grid!r}")
    if not integer(ratio) or ratio < 1:
        raise ValueError(f"ratio (coarse patch / fine patch) must be an integer >= 1, got {ratio!r}")
    if not integer(num_prefix) or num_prefix < 0:
        raise ValueError(f"num_prefix (prefix tokens per image) must be an integer >= 0, got {num_prefix!r}")
    n_regions = coarse_grid[0] * coarse_grid[1]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor [B, {n_regions}] (True = fine region), got {got}")
    if mask.dim() != 2 or mask.shape[1] != n_regions:
        raise ValueError(
            f"mask must have shape [B, {n_regions}]: one entry per region of the {coarse_grid[0]}x{coarse_grid[1]} "
            f"coarse grid, raster order; got {tuple(mask.shape)}"
        )
