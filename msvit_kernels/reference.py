"""Pure-torch references of every op in ``msvit_kernels``.

These are the oracles the tests compare the fused kernels against, and the implementations the
``kernels="reference"`` / ``backend="reference"`` paths run on any device and dtype (float64 too).
They favour clarity over speed, but avoid Python loops over tokens: the only loop is over images.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import packed_attention_signature
from .varlen import MixedScaleIndex


@packed_attention_signature
def packed_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k) -> Tensor:
    """Non-causal attention computed independently for every sequence of a packed batch.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` (any float dtype, any device); cu_seqlens: int32
    ``[B+1]`` over q's rows, cu_seqlens_k (default: cu_seqlens) over k's rows. Query sequence ``b``
    attends to key sequence ``b``. Returns ``[T, H, D]`` in q's dtype. Empty query sequences
    produce no rows; queries whose key sequence is empty get zeros (flash-attn's convention).
    One SDPA call per image; reading the lengths costs one host sync per call (this is the oracle,
    not the fast path).

    NaN and infinity in q or k give what textbook softmax gives (a NaN query row: a NaN output
    row), see ``_softmax_backend``. A layout nobody checked (``packed_attention(check_values=False)``)
    gets what the host-free backends give it: NaN in every row of a sequence longer than
    max_seqlen (its keys: max_seqlen_k) and in every row before cu_seqlens[0] or after
    cu_seqlens[-1], and in every row if the offsets decrease; a layout running past q's (k's)
    rows raises torch's split error. A key sequence of length 1 is exact: see :func:`_one_key`.
    """
    sizes, fits = _unchecked_layout(cu_seqlens, max_seqlen, q.shape[0])
    if cu_seqlens_k is not cu_seqlens:
        sizes_k, fits_k = _unchecked_layout(cu_seqlens_k, max_seqlen_k, k.shape[0])
    else:
        sizes_k, fits_k = sizes, fits
    if min(sizes[1:-1] + sizes_k[1:-1], default=0) < 0:  # decreasing offsets: rows in two sequences
        return q * float("nan")
    # split/cat rather than slicing into a preallocated output: the backward of a split is one
    # concatenation, while per-image slice backwards each materialise a zero [T, H, D] gradient
    # (measured: 10x slower training steps for 128 images on CPU).
    q_parts, k_parts, v_parts = q.split(sizes), k.split(sizes_k), v.split(sizes_k)
    nan = float("nan")
    outputs = [q_parts[0] * nan]  # rows before cu_seqlens[0] (and below, after cu_seqlens[-1]): no sequence
    with _softmax_backend(q, k):
        for qi, ki, vi, fit_q, fit_k in zip(q_parts[1:-1], k_parts[1:-1], v_parts[1:-1], fits, fits_k):
            if not (fit_q and fit_k):  # longer than its bound: NaN, as the backends that size their work by it
                outputs.append(qi * nan)
                continue
            if qi.shape[0] == 0:
                outputs.append(qi)
                continue
            if ki.shape[0] == 0:  # SDPA over no keys is 0/0 (NaN): zeros and a zero gradient, as flash-attn;
                # masked_fill keeps the result in q's graph, so the output requires grad like any other
                outputs.append(qi.masked_fill(torch.ones((), dtype=torch.bool, device=qi.device), 0.0))
                continue
            if ki.shape[0] == 1:
                outputs.append(_one_key(qi, ki, vi, scale))
                continue
            # [L, H, D] -> [H, L, D], the layout SDPA expects for an unbatched call
            oi = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), scale=scale)
            outputs.append(oi.transpose(0, 1))
    outputs.append(q_parts[-1] * nan)
    return torch.cat(outputs)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Split images into non-overlapping square patches, flattened in (C, p, p) order.

    images: ``[B, C, H, W]`` with H and W multiples of ``patch_size``.
    Returns ``[B, (H/p) * (W/p), C * p * p]``, patches in raster order. The flattening order is
    the one of a conv patch embedding's weight ``[d, C, p, p]``, so ``patches @ w.flatten(1).T``
    equals the conv.
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # B, gh, gw, C, p, p
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def area_pool(images: Tensor, factor: int) -> Tensor:
    """``[B, C, H / factor, W / factor]``: the mean of every ``factor x factor`` pixels (Eq. 5's area
    averaging; H and W multiples of ``factor``), ``avg_pool2d`` with kernel ``factor`` up to rounding.

    Rows are summed first (whole image rows at once), then neighbouring columns, in float32 or
    wider: on CPU 2.7x faster than ``avg_pool2d``'s kernel (3.8 against 10.5 ms for 32 images at
    224 px, docs/design.md section 13); the sums' order differs from avg_pool2d's (and the pack
    kernel's raster order) by rounding only.
    """
    if factor == 1:
        return images
    rows = images.to(torch.promote_types(images.dtype, torch.float32)).unflatten(2, (-1, factor))
    total = rows[:, :, :, 0]
    for i in range(1, factor):
        total = total + rows[:, :, :, i]
    columns = total.unflatten(3, (-1, factor))
    total = columns[..., 0]
    for j in range(1, factor):
        total = total + columns[..., j]
    return (total / (factor * factor)).to(images.dtype)


# How a coarser patch comes down to the fine patch size: "area" (Eq. 4-5, the mean of every
# factor x factor block, what the pack kernel computes) or "apt" (APT's construct_patch_groups:
# bilinear F.interpolate by 1 / factor, no antialias; for a factor of 2 the 2x2 mean up to rounding,
# for 4 the mean of the centre 2x2 of each 4x4 block; docs/design.md section 15)
COARSE_PIXELS = ("area", "apt")


def downsample(images: Tensor, factor: int, coarse_pixels: str = "area") -> Tensor:
    """``[B, C, H / factor, W / factor]`` of ``images`` (H and W multiples of ``factor``) by the
    ``coarse_pixels`` rule (``COARSE_PIXELS``)."""
    if factor == 1:
        return images
    if coarse_pixels == "apt":  # the output size given: the kernel's scale is then exactly `factor`
        size = (images.shape[-2] // factor, images.shape[-1] // factor)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
    if coarse_pixels != "area":
        raise ValueError(f"coarse_pixels must be one of {COARSE_PIXELS}, got {coarse_pixels!r}")
    return area_pool(images, factor)


def coarse_patches_at_fine_size(images: Tensor, fine_patch: int, ratio: int, coarse_pixels: str = "area") -> Tensor:
    """Coarse patches (``fine_patch * ratio`` px) brought down to ``fine_patch`` px (Eq. 5,
    :func:`area_pool`, or APT's rule: :func:`downsample`). Returns ``[B, Nc, C * fine_patch**2]``
    in coarse-grid raster order; pixels outside every whole coarse region (the border of a size
    that is not a multiple of the coarse patch) are not read (neither rule reads outside a block).
    """
    coarse = fine_patch * ratio
    images = images[..., : images.shape[-2] // coarse * coarse, : images.shape[-1] // coarse * coarse]
    return patchify(downsample(images, ratio, coarse_pixels), fine_patch)


def gather_embed_reference(
    images: Tensor,
    source: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    fine_patch: int,
    ratio: int,
    scales: int = 2,
    coarse_pixels: str = "area",
) -> Tensor:
    """Embed only the patches a packed batch keeps.

    images: ``[B, C, H, W]``; source: int64 ``[N]`` rows of the candidate table
    ``cat(fine patches of all images [B*Nf], coarse patches of all images [B*Nc])`` (with more
    ``scales``, every scale's ``[B*N_s]`` patches, finest first); weight ``[d, C*p*p]``; bias
    ``[d]`` or None; coarse_pixels: :func:`downsample`'s rule. Returns ``[N, d]``.
    """
    pixels = gather_patches_reference(images, source, fine_patch, ratio, scales, coarse_pixels)
    return F.linear(pixels, weight, bias)


def gather_patches_reference(
    images: Tensor, source: Tensor, fine_patch: int, ratio: int, scales: int = 2, coarse_pixels: str = "area"
) -> Tensor:
    """Pixels ``[N, C*p*p]`` ((C, p, p) order) of the candidate-table rows ``source`` (int64 ``[N]``,
    see :func:`gather_embed_reference`): fine patches as they are, coarser ones (``p * ratio**s``
    px) brought down to ``p`` (area-averaged, or by APT's rule: :func:`downsample`). ``images``
    may be a list of ``[C, H_b, W_b]`` images of different sizes: the table is then in
    ``tree_batch.TreeBatch``'s global node order (scale by scale, image by image)."""
    if isinstance(images, (list, tuple)):
        factors = [ratio**s for s in range(scales)]
        tables = [scale_patches(image[None], fine_patch, f, coarse_pixels)[0] for f in factors for image in images]
        return torch.cat(tables).index_select(0, source)
    return _gather_scale_patches(images, source, fine_patch, ratio, scales, coarse_pixels)


def _gather_scale_patches(
    images: Tensor, source: Tensor, fine_patch: int, ratio: int, scales: int, coarse_pixels: str
) -> Tensor:
    """:func:`gather_patches_reference` of a ``[B, C, H, W]`` batch: every scale's patches written
    straight into one table (no per-scale tables and no concatenation of them: with avg_pool2d's
    kernel they were 45% of the CPU tokenizer's time, docs/design.md section 13), then the rows."""
    batch, chans, p = images.shape[0], images.shape[1], fine_patch
    grids = [(images.shape[-2] // (p * ratio**s), images.shape[-1] // (p * ratio**s)) for s in range(scales)]
    table = images.new_empty(sum(batch * h * w for h, w in grids), chans * p * p)
    start = 0
    for s, (grid_h, grid_w) in enumerate(grids):
        side, count = p * ratio**s, batch * grid_h * grid_w
        pixels = downsample(images[..., : grid_h * side, : grid_w * side], ratio**s, coarse_pixels)
        cells = pixels.unflatten(2, (grid_h, p)).unflatten(4, (grid_w, p)).permute(0, 2, 4, 1, 3, 5)
        table[start : start + count].view(batch, grid_h, grid_w, chans, p, p).copy_(cells)
        start += count
    return table.index_select(0, source)


def gather_flat_patches_reference(
    pixels: Tensor, node_pixels: Tensor, source: Tensor, fine_patch: int, chans: int, side: int
) -> Tensor:
    """:func:`gather_patches_reference` for a list of images given as one flat pixel buffer
    (``pixels``, each ``[C, H_b, W_b]`` flattened in turn) and ``node_pixels`` int64 ``[4, n_nodes]``
    (each global node's pixel origin, row stride, channel stride and factor r**s,
    ``tree_batch.TreeBatch.node_pixels``): the ``[N, C*p*p]`` pixels of the nodes ``source``, each
    output pixel the mean of its factor x factor taps, summed in raster order as the pack kernel
    sums them (``side``: the largest factor)."""
    origin, row, area, factor = (v[:, None, None, None] for v in node_pixels[:, source])
    p = fine_patch
    chan = torch.arange(chans, device=pixels.device).view(1, chans, 1, 1)
    y = torch.arange(p, device=pixels.device).view(1, 1, p, 1)
    x = torch.arange(p, device=pixels.device).view(1, 1, 1, p)
    start = origin + chan * area + factor * y * row + factor * x
    total = torch.zeros(source.numel(), chans, p, p, dtype=torch.float32, device=pixels.device)
    for ty in range(side):
        for tx in range(side):
            inside = (ty < factor) & (tx < factor)
            offset = torch.where(inside, start + ty * row + tx, 0)
            total = total + torch.where(inside, pixels[offset].float(), 0.0)
    return (total / (factor * factor)).to(pixels.dtype).flatten(1)


def scale_patches(images: Tensor, fine_patch: int, factor: int, coarse_pixels: str = "area") -> Tensor:
    """``[B, N, C*p*p]``: the patches of ``fine_patch * factor`` px, brought down to ``fine_patch``
    (:func:`downsample`'s rule)."""
    if factor == 1:
        return patchify(images, fine_patch)
    return coarse_patches_at_fine_size(images, fine_patch, factor, coarse_pixels)


def gate_mlp_reference(
    images: Tensor,
    region_size: int,
    w1: Tensor,
    b1: Tensor,
    pos: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    w4: Tensor,
    b4: Tensor,
) -> Tensor:
    """The scale gate (Section 2.1): logits ``[B, Nc]`` of every coarse region of ``images``.

    images ``[B, C, H, W]`` (H, W multiples of region_size); w1 ``[hidden, C*S*S]`` ((C, S, S)
    order), w2/w3 ``[hidden, hidden]``, w4 ``[1, hidden]``, biases ``[out]``; pos ``[Nc, hidden]``
    (the gate position embedding at this grid), added after layer 1. GELU is the exact erf form.
    """
    return gate_mlp_patches(patchify(images, region_size), w1, b1, pos, w2, b2, w3, b3, w4, b4)


def gate_mlp_patches(patches: Tensor, w1, b1, pos, w2, b2, w3, b3, w4, b4) -> Tensor:
    """:func:`gate_mlp_reference` on region pixels ``[..., N, C*S*S]`` ((C, S, S) order) with their
    position embeddings ``pos [N, hidden]``: logits ``[..., N]`` (a list of images: every region of
    every image in one call)."""
    h = F.gelu(F.linear(patches, w1, b1) + pos)
    h = F.gelu(F.linear(h, w2, b2))
    h = F.gelu(F.linear(h, w3, b3))
    return F.linear(h, w4, b4).squeeze(-1)


def pack_reference(
    images: Tensor,
    index: MixedScaleIndex,
    weight: Tensor,
    bias: Optional[Tensor],
    pos_table: Optional[Tensor],
    st: Optional[Tensor],
    prefix: Optional[Tensor],
    fine_patch: int,
    ratio: int,
    norm: Optional[Callable[[Tensor], Tensor]] = None,
    extra: Optional[Tensor] = None,
    scales: int = 2,
    node_pixels: Optional[Tensor] = None,
    coarse_pixels: str = "area",
) -> Tensor:
    """Packed tokens ``[T, d]`` of a mixed-scale batch: the torch tokenizer and the pack kernel's oracle.

    Every patch token of ``index`` is embedded (``norm`` applied after the embedding if given), plus
    its row of ``extra`` ``[Np, d]`` if given (the model's coarse-token aggregation; the pack kernel
    has no such input), gets its row of ``pos_table`` ``[Nf + Nc, d]`` (fine rows, then coarse)
    and, with ``st`` ``[B, Nc]``, is multiplied by its straight-through value (fine: st, coarse:
    1 - st of its region); prefix ``[P, d]`` fills every image's prefix rows.

    More ``scales`` (a ``scale_tree.tree_index`` layout): ``pos_table`` has a row per node of
    every scale (finest first) and ``st`` is the token-weight table ``[B, n_nodes]``
    (``cat(ScaleTree.token_weights(st_decisions), 1)``): each token is multiplied by the entry
    of its image (read from its ``region``, as the kernel does) and node (``position``).

    A list of images of different sizes (``tree_batch.batch_index`` layout): ``images`` is the
    list, ``pos_table`` the global node table and ``st`` the flat ``[n_nodes]`` token weights
    (``TreeBatch.token_weights``), read at each token's global node (``position``). With
    ``node_pixels`` (int64 ``[4, n_nodes]``, ``TreeBatch.node_pixels``) ``images`` is the list's flat
    pixel buffer instead, read as the pack kernel's ``LIST`` mode reads it (area averages only).

    coarse_pixels: how coarser patches come down to the fine size (:func:`downsample`).
    """
    if node_pixels is not None:
        if coarse_pixels != "area":
            raise ValueError(
                f"coarse_pixels={coarse_pixels!r} needs the images; a flat pixel buffer (node_pixels) is read by "
                "the pack kernel's area-average taps only"
            )
        chans = weight.shape[1] // (fine_patch * fine_patch)
        side = ratio ** (scales - 1)
        pixels = gather_flat_patches_reference(images, node_pixels, index.source, fine_patch, chans, side)
        tokens = F.linear(pixels, weight, bias)
    else:
        tokens = gather_embed_reference(images, index.source, weight, bias, fine_patch, ratio, scales, coarse_pixels)
    if norm is not None:
        tokens = norm(tokens)
    if extra is not None:
        tokens = tokens + extra
    if pos_table is not None:
        tokens = tokens + pos_table.index_select(0, index.position)
    if st is not None and st.dim() == 1:  # a list of images: the token weight of every global node
        tokens = tokens * st.index_select(0, index.position)[:, None]
    elif st is not None and st.numel() and scales > 2:
        n_top = (images.shape[-2] // (fine_patch * ratio ** (scales - 1))) * (
            images.shape[-1] // (fine_patch * ratio ** (scales - 1))
        )
        image = torch.where(index.region >= 0, index.region // max(n_top, 1), -1 - index.region)
        tokens = tokens * st[image, index.position][:, None]
    elif st is not None and st.numel():  # border cells (region -1) have no region: their value is 1
        in_region = index.region >= 0
        value = torch.where(in_region, st.flatten().index_select(0, index.region.clamp_min(0)), 1)
        tokens = tokens * torch.where(index.is_fine | ~in_region, value, 1 - value)[:, None]
    packed = tokens.new_empty(index.total, tokens.shape[-1])
    packed[index.rows] = tokens
    if prefix is not None:
        packed[index.prefix_rows] = prefix.to(tokens.dtype)
    return packed


def unpack_to_grid_reference(tokens: Tensor, fine_to_row: Tensor, fine_grid) -> Tensor:
    """Packed tokens ``[T, C]`` -> fine grid ``[B, h, w, C]``: every fine cell takes its own token,
    or the coarse token covering it (replicated over the r x r cells, Appendix E.1).

    fine_to_row: int64 ``[B, h*w]`` from ``MixedScaleIndex.fine_to_row``.
    """
    batch = fine_to_row.shape[0]
    return tokens.index_select(0, fine_to_row.flatten()).view(batch, fine_grid[0], fine_grid[1], tokens.shape[-1])


def _one_key(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """Attention of queries ``[L, H, D]`` over one key ``[1, H, D]``: softmax over one key is
    exactly 1, so the output is v and dq = dk = 0 exactly. SDPA rounds both (its fp16 gradients were
    ~1e-7 off zero); ``exp(s - s)`` is 1 for a finite score s, NaN for a non-finite one (as softmax),
    and its gradient (g - g) is exactly 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    wide = torch.promote_types(q.dtype, torch.float32)  # fp32 or wider: a finite fp16 score stays finite
    scores = (q.to(wide) * k.to(wide)).sum(-1, keepdim=True) * scale
    return torch.exp(scores - scores).to(v.dtype) * v


def _unchecked_layout(cu_seqlens: Tensor, bound: int, rows: int) -> "tuple[list[int], list[bool]]":
    """The split sizes of ``rows`` packed rows (those before ``cu_seqlens[0]``, each sequence's,
    those after ``cu_seqlens[-1]``) and whether each sequence fits ``bound``: one host read."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return [bounds[0], *lengths, rows - bounds[-1]], [n <= bound for n in lengths]


def _softmax_backend(q: Tensor, k: Tensor):
    """The SDPA backend the reference runs in (a context manager): the default one, or the math
    backend (textbook softmax) when q or k holds a NaN or an infinity.

    CPU's flash SDPA writes zeros for a query whose every score is NaN or -inf (its convention for
    fully masked rows; torch 2.14), where softmax, the math backend and every other backend give NaN:
    a NaN in that query, or one in every key. Such scores need a non-finite q or k, and the check is
    a sum of each (fp32 or wider, so finite fp16 never overflows it) and one host read: 0.6 ms for
    9.4k tokens of H=6, D=64 against 61 ms of attention on one CPU thread.
    """
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        total = sum(t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in (q, k))
    return contextlib.nullcontext() if bool(torch.isfinite(total)) else sdpa_kernel(SDPBackend.MATH)


# The grey-level weights of APT's entropy (ITU-R BT.601 luma, rounded as APT's code and MATLAB's
# rgb2gray round them); msvit_kernels.entropy_kernel passes these exact values to its kernel.
ENTROPY_LUMA = (0.2989, 0.587, 0.114)


def entropy_bins_reference(images: Tensor, mean=None, std=None, bins: int = 512, binning: str = "apt") -> Tensor:
    """int64 ``[B, H, W]``: each pixel's grey-level bin, by the formula of
    ``msvit_kernels.entropy_kernel`` (its docstring), in fp32, one rounding per operation, in the
    kernel's order: un-normalise ``x = z * std + mean``; ``binning="apt"``: 8-bit levels
    ``clamp(floor(255 x + 0.5), 0, 255)``, grey ``(wr * r + wg * g) + wb * b`` of those, bin
    ``trunc(grey * bins / 255)`` (``torch.histc``'s, ``bins - 1`` at 255); ``"continuous"``: grey of
    ``x``, bin ``clamp(floor(grey * (255 * bins / 256)), 0, bins - 1)``. -1 marks a pixel whose
    un-normalised value is not finite in some channel. mean, std: one number per channel (None:
    pixels already in [0, 1]); 3 channels (RGB) or 1 (grey)."""
    x = images.float()
    chans = x.shape[1]
    if mean is not None or std is not None:
        m = torch.tensor(mean if mean is not None else [0.0] * chans, dtype=torch.float32, device=x.device)
        s = torch.tensor(std if std is not None else [1.0] * chans, dtype=torch.float32, device=x.device)
        x = x * s.view(1, -1, 1, 1)  # two operations, as the kernel (no fused multiply-add)
        x = x + m.view(1, -1, 1, 1)
    finite = torch.isfinite(x).all(1)
    if binning == "apt":
        x = torch.floor(x * 255.0 + 0.5).clamp(0.0, 255.0)
    if chans == 3:
        wr, wg, wb = torch.tensor(ENTROPY_LUMA, dtype=torch.float32, device=x.device)
        grey = (wr * x[:, 0] + wg * x[:, 1]) + wb * x[:, 2]
    else:
        grey = x[:, 0]
    if binning == "apt":
        # a division by a device tensor: torch on CUDA multiplies by the reciprocal of a Python
        # scalar divisor, which rounds differently; grey * bins is exact (bins is a power of two)
        level = torch.floor(grey * float(bins) / torch.tensor(255.0, device=x.device))
    else:
        level = torch.floor(grey * torch.tensor(255.0 * bins / 256.0, dtype=torch.float32, device=x.device))
    return torch.where(finite, level.nan_to_num(0.0).clamp(0, bins - 1).long(), -1)


def entropy_reference(images: Tensor, patch: int, mean=None, std=None, bins: int = 512, binning: str = "apt") -> Tensor:
    """float32 ``[B, Nc]``: the Shannon entropy (bits) of the grey-level histogram of every
    ``patch x patch`` cell of ``images`` ``[B, C, H, W]`` (raster order), over the non-empty bins of
    :func:`entropy_bins_reference`; computed in float64 from the counts; +inf for a cell with a
    non-finite pixel (``msvit_kernels.entropy_kernel``). No host read: the histograms are a
    scatter-add, not a bincount."""
    return entropy_levels_reference(images, (patch,), mean, std, bins, binning)[0]


def entropy_levels_reference(
    images: Tensor, patches: Sequence[int], mean=None, std=None, bins: int = 512, binning: str = "apt"
) -> List[Tensor]:
    """:func:`entropy_reference` at several cell sizes (``patches`` ascending, each a multiple of
    the first), each over the cells that fit whole in the image, equal to separate calls value for
    value: the pixels are binned once (the costly part: about ten operations per pixel) and a
    coarser cell's histogram is the sum of its finer cells' (exact: integer counts in float64), as
    is its count of non-finite pixels (a cell with one has entropy +inf)."""
    levels = entropy_bins_reference(images, mean, std, bins, binning)
    b, h, w = levels.shape
    first = patches[0]
    cells = levels[:, : h // first * first, : w // first * first]
    cells = cells.reshape(b, h // first, first, w // first, first).permute(0, 1, 3, 2, 4).reshape(-1, first * first)
    counts, nonfinite = _histograms(cells, bins)
    counts = counts.view(b, h // first, w // first, bins)
    nonfinite = nonfinite.view(b, h // first, w // first)
    entropies = []
    for patch in patches:
        factor, grid = patch // first, (h // patch, w // patch)
        merged = counts[:, : grid[0] * factor, : grid[1] * factor].reshape(b, grid[0], factor, grid[1], factor, bins)
        bad = nonfinite[:, : grid[0] * factor, : grid[1] * factor].reshape(b, grid[0], factor, grid[1], factor)
        entropy = _entropy_of_counts(merged.sum((2, 4)).reshape(-1, bins), bad.sum((2, 4)).reshape(-1), patch * patch)
        entropies.append(entropy.reshape(b, grid[0] * grid[1]))
    return entropies


def entropy_flat_reference(
    pixels: Tensor,
    node_pixels: Tensor,
    cells: Tensor,
    patch: int,
    chans: int,
    mean=None,
    std=None,
    bins: int = 512,
    binning: str = "apt",
    merges: Sequence[Tuple[Tensor, int]] = (),
    ratio: int = 2,
    segment: int = 1,
) -> List[Tensor]:
    """:func:`entropy_levels_reference` for a list of images of different sizes given as one flat
    pixel buffer (``pixels``, each ``[C, H_b, W_b]`` flattened in turn) and ``node_pixels`` int64
    ``[4, n_nodes]`` (``tree_batch.TreeBatch.node_pixels``: each global node's pixel origin, row
    stride and channel stride; its factor is not read), vectorised over the nodes: no loop over
    images. cells: int64 ``[N]`` global nodes, each a ``patch x patch`` px cell, binned pixel by
    pixel as :func:`entropy_bins_reference` bins them. merges: one ``(parent, count)`` per coarser
    level, ``parent`` int64 ``[N_l]`` each node's parent among the ``count`` nodes of the next level
    (-1: none); a parent's histogram is the sum of its children's (exact: integer counts in
    float64), its side ``ratio`` times theirs (``ratio**2`` children). segment: as in
    :func:`flat_cells`. Returns float32 entropies in bits, ``[N]`` then ``[count]`` per merge; +inf
    for a cell with a non-finite pixel."""
    # each cell as an image; in chunks of ~256 K values, which keep the ten elementwise passes of the
    # binning in cache (the whole list at once took 1.5x the per-image loop on CPU)
    parts = [
        _histograms(
            entropy_bins_reference(
                flat_cells(pixels, node_pixels, chunk, patch, chans, segment), mean, std, bins, binning
            ).flatten(1),
            bins,
        )
        for chunk in cells.split(max(1, (1 << 18) // (chans * patch * patch)))
    ]
    counts, nonfinite = (torch.cat(t) for t in zip(*parts))
    area_px = patch * patch
    entropies = [_entropy_of_counts(counts, nonfinite, area_px)]
    for parent, count in merges:
        has = parent >= 0
        up = torch.where(has, parent, count)  # the rootless nodes go to a row that is dropped
        counts = counts.new_zeros(count + 1, bins).index_add_(0, up, counts)[:count]
        nonfinite = nonfinite.new_zeros(count + 1).index_add_(0, up, nonfinite)[:count]
        area_px *= ratio * ratio
        entropies.append(_entropy_of_counts(counts, nonfinite, area_px))
    return entropies


def flat_cells(pixels: Tensor, node_pixels: Tensor, cells: Tensor, side: int, chans: int, segment: int = 1) -> Tensor:
    """``[N, C, side, side]``: the full-resolution pixels of the ``side x side`` px cells at the global
    nodes ``cells`` (int64 ``[N]``) of a list's flat pixel buffer (``node_pixels``: each node's
    origin, row stride and channel stride, ``tree_batch.TreeBatch.node_pixels``). segment: a width
    that divides ``side``, every origin and every stride (the fine patch does: every width is a
    multiple of it); the buffer is then read as rows of ``segment`` contiguous pixels, one
    ``index_select`` of ``N C side side / segment`` rows (per-pixel indices were 10x slower on CPU)."""
    if side % segment or pixels.numel() % segment:
        raise ValueError(f"segment {segment} must divide the cell side {side} and the pixel buffer")
    origin, row, area = (v[:, None, None, None] // segment for v in node_pixels[:3, cells])
    device = pixels.device
    chan = torch.arange(chans, device=device).view(1, chans, 1, 1)
    y = torch.arange(side, device=device).view(1, 1, side, 1)
    x = torch.arange(side // segment, device=device).view(1, 1, 1, side // segment)
    rows = (origin + chan * area + y * row + x).flatten()
    return pixels.view(-1, segment).index_select(0, rows).view(cells.numel(), chans, side, side)


def _histograms(levels: Tensor, bins: int) -> Tuple[Tensor, Tensor]:
    """float64 ``[N, bins]`` counts of each row of bin indices ``levels`` int64 ``[N, n]``
    (``entropy_bins_reference``'s), and int64 ``[N]`` its pixels without a bin (-1: NaN, inf). A
    scatter-add, not a bincount: no host read."""
    counts = torch.zeros(levels.shape[0], bins, dtype=torch.float64, device=levels.device)
    counts.scatter_add_(
        1, levels.clamp_min(0), torch.ones((), dtype=torch.float64, device=levels.device).expand(levels.shape)
    )
    return counts, (levels < 0).sum(1)


def _entropy_of_counts(counts: Tensor, nonfinite: Tensor, pixels: int) -> Tensor:
    """float32 ``[N]``: the entropy (bits) of histograms ``counts`` ``[N, bins]`` of ``pixels``
    pixels each, computed in float64; +inf where ``nonfinite`` ``[N]`` is > 0."""
    p = counts / pixels
    entropy = -(p * torch.log2(torch.where(p > 0, p, 1.0))).sum(1)
    return torch.where(nonfinite > 0, float("inf"), entropy).float()
