"""Gather, embed and pack the surviving tokens of a mixed-scale batch in one Triton kernel.

Every patch token of a ``MixedScaleIndex`` gathers its pixels from the NCHW image: a fine patch
(``S_f x S_f x C``), or a coarse patch area-averaged down to ``S_f x S_f`` on the fly (the r x r
pixels of each output pixel summed in raster order, then divided by r*r: exactly ``avg_pool2d``,
Eq. 5), in (C, p, p) order. It multiplies them by the shared embedding (``tl.dot``), adds the bias
and its row of the position table (fine rows, then the resampled coarse rows), scales the result by
its straight-through value (fine: st, coarse: 1 - st of its region) and writes its packed row.
Programs tile tokens x embedding channels; prefix rows are copied in place after the launch.
The oracle is ``reference.pack_reference``.

More scales (``scales`` 3 or 4, a ``scale_tree.tree_index`` layout, docs/design.md section 10): a
token's scale ``s`` and cell come from its node-table row (``position``), its patch is
``p * r**s`` px averaged over ``r**s x r**s`` taps (raster order, then divided by ``r**(2s)``), and
``st`` is the token-weight table ``[B, n_nodes]``: the token is multiplied by its image's entry.

Backward (torch, on pixels re-gathered with ``reference.gather_patches_reference``): gradients for
the embedding weight and bias, the position table, the straight-through values (the gate's path)
and the prefix tokens; none for the pixels.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import (
    TritonKernel,
    check_launchable,
    dot_precision,
    half_on_ampere,
    kernel_op,
    patch_features,
    skips_custom_op,
    tl,
    triton,
)
from .reference import gather_flat_patches_reference, gather_patches_reference
from .scale_tree import ScaleTree
from .varlen import MixedScaleIndex

# Scales the kernel reads a node table of: the tap loop, the scale selects and the
# node_2 / node_3 / grid_w2 / grid_w3 arguments stop at patch sizes p .. p*r**3 (APT's 16/32/64 px is 3).
MAX_SCALES = 4

if triton is not None:

    @triton.jit
    def _pack_kernel(
        IMG, ROWS, POSITION, REGION, W, BIAS, POS, ST, OUT, NODE_PIXELS,
        n_tokens, n_coarse, n_fine, fine_w, coarse_w, dim, node_2, node_3, grid_w2, grid_w3, n_nodes,
        stride_ib, stride_ic, stride_ih, stride_iw, stride_wo, stride_wi,
        stride_pr, stride_pd, stride_ot, stride_od,
        PATCH: tl.constexpr, RATIO: tl.constexpr, K: tl.constexpr, SCALES: tl.constexpr, SIDE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_ST: tl.constexpr, LIST: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program: BLOCK_T patch tokens (packed order) x BLOCK_D embedding channels.

        POSITION is the token's position-table row: its fine cell (< n_fine) or n_fine + region
        cell; REGION is ``image * n_coarse + region cell``, or ``-1 - image`` for a border cell (no
        region, straight-through value 1): the token's image comes from it, no other load.

        SCALES > 2: n_coarse counts the coarsest scale's nodes (REGION's unit), POSITION is a node-table
        row; n_fine, node_2, node_3 are the first rows of scales 1, 2, 3, fine_w, coarse_w, grid_w2,
        grid_w3 the grid widths of scales 0 .. 3; SIDE = RATIO**(SCALES-1), the widest tap grid; ST is
        ``[B, n_nodes]``. SCALES == 2 compiles exactly the two-scale kernel (the other branches vanish).

        LIST (a list of images of different sizes, docs/design.md section 11): IMG is one flat pixel
        buffer, POSITION a global node, NODE_PIXELS ``[4, n_nodes]`` every node's pixel origin, row
        stride (its image's width), channel stride (its image's area) and averaging factor r**s,
        ST the flat token weights ``[n_nodes]``; n_nodes is NODE_PIXELS's row length.
        """
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_t = offs_t < n_tokens
        mask_d = offs_d < dim
        position = tl.load(POSITION + offs_t, mask=mask_t, other=0)
        region = tl.load(REGION + offs_t, mask=mask_t, other=0)
        image = tl.where(region >= 0, region // n_coarse, -1 - region)
        if SCALES == 2:
            cell = region % n_coarse  # read for coarse tokens only (border cells are fine)
            fine = position < n_fine
            # top-left pixel of the token and the pixel step between its S_f x S_f samples
            y0 = tl.where(fine, (position // fine_w) * PATCH, (cell // coarse_w) * (PATCH * RATIO))
            x0 = tl.where(fine, (position % fine_w) * PATCH, (cell % coarse_w) * (PATCH * RATIO))
            step = tl.where(fine, 1, RATIO)
        else:  # the node table is scale-major (finest first): the scale is how many first rows it passed
            above_1, above_2 = position >= n_fine, position >= node_2
            step = tl.where(above_2, RATIO * RATIO, tl.where(above_1, RATIO, 1))  # r**s
            first = tl.where(above_2, node_2, tl.where(above_1, n_fine, 0))
            grid_w = tl.where(above_2, grid_w2, tl.where(above_1, coarse_w, fine_w))
            if SCALES > 3:
                above_3 = position >= node_3
                step = tl.where(above_3, RATIO * RATIO * RATIO, step)
                first = tl.where(above_3, node_3, first)
                grid_w = tl.where(above_3, grid_w3, grid_w)
            cell = position - first
            y0 = (cell // grid_w) * (PATCH * step)
            x0 = (cell % grid_w) * (PATCH * step)
        base = IMG + image * stride_ib + y0 * stride_ih + x0 * stride_iw
        if LIST:  # the token's node carries its pixel origin and its image's strides (the maps above go unused)
            # a 64-bit origin (a flat buffer of many images); strides within one image fit 32 bits, which
            # keeps the [BLOCK_T, BLOCK_K] offsets 32-bit (64-bit ones spilled on sm_70/75)
            base = IMG + tl.load(NODE_PIXELS + position, mask=mask_t, other=0)
            row = tl.load(NODE_PIXELS + n_nodes + position, mask=mask_t, other=0).to(tl.int32)
            area = tl.load(NODE_PIXELS + 2 * n_nodes + position, mask=mask_t, other=0).to(tl.int32)
            step = tl.load(NODE_PIXELS + 3 * n_nodes + position, mask=mask_t, other=1).to(tl.int32)

        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k, mask_k, chan, py, px = patch_features(k0, K, PATCH, BLOCK_K)
            ptr = (base[:, None] + chan[None, :] * stride_ic + (step[:, None] * py[None, :]) * stride_ih
                   + (step[:, None] * px[None, :]) * stride_iw)
            mask = mask_t[:, None] & mask_k[None, :]
            if LIST:
                pix = _list_pixels(base, row, area, step, chan, py, px, mask, SIDE, BLOCK_T, BLOCK_K)
            elif SCALES == 2:
                pix = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
                if RATIO > 1:  # the other r*r - 1 taps of a coarse pixel; masked off for fine tokens
                    coarse = mask & (position >= n_fine)[:, None]
                    for tap in tl.static_range(1, RATIO * RATIO):
                        pix += tl.load(ptr + (tap // RATIO) * stride_ih + (tap % RATIO) * stride_iw,
                                       mask=coarse, other=0.0).to(tl.float32)
                    pix = tl.where(fine[:, None], pix, pix / (RATIO * RATIO))
            else:  # r**s x r**s taps in raster order over the widest grid, the token's own unmasked
                # (masked taps add exact zeros, so each token sums its taps in its own raster order);
                # one runtime loop (64 taps at S = 4 would unroll into 64 loads per feature block; two
                # nested loops spilled 664 B in the fp16 64x64x64 tile on sm_90, the compile report)
                pix = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
                for tap in range(0, SIDE * SIDE):
                    ty, tx = tap // SIDE, tap % SIDE
                    pix += tl.load(ptr + ty * stride_ih + tx * stride_iw, mask=mask & ((ty < step) & (tx < step))[:, None],
                                   other=0.0).to(tl.float32)
                pix = pix / (step * step).to(tl.float32)[:, None]
            wt = tl.load(W + offs_d[None, :] * stride_wo + offs_k[:, None] * stride_wi,
                         mask=mask_d[None, :] & mask_k[:, None], other=0.0)
            acc += tl.dot(pix.to(wt.dtype), wt, input_precision=DOT_PRECISION)

        mask = mask_t[:, None] & mask_d[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if HAS_POS:
            acc += tl.load(POS + position[:, None] * stride_pr + offs_d[None, :] * stride_pd, mask=mask,
                           other=0.0).to(tl.float32)
        if HAS_ST:
            if LIST:  # the flat token weight of its global node
                acc *= tl.load(ST + position, mask=mask_t, other=1.0).to(tl.float32)[:, None]
            elif SCALES == 2:
                st = tl.load(ST + region, mask=mask_t & (region >= 0), other=1.0).to(tl.float32)
                acc *= tl.where(fine, st, 1.0 - st)[:, None]
            else:  # the token weight of its (image, node)
                acc *= tl.load(ST + image * n_nodes + position, mask=mask_t, other=1.0).to(tl.float32)[:, None]
        rows = tl.load(ROWS + offs_t, mask=mask_t, other=0)
        tl.store(OUT + rows[:, None] * stride_ot + offs_d[None, :] * stride_od, acc.to(OUT.dtype.element_ty), mask=mask)


    @triton.jit
    def _list_pixels(base, row, area, step, chan, py, px, mask, SIDE: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """The ``[BLOCK_T, BLOCK_K]`` pixels of a list's tokens: each token's r**s x r**s taps in raster
        order (as SCALES > 2), with its own image's row and channel strides."""
        ptr = base[:, None] + (chan[None, :] * area[:, None] + (step[:, None] * py[None, :]) * row[:, None]
                               + step[:, None] * px[None, :])
        pix = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for tap in range(0, SIDE * SIDE):
            ty, tx = tap // SIDE, tap % SIDE
            pix += tl.load(ptr + ty * row[:, None] + tx, mask=mask & ((ty < step) & (tx < step))[:, None],
                           other=0.0).to(tl.float32)
        return pix / (step * step).to(tl.float32)[:, None]


def _half_on_ampere_batch(capability: int, meta: dict) -> bool:
    """``half_on_ampere`` for a ``[B, C, H, W]`` batch: a list's per-token strides spill this tile
    (104 B on sm_80 in the compile report)."""
    return half_on_ampere(capability, meta) and not meta.get("LIST")


def _not_fp32_list(capability: int, meta: dict) -> bool:
    """The 64 x 64 x 32 tile except for a list in fp32 (IEEE dots): its per-token strides spilled
    8-24 B on sm_86/89/90 in the compile report (2026-12-07); the 32-token tile is clean there."""
    return not (meta.get("LIST") and meta.get("DOT_PRECISION") == "ieee")


# GPU tiles, autotuned; see launch.TritonKernel for how a GPU generation picks its subset. The
# compile report (bench/results/compile) keeps every listed config at zero spills where it may run:
# the wide tiles spill 1-10 KB per thread in fp32 and on sm_70/75, so they run on sm_80+ in fp16/bf16.
_CONFIGS = [] if triton is None else [
    (triton.Config({"BLOCK_T": 64, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2), half_on_ampere),
    (triton.Config({"BLOCK_T": 64, "BLOCK_D": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2), _half_on_ampere_batch),
    (triton.Config({"BLOCK_T": 64, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1), _not_fp32_list),
    (triton.Config({"BLOCK_T": 32, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1), None),
]
_PACK = None if triton is None else TritonKernel(
    _pack_kernel, _CONFIGS, key=["K", "dim", "RATIO", "SCALES"], interpret_meta={"BLOCK_T": 64, "BLOCK_D": 64, "BLOCK_K": 64})


def _geometry(height: int, width: int, fine_patch: int, ratio: int, scales: int):
    """The kernel's grid arguments (n_coarse, n_fine, fine_w, coarse_w, node_2, node_3, grid_w2,
    grid_w3, n_nodes), from shapes only (no host read). Two scales: today's values and zeros."""
    if scales == 2:
        fine_w, coarse_w = width // fine_patch, width // (fine_patch * ratio)
        n_fine = (height // fine_patch) * fine_w
        n_coarse = (height // (fine_patch * ratio)) * coarse_w
        return max(n_coarse, 1), n_fine, fine_w, coarse_w, 0, 0, 0, 0, 0
    tree = ScaleTree.of((height // fine_patch, width // fine_patch), ratio, scales)
    starts, widths = tree.offsets, [w for _, w in tree.grids] + [0]
    node_3 = starts[3] if scales > 3 else starts[-1]  # never passed at S = 3: scale 3 has no rows
    return (max(tree.counts[-1], 1), starts[1], widths[0], widths[1], starts[2], node_3, widths[2], widths[3],
            starts[-1])


def _pack_forward(images, weight, bias, pos_table, st, prefix, rows, position, region, prefix_rows, total,
                  fine_patch, ratio, scales=2, node_pixels=None) -> Tensor:
    check_launchable(images)
    if node_pixels is not None:  # a list: the flat pixel buffer; the node table carries the geometry
        chans = weight.shape[1] // (fine_patch * fine_patch)
        geometry = (1, 0, 1, 1, 0, 0, 1, 1, node_pixels.shape[1])  # unused by LIST; no division by zero
    else:
        batch, chans, height, width = images.shape
        geometry = _geometry(height, width, fine_patch, ratio, scales)
    dim = weight.shape[0]
    out = images.new_empty(total, dim)
    n_tokens = rows.numel()
    if n_tokens:
        dummy = weight  # stands in for absent optional tensors; never read (HAS_* is False)
        _PACK[lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]), triton.cdiv(dim, meta["BLOCK_D"]))](
            images, rows, position, region, weight, dummy if bias is None else bias,
            dummy if pos_table is None else pos_table, dummy if st is None else st, out,
            rows if node_pixels is None else node_pixels,
            n_tokens, *geometry[:4], dim, *geometry[4:],
            *(images.stride() if node_pixels is None else (0, 0, 0, 0)), *weight.stride(),
            *(pos_table.stride() if pos_table is not None else (0, 0)),
            *out.stride(), PATCH=fine_patch, RATIO=ratio, K=chans * fine_patch * fine_patch,
            SCALES=scales, SIDE=ratio ** (scales - 1),
            HAS_BIAS=bias is not None, HAS_POS=pos_table is not None, HAS_ST=st is not None,
            LIST=node_pixels is not None, DOT_PRECISION=dot_precision(weight.dtype),
        )
    if prefix is not None:
        out[prefix_rows] = prefix.to(out.dtype)
    return out


@kernel_op("msvit::gather_embed_pack", [_PACK])
def _pack_op(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_table: Optional[Tensor],
             st: Optional[Tensor], prefix: Optional[Tensor], rows: Tensor, source: Tensor, position: Tensor,
             region: Tensor, prefix_rows: Tensor, total: int, fine_patch: int,
             ratio: int, scales: int, node_pixels: Optional[Tensor] = None) -> Tensor:
    """Packed tokens ``[total, d]``; see :func:`gather_embed_pack` (``source`` serves the backward)."""
    return _pack_forward(images, weight, bias, pos_table, st, prefix, rows, position, region, prefix_rows,
                         total, fine_patch, ratio, scales, node_pixels)


@_pack_op.register_fake
def _(images, weight, bias, pos_table, st, prefix, rows, source, position, region, prefix_rows, total,
      fine_patch, ratio, scales, node_pixels=None):
    return images.new_empty(total, weight.shape[0])


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_table, st, prefix, rows, source, position, region, prefix_rows, *sizes = inputs
    node_pixels = sizes[4] if len(sizes) > 4 else None
    ctx.save_for_backward(images, weight, bias, pos_table, st, rows, source, position, region, prefix_rows,
                          node_pixels)
    ctx.fine_patch, ctx.ratio, ctx.scales = sizes[1], sizes[2], sizes[3]
    ctx.has_prefix = prefix is not None


def _backward(ctx, grad_out):
    images, weight, bias, pos_table, st, rows, source, position, region, prefix_rows, node_pixels = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_tokens = grad_out.index_select(0, rows)  # [Np, d]
    d_weight = d_bias = d_pos = d_st = d_prefix = None
    pixels = None
    if need[1] or (st is not None and need[4]):
        if node_pixels is not None:
            chans = weight.shape[1] // (ctx.fine_patch * ctx.fine_patch)
            side = ctx.ratio ** (ctx.scales - 1)
            pixels = gather_flat_patches_reference(images, node_pixels, source, ctx.fine_patch, chans, side)
        else:
            pixels = gather_patches_reference(images, source, ctx.fine_patch, ctx.ratio, ctx.scales)
        pixels = pixels.to(weight.dtype)
    if st is not None and node_pixels is not None:  # a list: st is the flat token weight of every node
        if need[4]:
            d_value = (grad_tokens.float() * _unscaled(pixels, weight, bias, pos_table, position).float()).sum(1)
            d_st = torch.zeros(st.shape, dtype=torch.float32, device=st.device)
            d_st = d_st.index_add_(0, position, d_value).to(st.dtype)
        grad_tokens = grad_tokens * st.index_select(0, position).to(grad_tokens.dtype)[:, None]
    elif st is not None and st.numel() and ctx.scales > 2:  # st: the token weights [B * n_nodes]
        n_top, n_nodes = (_geometry(*images.shape[2:], ctx.fine_patch, ctx.ratio, ctx.scales)[i] for i in (0, 8))
        entry = torch.where(region >= 0, region // n_top, -1 - region) * n_nodes + position
        if need[4]:  # d st[image, node] += <grad, unscaled token>
            d_value = (grad_tokens.float() * _unscaled(pixels, weight, bias, pos_table, position).float()).sum(1)
            d_st = torch.zeros(st.shape, dtype=torch.float32, device=st.device)
            d_st = d_st.index_add_(0, entry, d_value).to(st.dtype)
        grad_tokens = grad_tokens * st.index_select(0, entry).to(grad_tokens.dtype)[:, None]
    elif st is not None and st.numel():
        n_fine = (images.shape[2] // ctx.fine_patch) * (images.shape[3] // ctx.fine_patch)
        fine = position < n_fine
        in_region = region >= 0  # border cells have no region: value 1, no gradient to the gate
        value = torch.where(in_region, st.index_select(0, region.clamp_min(0)), 1)
        if need[4]:  # d value = <grad, unscaled token>; fine tokens carry +st, coarse ones -st
            d_value = (grad_tokens.float() * _unscaled(pixels, weight, bias, pos_table, position).float()).sum(1)
            d_st = torch.zeros(st.shape, dtype=torch.float32, device=st.device)
            d_value = torch.where(in_region, torch.where(fine, d_value, -d_value), 0)
            d_st = d_st.index_add_(0, region.clamp_min(0), d_value).to(st.dtype)
        grad_tokens = grad_tokens * torch.where(fine, value, 1 - value).to(grad_tokens.dtype)[:, None]
    if need[1]:
        d_weight = (grad_tokens.transpose(0, 1) @ pixels).to(weight.dtype)
    if bias is not None and need[2]:
        d_bias = grad_tokens.float().sum(0).to(bias.dtype)
    if pos_table is not None and need[3]:
        d_pos = torch.zeros(pos_table.shape, dtype=torch.float32, device=pos_table.device)
        d_pos = d_pos.index_add_(0, position, grad_tokens.float()).to(pos_table.dtype)
    if ctx.has_prefix and need[5]:
        d_prefix = grad_out[prefix_rows].sum(0)
    return (None, d_weight, d_bias, d_pos, d_st, d_prefix) + (None,) * 10


def _unscaled(pixels, weight, bias, pos_table, position):
    """Tokens before their straight-through scaling (what the gate's gradient multiplies)."""
    unscaled = F.linear(pixels, weight, bias)
    if pos_table is not None:
        unscaled = unscaled + pos_table.index_select(0, position)
    return unscaled


_pack_op.register_autograd(_backward, setup_context=_setup_context)


def gather_embed_pack(images: Tensor, index: MixedScaleIndex, weight: Tensor, bias: Optional[Tensor],
                      pos_table: Optional[Tensor], st: Optional[Tensor], prefix: Optional[Tensor], fine_patch: int,
                      ratio: int, scales: int = 2, node_pixels: Optional[Tensor] = None) -> Tensor:
    """Packed tokens ``[T, d]`` of a mixed-scale batch with the Triton kernel.

    images: float16/bfloat16/float32 ``[B, C, H, W]`` on CUDA (CPU only under TRITON_INTERPRET=1),
    any strides; index: its ``MixedScaleIndex``; weight ``[d, C*p*p]`` ((C, p, p) order, images'
    dtype); bias ``[d]`` or None; pos_table ``[Nf + Nc, d]`` (fine rows, then coarse) or None; st:
    straight-through values ``[B, Nc]`` or None (no scaling); prefix ``[P, d]`` or None (P = 0).
    Returns ``[T, d]`` in images' dtype, equal to :func:`reference.pack_reference`; differentiable
    w.r.t. weight, bias, pos_table, st and prefix, not the images.

    scales: 2, or 3 to ``MAX_SCALES`` for a ``scale_tree.tree_index`` layout (ratio >= 2): pos_table
    then has a row per node of every scale (finest first) and st is the token-weight table
    ``[B, n_nodes]`` (``cat(ScaleTree.token_weights(decisions), 1)``), see docs/design.md section 10.

    A list of images of different sizes (a ``tree_batch.batch_index`` layout, docs/design.md
    section 11): ``images`` is their flat pixel buffer (each image's ``[C, H_b, W_b]`` flattened, in
    list order), ``node_pixels`` int64 ``[4, n_nodes]`` (``TreeBatch.node_pixels``), pos_table the
    global node table and st the flat token weights ``[n_nodes]``; one launch for the whole list.
    """
    if weight.dtype != images.dtype:
        raise TypeError(f"weight ({weight.dtype}) and images ({images.dtype}) must have the same dtype")
    if isinstance(scales, bool) or not isinstance(scales, int) or not 2 <= scales <= MAX_SCALES:
        raise ValueError(
            f"the pack kernel takes 2 to {MAX_SCALES} scales (patch sizes p .. p*r**{MAX_SCALES - 1}), got {scales!r}"
        )
    if node_pixels is not None:
        if images.dim() != 1 or node_pixels.dim() != 2 or node_pixels.shape[0] != 4:
            raise ValueError("a list's pack takes the flat pixel buffer (1-D) and node_pixels [4, n_nodes]")
        if st is not None and st.shape != (node_pixels.shape[1],):
            raise ValueError(f"a list's st is the flat token weights [{node_pixels.shape[1]}], got {list(st.shape)}")
    elif scales > 2 and st is not None:  # a shape check (no host read): a [B, Nc] st would read wrong entries
        n_nodes = _geometry(*images.shape[2:], int(fine_patch), int(ratio), scales)[8]
        if st.shape != (images.shape[0], n_nodes):
            raise ValueError(
                f"with {scales} scales st is the token-weight table [B, n_nodes] = {[images.shape[0], n_nodes]}, "
                f"got {list(st.shape)}"
            )
    st = None if st is None else st.reshape(-1)
    if skips_custom_op(weight, bias, pos_table, st, prefix):
        return _pack_forward(images, weight, bias, pos_table, st, prefix, index.rows, index.position, index.region,
                             index.prefix_rows, int(index.total), int(fine_patch), int(ratio), scales, node_pixels)
    return _pack_op(images, weight, bias, pos_table, st, prefix, index.rows, index.source, index.position,
                    index.region, index.prefix_rows, int(index.total), int(fine_patch), int(ratio), scales,
                    node_pixels)
