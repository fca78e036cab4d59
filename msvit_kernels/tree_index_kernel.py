"""The packed layout of a tree of S scales on the device: ``scale_tree.tree_index`` in two Triton
launches and one host read (none with a ``varlen.StaticShape``).

Work items are the *roots* (``ScaleTree.roots`` per image: the coarsest regions, then the border
nodes of every finer scale), in packed order: scale ``S-1`` down, raster order in a scale. A root of
scale ``s`` owns the ``C_s = sum_k r**(2k)`` nodes of its subtree, and its tokens are a contiguous run
of packed rows in the subtree's pre-order. So each program takes a tile ``[BLOCK_Q roots, CP
candidates]``: a candidate is a node of the subtree, a token when every ancestor inside the subtree
splits and it does not (``S - 1`` gathers of the mask; the entry of a node of scale ``t`` lives at
``decision_offsets[t] + cell``).

1. ``_tree_counts_kernel`` (one program per image): each root's token count, their exclusive prefix
   sum in packed order (a running carry over root tiles) -> ``ROOT_START [B, R]``, the image's length,
   and ``(T, max_seqlen)`` by integer atomics (exact, order-free), read once by the host.
2. ``_tree_index_kernel`` (programs over root tiles x images): an image's first row is the sum of the
   lengths before it (each program adds them up: ``B`` int32 loads, no third launch for a scan); a
   token's row is its root's first row plus its rank among the subtree's tokens (a cumsum along the
   candidates), and it scatters its entry of every map. ``fine_to_row``: the token covering a finest
   cell is the last token at or before that cell in pre-order (the nodes between a token and its
   descendants are its descendants, never tokens), so a leaf writes ``first row + inclusive rank - 1``
   whether or not it is a token itself: no gather across the tile.

Design choices: one launch per kernel for every root scale. The candidates are those of the
*tallest* subtree (height ``S-1``, ``CP = next_power_of_2(C_{S-1})``) for every root; a root of scale
``s`` masks the candidates deeper than ``s``. Pre-order restricted to the nodes of depth ``<= s`` is
the pre-order of the height-``s`` subtree, so ranks are unchanged. A border root of a low scale
wastes most of its row of the tile; border roots are few (a strip one coarse patch wide per scale),
and one launch per root scale would double the launches (host time) and need a scan across them.
No table is built on the host or copied to the device: the candidate decode (pre-order index ->
depth, offset in the subtree) uses constexpr subtree sizes, and every per-scale size (grids, node
and decision offsets, root counts) is integer arithmetic on the finest grid ``(h0, w0)`` in
``static_range`` loops over the scales; the grid is a runtime argument, so one compile serves every
image size. The oracle is ``scale_tree.tree_index``: same ``MixedScaleIndex``, element for element
(with two scales, ``varlen.mixed_scale_index``'s, for which ``index_kernel`` stays the fast path).

With a static shape the maps are allocated at the capacity and their padding entries are filled by
torch before the second launch writes the real ones (image 0's first node of scale 1); stores past
the capacity are masked off (``check_capacity`` fails such a batch without a host read).

Eager calls launch the kernels directly; a traced call (``torch.compile``, ``torch.export``) goes
through the ops ``msvit::tree_counts`` and ``msvit::tree_maps`` (``_triton.kernel_op``: ``triton_op``s
an AOTInductor package compiles, docs/design.md section 14), the host read staying outside them.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._triton import INTERPRET, TritonKernel, kernel_op, recording, tl, traced, triton
from .scale_tree import ScaleTree
from .varlen import MixedScaleIndex, StaticShape, check_capacity, cu_seqlens_from_lengths, padded_cu_seqlens

if triton is not None:

    @triton.jit
    def _nodes(h0, w0, t: tl.constexpr, RATIO: tl.constexpr, SCALES: tl.constexpr):
        """Nodes of scale ``t`` (0 for t >= SCALES: no scale above the top)."""
        if t < SCALES:
            return (h0 // RATIO**t) * (w0 // RATIO**t)
        else:
            return h0 * 0

    @triton.jit
    def _scale(h0, w0, t: tl.constexpr, RATIO: tl.constexpr, SCALES: tl.constexpr):
        """Sizes of scale ``t``: (width, nodes, first node-table entry, first mask entry, roots, first
        root in packed order, parents' rows and columns times r (0 at the top: all roots))."""
        R2: tl.constexpr = RATIO * RATIO
        w = w0 // RATIO**t
        nodes = _nodes(h0, w0, t, RATIO, SCALES)
        node_start = h0 * 0
        for u in tl.static_range(t):
            node_start += _nodes(h0, w0, u, RATIO, SCALES)
        decision_start = h0 * 0
        root_start = h0 * 0
        for u in tl.static_range(t + 1, SCALES):
            decision_start += _nodes(h0, w0, u, RATIO, SCALES)
            root_start += _nodes(h0, w0, u, RATIO, SCALES) - R2 * _nodes(h0, w0, u + 1, RATIO, SCALES)
        roots = nodes - R2 * _nodes(h0, w0, t + 1, RATIO, SCALES)
        if t + 1 < SCALES:
            parent_h = (h0 // RATIO ** (t + 1)) * RATIO
            parent_w = (w0 // RATIO ** (t + 1)) * RATIO
        else:
            parent_h = h0 * 0
            parent_w = h0 * 0
        return w, nodes, node_start, decision_start, roots, root_start, parent_h, parent_w

    @triton.jit
    def _candidates(CP: tl.constexpr, RATIO: tl.constexpr, SCALES: tl.constexpr):
        """Pre-order index ``c`` of a subtree of height ``SCALES - 1`` -> (in the subtree, depth,
        row and column offset inside the ``r**depth`` square below the root, ``r**depth``)."""
        R2: tl.constexpr = RATIO * RATIO
        HEIGHT: tl.constexpr = SCALES - 1
        c = tl.arange(0, CP)
        rem = c
        depth = c * 0
        dy = c * 0
        dx = c * 0
        factor = c * 0 + 1
        for level in tl.static_range(HEIGHT):
            size = (R2 ** (HEIGHT - level) - 1) // (R2 - 1)  # subtree of a depth level+1 node
            below = rem > 0
            step = tl.maximum(rem - 1, 0)
            child = step // size
            dy = tl.where(below, dy * RATIO + child // RATIO, dy)
            dx = tl.where(below, dx * RATIO + child % RATIO, dx)
            factor = tl.where(below, factor * RATIO, factor)
            depth += below.to(tl.int32)
            rem = tl.where(below, step - child * size, rem)
        SUBTREE: tl.constexpr = (R2 ** SCALES - 1) // (R2 - 1)
        return c < SUBTREE, depth, dy, dx, factor

    @triton.jit
    def _roots(q, h0, w0, RATIO: tl.constexpr, SCALES: tl.constexpr):
        """Root ``q`` (packed order) -> (scale, row, column); scale -1 past the last root."""
        scale = q * 0 - 1
        ry = q * 0
        rx = q * 0
        for t in tl.static_range(SCALES):
            w, nodes, node_start, decision_start, roots, root_start, parent_h, parent_w = _scale(
                h0, w0, t, RATIO, SCALES
            )
            i = q - root_start
            here = (i >= 0) & (i < roots)
            side = w - parent_w  # roots in each row beside the parents' block
            beside = parent_h * side
            j = i - beside
            y = tl.where(i < beside, i // tl.maximum(side, 1), parent_h + j // tl.maximum(w, 1))
            x = tl.where(i < beside, parent_w + i % tl.maximum(side, 1), j % tl.maximum(w, 1))
            scale = tl.where(here, t, scale)
            ry = tl.where(here, y, ry)
            rx = tl.where(here, x, rx)
        return scale, ry, rx

    @triton.jit
    def _tokens(MASK, image, root_scale, ry, rx, h0, w0, stride_mb, stride_mj,
                CP: tl.constexpr, RATIO: tl.constexpr, SCALES: tl.constexpr):
        """The candidates of a tile of roots: (token, candidate exists, scale, row, column) ``[Q, CP]``."""
        inside, depth, dy, dx, factor = _candidates(CP, RATIO, SCALES)
        rs = root_scale[:, None]
        valid = (rs >= 0) & inside[None, :] & (depth[None, :] <= rs)
        scale = rs - depth[None, :]
        y = ry[:, None] * factor[None, :] + dy[None, :]
        x = rx[:, None] * factor[None, :] + dx[None, :]
        reach = valid
        split = scale < -SCALES  # all False
        cy = y
        cx = x
        for t in tl.static_range(1, SCALES):
            w, nodes, node_start, decision_start, roots, root_start, parent_h, parent_w = _scale(
                h0, w0, t, RATIO, SCALES
            )
            own = scale == t
            cy = tl.where(own, y, cy // RATIO)  # the ancestor (or self) at scale t, once t >= scale
            cx = tl.where(own, x, cx // RATIO)
            chain = valid & (scale <= t) & (rs >= t)
            entry = decision_start + cy * w + cx
            m = tl.load(MASK + image * stride_mb + entry * stride_mj, mask=chain, other=0) != 0
            split = split | (chain & own & m)
            reach = reach & ((~chain) | own | m)
        return reach & (~split), valid, scale, y, x

    @triton.jit
    def _tree_counts_kernel(
        MASK, ROOT_START, LENGTHS, STATS,
        n_roots, h0, w0, num_prefix, stride_mb, stride_mj,
        RATIO: tl.constexpr, SCALES: tl.constexpr, CP: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        """One program per image. ROOT_START int32 ``[B, R]``: each root's first patch token in its
        image; LENGTHS int32 ``[B]``; STATS int64 ``[2]`` (zeroed) += (length, max with length)."""
        image = tl.program_id(0)
        carry = tl.full([], 0, tl.int32)
        for q0 in range(0, n_roots, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            root_scale, ry, rx = _roots(q, h0, w0, RATIO, SCALES)
            root_scale = tl.where(q < n_roots, root_scale, -1)
            token, valid, scale, y, x = _tokens(MASK, image, root_scale, ry, rx, h0, w0, stride_mb, stride_mj,
                                                CP, RATIO, SCALES)
            count = tl.sum(token.to(tl.int32), 1)
            tl.store(ROOT_START + image * n_roots + q, carry + tl.cumsum(count, 0) - count, mask=q < n_roots)
            carry += tl.sum(count, 0)
        length = carry + num_prefix
        tl.store(LENGTHS + image, length)
        tl.atomic_add(STATS, length.to(tl.int64))
        tl.atomic_max(STATS + 1, length.to(tl.int64))

    @triton.jit
    def _tree_index_kernel(
        MASK, ROOT_START, LENGTHS, CU_SEQLENS,
        ROWS, SOURCE, POSITION, REGION, IS_FINE, SCALE, PREFIX_ROWS, ROW_IMAGE, FINE_TO_ROW,
        batch, n_roots, h0, w0, num_prefix, total, stride_mb, stride_mj,
        RATIO: tl.constexpr, SCALES: tl.constexpr, CP: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program: BLOCK_Q roots of one image; writes the entries of their tokens, the rows of
        their finest cells, and (first program of the image) its ``cu_seqlens`` and prefix rows."""
        image = tl.program_id(1)
        image64 = image.to(tl.int64)
        before = tl.zeros([BLOCK_B], dtype=tl.int64)
        for b0 in range(0, image, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            before += tl.load(LENGTHS + offs_b, mask=offs_b < image, other=0).to(tl.int64)
        seq_start = tl.sum(before, 0)
        if tl.program_id(0) == 0:
            length = tl.load(LENGTHS + image).to(tl.int64)
            tl.store(CU_SEQLENS + image + 1, (seq_start + length).to(tl.int32))
            if image == 0:
                tl.store(CU_SEQLENS, 0)
            offs_p = tl.arange(0, BLOCK_P)
            mask_p = (offs_p < num_prefix) & (seq_start + offs_p < total)
            tl.store(PREFIX_ROWS + image64 * num_prefix + offs_p, seq_start + offs_p, mask=offs_p < num_prefix)
            tl.store(ROW_IMAGE + seq_start + offs_p, image64 + offs_p * 0, mask=mask_p)

        q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask_q = q < n_roots
        root_scale, ry, rx = _roots(q, h0, w0, RATIO, SCALES)
        root_scale = tl.where(mask_q, root_scale, -1)
        token, valid, scale, y, x = _tokens(MASK, image, root_scale, ry, rx, h0, w0, stride_mb, stride_mj,
                                            CP, RATIO, SCALES)
        first = seq_start + num_prefix + tl.load(ROOT_START + image * n_roots + q, mask=mask_q, other=0).to(tl.int64)
        # the last token at or before each candidate in pre-order: the token itself, or the one covering it
        row = first[:, None] + (tl.cumsum(token.to(tl.int32), 1) - 1).to(tl.int64)
        width = scale * 0
        node_start = scale * 0
        nodes = scale * 0
        for t in tl.static_range(SCALES):
            w_t, n_t, start_t, decision_start, roots, root_start, parent_h, parent_w = _scale(
                h0, w0, t, RATIO, SCALES
            )
            width = tl.where(scale == t, w_t, width)
            node_start = tl.where(scale == t, start_t, node_start)
            nodes = tl.where(scale == t, n_t, nodes)
        top_w, top_n, top_start, top_d, top_roots, top_root_start, top_h, top_pw = _scale(
            h0, w0, SCALES - 1, RATIO, SCALES
        )
        cell = (y * width + x).to(tl.int64)
        region = tl.where(root_scale == SCALES - 1, image64 * top_n + ry * top_w + rx, -1 - image64)
        store = token & (row < total)
        patch = row - (image64 + 1) * num_prefix  # patch tokens of earlier images and this one's before it
        tl.store(ROWS + patch, row, mask=store)
        tl.store(SOURCE + patch, batch * node_start + image64 * nodes + cell, mask=store)
        tl.store(POSITION + patch, node_start + cell, mask=store)
        tl.store(REGION + patch, region[:, None] + patch * 0, mask=store)
        tl.store(IS_FINE + patch, (scale == 0).to(tl.uint8), mask=store)
        tl.store(SCALE + patch, scale.to(tl.int64), mask=store)
        tl.store(ROW_IMAGE + row, image64 + patch * 0, mask=store)
        tl.store(FINE_TO_ROW + image64 * (h0 * w0) + y * w0 + x, row, mask=valid & (scale == 0))


# The launchers fix every tile (no autotuning: both kernels are a few microseconds).
_TREE_COUNTS = None if triton is None else TritonKernel(_tree_counts_kernel)
_TREE_INDEX = None if triton is None else TritonKernel(_tree_index_kernel)

TILE = 1024  # candidates per program on a GPU (roots x padded subtree): no spills (compile report, sm_70/75/90)
INTERPRET_TILE = 8192  # the interpreter pays per program, not per element
LENGTHS_BLOCK = 256  # image lengths summed per step for an image's first row (fixed: no compile per batch size)


def _candidate_block(tree: ScaleTree) -> int:
    r2 = tree.ratio**2
    return triton.next_power_of_2((r2**tree.scales - 1) // (r2 - 1))


def _root_block(tree: ScaleTree) -> int:
    tile = INTERPRET_TILE if INTERPRET else TILE
    return max(1, min(triton.next_power_of_2(max(tree.roots, 1)), tile // _candidate_block(tree)))


def _counts(
    mask: Tensor, tree: ScaleTree, num_prefix: int, shape: Optional[StaticShape] = None
) -> Tuple[Tensor, Tensor, StaticShape]:
    """Each root's first patch token in its image ``[B, R]`` and each image's length ``[B]`` (one
    launch), and the batch's shape: read once from the device, or ``shape`` (checked on the device)."""
    launch = _counts_op if traced(mask) else _launch_counts  # traced: a triton_op the graph records
    root_start, lengths, stats = launch(mask, *tree.grids[0], tree.ratio, tree.scales, num_prefix)
    if shape is not None:
        check_capacity(stats[0], shape.capacity)
        return root_start, lengths, shape
    total, max_seqlen = stats.tolist()  # the forward's one host read
    return root_start, lengths, StaticShape(total, max_seqlen, 0)


def _launch_counts(mask: Tensor, h0: int, w0: int, ratio: int, scales: int, num_prefix: int) -> Tuple[
        Tensor, Tensor, Tensor]:
    """root_start int32 ``[B, R]``, lengths int32 ``[B]`` and stats int64 ``[2]`` = (T, max_seqlen)
    of the tree ``ScaleTree.of((h0, w0), ratio, scales)`` (plain values: an op's arguments)."""
    tree = ScaleTree.of((h0, w0), ratio, scales)
    batch = mask.shape[0]
    device = mask.device
    root_start = torch.empty(batch, tree.roots, dtype=torch.int32, device=device)
    lengths = torch.empty(batch, dtype=torch.int32, device=device)
    stats = torch.zeros(2, dtype=torch.int64, device=device)
    if batch:
        _TREE_COUNTS[(batch,)](
            mask.view(torch.uint8), root_start, lengths, stats, tree.roots, h0, w0, num_prefix, *mask.stride(),
            RATIO=tree.ratio, SCALES=tree.scales, CP=_candidate_block(tree), BLOCK_Q=_root_block(tree),
        )
        if recording():  # nothing ran: give the counts a launch would have written, so shapes downstream are real
            _record_stand_in(mask, tree, num_prefix, root_start, lengths, stats)
    return root_start, lengths, stats


@kernel_op("msvit::tree_counts", [_TREE_COUNTS])
def _counts_op(mask: Tensor, h0: int, w0: int, ratio: int, scales: int, num_prefix: int) -> Tuple[
        Tensor, Tensor, Tensor]:
    """``_launch_counts`` as an op: what ``torch.export`` records (AOTInductor compiles the kernel)."""
    return _launch_counts(mask, h0, w0, ratio, scales, num_prefix)


def _record_stand_in(mask, tree, num_prefix, root_start, lengths, stats) -> None:
    """What ``_tree_counts_kernel`` writes, computed by torch (under ``_triton.record_launches`` only:
    the host-overhead benchmark runs the CUDA code path on CPU with launches recorded). No host read."""
    device = mask.device
    layout = tree.layout(device)
    valid = torch.cat(tree.token_weights(mask), 1)[:, layout.order].to(torch.int32)  # packed order
    rank = torch.cumsum(valid, 1) - valid
    is_root = torch.cat([tree.parents(s, device) < 0 for s in range(tree.scales)])[layout.order]
    # roots in packed order (a stable sort puts them first: a boolean index would read its size)
    at = torch.argsort((~is_root).to(torch.uint8), stable=True)[: tree.roots]
    root_start.copy_(rank[:, at])
    length = num_prefix + valid.sum(1)
    lengths.copy_(length)
    stats.copy_(torch.stack([length.sum(), length.max()]).long())


def _index_maps(mask: Tensor, tree: ScaleTree, num_prefix: int, root_start: Tensor, lengths: Tensor,
                shape: StaticShape) -> MixedScaleIndex:
    """Every index map of the batch from ``_counts``' offsets (the second launch)."""
    launch = _maps_op if traced(mask) else _launch_maps  # traced: a triton_op the graph records
    cu_seqlens, rows, source, position, region, is_fine, scale, prefix_rows, row_image, fine_to_row = launch(
        mask, root_start, lengths, *tree.grids[0], tree.ratio, tree.scales, num_prefix, shape.capacity,
        shape.padding_sequences,
    )
    return MixedScaleIndex(
        cu_seqlens=padded_cu_seqlens(cu_seqlens, shape), max_seqlen=shape.max_seqlen, total=shape.capacity,
        rows=rows, source=source, position=position, region=region, is_fine=is_fine.view(torch.bool),
        prefix_rows=prefix_rows, row_image=row_image, fine_to_row=fine_to_row,
        padding_sequences=shape.padding_sequences, scale=scale,
    )


def _launch_maps(mask: Tensor, root_start: Tensor, lengths: Tensor, h0: int, w0: int, ratio: int, scales: int,
                 num_prefix: int, total: int, padding_sequences: int) -> Tuple[Tensor, ...]:
    """cu_seqlens int32 ``[B + 1]`` and the maps (rows, source, position, region, is_fine as uint8,
    scale, prefix_rows, row_image, fine_to_row) of ``total`` packed rows."""
    tree = ScaleTree.of((h0, w0), ratio, scales)
    batch = mask.shape[0]
    device = mask.device
    n_patch = total - batch * num_prefix
    n_fine = tree.counts[0]
    # under record_launches nothing writes the maps: zeros keep the ops that index with them valid
    empty = torch.zeros if recording() or not batch else torch.empty
    prefix_rows = empty(batch, num_prefix, dtype=torch.int64, device=device)
    fine_to_row = empty(batch, n_fine, dtype=torch.int64, device=device)
    cu_seqlens = empty(batch + 1, dtype=torch.int32, device=device)
    if padding_sequences:  # padding entries keep these values; the kernel writes the real ones
        rows = torch.arange(batch * num_prefix, total, device=device)
        source = torch.full((n_patch,), batch * n_fine, dtype=torch.int64, device=device)
        position = torch.full((n_patch,), n_fine, dtype=torch.int64, device=device)
        region = torch.zeros(n_patch, dtype=torch.int64, device=device)
        scale = torch.ones(n_patch, dtype=torch.int64, device=device)
        row_image = torch.full((total,), batch, dtype=torch.int64, device=device)
        is_fine = torch.zeros(n_patch, dtype=torch.uint8, device=device)
    else:
        rows, source, position, region, scale = (empty(n_patch, dtype=torch.int64, device=device) for _ in range(5))
        row_image = empty(total, dtype=torch.int64, device=device)
        is_fine = empty(n_patch, dtype=torch.uint8, device=device)  # bytes: no i1 pointers in kernels
    if batch:
        block_q = _root_block(tree)
        _TREE_INDEX[(max(1, triton.cdiv(tree.roots, block_q)), batch)](
            mask.view(torch.uint8), root_start, lengths, cu_seqlens, rows, source, position, region, is_fine, scale,
            prefix_rows, row_image, fine_to_row, batch, tree.roots, h0, w0, num_prefix, total, *mask.stride(),
            RATIO=tree.ratio, SCALES=tree.scales, CP=_candidate_block(tree), BLOCK_Q=block_q,
            BLOCK_B=LENGTHS_BLOCK, BLOCK_P=triton.next_power_of_2(max(num_prefix, 1)),
        )
        if recording():  # the offsets the launch would have written (downstream ops index with them)
            cu_seqlens.copy_(cu_seqlens_from_lengths(lengths))
    return cu_seqlens, rows, source, position, region, is_fine, scale, prefix_rows, row_image, fine_to_row


@kernel_op("msvit::tree_maps", [_TREE_INDEX])
def _maps_op(mask: Tensor, root_start: Tensor, lengths: Tensor, h0: int, w0: int, ratio: int, scales: int,
             num_prefix: int, total: int, padding_sequences: int) -> Tuple[
                 Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_launch_maps`` as an op: what ``torch.export`` records (AOTInductor compiles the kernel)."""
    return _launch_maps(mask, root_start, lengths, h0, w0, ratio, scales, num_prefix, total, padding_sequences)


def triton_tree_index(
    mask: Tensor, tree: ScaleTree, num_prefix: int, shape: Optional[StaticShape] = None
) -> MixedScaleIndex:
    """``scale_tree.tree_index`` with the Triton kernels; same arguments, same result.

    mask: bool ``[B, D]`` split decisions (``tree.decisions`` per image, coarsest scale first) on CUDA
    (CPU only under TRITON_INTERPRET=1); tree: the ``ScaleTree`` of the image size; num_prefix: P;
    shape: a ``varlen.StaticShape`` (no host read) or None (exact shape, one host read).
    """
    _check_tree_args(mask, tree, num_prefix, shape)
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or pip install .[triton])")
    static = shape is not None
    root_start, lengths, shape = _counts(mask, tree, num_prefix, shape)
    index = _index_maps(mask, tree, num_prefix, root_start, lengths, shape)
    return index._replace(static=static)


def _check_tree_args(mask, tree, num_prefix, shape) -> None:
    """Host-side checks of Python values and tensor metadata only (no device sync), with messages that
    say what was expected."""
    if not isinstance(tree, ScaleTree):
        raise TypeError(f"tree must be a scale_tree.ScaleTree (ScaleTree.of(fine_grid, ratio, scales)), got {tree!r}")
    if tree.scales < 2 or tree.ratio < 2 or tree.grids != ScaleTree.of(tree.grids[0], tree.ratio, tree.scales).grids:
        raise ValueError(f"tree must be built by ScaleTree.of (grids h0 // r**s, w0 // r**s, 2+ scales), got {tree!r}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix (prefix tokens per image) must be an integer >= 0, got {num_prefix!r}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor [B, {tree.decisions}] (True = split), got {got}")
    if mask.dim() != 2 or mask.shape[1] != tree.decisions:
        raise ValueError(
            f"mask must have shape [B, {tree.decisions}]: one entry per splittable node of the "
            f"{'x'.join(map(str, tree.grids[0]))} tree of {tree.scales} scales (coarsest scale first); "
            f"got {tuple(mask.shape)}"
        )
    if shape is not None and not isinstance(shape, StaticShape):
        raise TypeError(f"shape must be a varlen.StaticShape (scale_tree.tree_static_shape) or None, got {shape!r}")
    if mask.device.type != "cuda" and not (INTERPRET and mask.device.type == "cpu") and not recording():
        raise RuntimeError(
            f"the Triton tree index runs on CUDA GPUs, not on {mask.device.type}; on CPU it runs only under "
            "TRITON_INTERPRET=1 set before importing msvit_kernels (slow, meant for tests)"
        )
