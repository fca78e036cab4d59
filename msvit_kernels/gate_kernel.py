"""The scale gate in Triton: region pixels -> 4-layer MLP -> logit (-> Gumbel-Sigmoid).

One layer-wise kernel, launched once per hidden layer. A program owns BLOCK_R coarse regions (flat
over the batch) and the whole (padded) hidden width, and streams its input and the layer's weight
in BLOCK_K slices, so it holds one ``[BLOCK_R, HID]`` fp32 accumulator and one ``[BLOCK_K, HID]``
weight slice at a time, never a whole weight matrix:

1. ``GATHER``: the input is each region's ``S_c x S_c x C`` pixels, read straight from the NCHW
   image in (C, S, S) order; epilogue ``+ b1 + pos``, the pre-activation ``a1`` saved for the
   backward when training, ``gelu``.
2. the same on layer 1's output (``W2``), then on layer 2's (``W3``) with the ``HEAD`` epilogue:
   ``. w4 + b4`` in fp32 -> logit (and, with caller-supplied logistic noise, the Gumbel-Sigmoid
   ``soft = sigmoid((logit + noise) / tau)`` and ``hard = soft > 0.5``: ``msvit.models.gate.gumbel_sigmoid``
   in the same launch, reproducible).

Between layers the activations travel through global memory in the weights' dtype (``[R, hidden]``,
6 MB at ViT-S batch 256): that is the rounding the matmul inputs always had. The design replaces a
single kernel that kept W2 and W3 in registers: it spilled 5-100 KB per thread on sm_70/75 and
took up to minutes to compile (docs/design.md, compile report). The hidden width (106 by default)
is padded to a power of two with zero-masked weights: a padded unit is gelu(0) = 0 and adds nothing.
Its oracle is ``reference.gate_mlp_reference`` (exact erf GELU on both sides, see _triton.py).

Backward (torch, fp32): layers 2-4 are recomputed from the saved ``a1`` ``[R, hidden]`` (hidden^2
MACs, 4% of the gate) and W1's gradient is ``dA1^T @ regions`` on re-gathered region pixels. No
gradient reaches pixels.

A list of images of different sizes (``list_fused_gate``, the kernel's ``LIST`` mode, docs/design.md
section 11): the regions are a range of global nodes of the list's ``tree_batch.TreeBatch`` (every
node of one scale, every image), layer 1 reads each node's pixels from the flat pixel buffer through
its row of ``TreeBatch.node_pixels`` (the pack kernel's geometry) and adds its row of a flat position
table (each image's table at its own grid); layers 2-3 are unchanged. One launch per layer for the
whole list; the backward re-gathers the pixels with ``reference.flat_cells``.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import (
    TritonKernel,
    check_flat_nodes,
    check_launchable,
    dot_precision,
    kernel_op,
    patch_features,
    skips_custom_op,
    tl,
    triton,
)
from .reference import flat_cells, patchify

MAX_HIDDEN = 128  # one program holds a [BLOCK_R, hidden] accumulator

if triton is not None:

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _gate_layer_kernel(
        X, IMG, W, B, POS, W4, B4, NOISE, PRE, OUT, LOGITS, SOFT, HARD, NODE_PIXELS,
        n_regions, n_coarse, grid_w, hidden, inv_temperature, first_node, n_nodes,
        stride_xr, stride_ib, stride_ic, stride_ih, stride_iw,
        stride_wo, stride_wi, stride_pr, stride_ph, stride_w4i,
        K: tl.constexpr, REGION: tl.constexpr, HID: tl.constexpr,
        GATHER: tl.constexpr, HEAD: tl.constexpr, HAS_NOISE: tl.constexpr, SAVE_PRE: tl.constexpr,
        LIST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program: ``gelu(x W^T + b [+ pos])`` of BLOCK_R regions; region r is image
        r // n_coarse, raster cell r % n_coarse. x: the regions' pixels (GATHER) or rows of X.

        LIST (a list of images of different sizes, docs/design.md section 11): IMG is the list's flat
        pixel buffer, region r is global node ``first_node + r`` whose pixel origin, row stride and
        channel stride are its columns of NODE_PIXELS ``[4, n_nodes]``, and POS is the flat position
        table ``[n_regions, hidden]`` in region order (each image's table at its own grid)."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < n_regions
        rows = offs_r.to(tl.int64)  # B * stride_b may pass 2**31
        cell = offs_r if LIST else offs_r % n_coarse  # the region's row of POS
        offs_h = tl.arange(0, HID)
        mask_h = offs_h < hidden
        if GATHER and LIST:
            # a 64-bit origin (a flat buffer of many images); the strides inside one image fit 32 bits,
            # which keeps the [BLOCK_R, BLOCK_K] offsets 32-bit, as the pack kernel's LIST mode does
            node = first_node + offs_r
            base = IMG + tl.load(NODE_PIXELS + node, mask=mask_r, other=0)
            row_stride = tl.load(NODE_PIXELS + n_nodes + node, mask=mask_r, other=0).to(tl.int32)
            chan_stride = tl.load(NODE_PIXELS + 2 * n_nodes + node, mask=mask_r, other=0).to(tl.int32)
        elif GATHER:
            y0 = (cell // grid_w) * REGION
            x0 = (cell % grid_w) * REGION
            base = IMG + (rows // n_coarse) * stride_ib + y0 * stride_ih + x0 * stride_iw

        acc = tl.zeros([BLOCK_R, HID], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if GATHER and LIST:
                offs_k, mask_k, chan, py, px = patch_features(k0, K, REGION, BLOCK_K)
                x_ptr = base[:, None] + (chan[None, :] * chan_stride[:, None] + py[None, :] * row_stride[:, None]
                                         + px[None, :])
            elif GATHER:
                offs_k, mask_k, chan, py, px = patch_features(k0, K, REGION, BLOCK_K)
                x_ptr = base[:, None] + (chan * stride_ic + py * stride_ih + px * stride_iw)[None, :]
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                x_ptr = X + rows[:, None] * stride_xr + offs_k[None, :]
            x = tl.load(x_ptr, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(W + offs_h[None, :] * stride_wo + offs_k[:, None] * stride_wi,
                         mask=mask_h[None, :] & mask_k[:, None], other=0.0)
            acc += tl.dot(x.to(wt.dtype), wt, input_precision=DOT_PRECISION)

        mask = mask_r[:, None] & mask_h[None, :]
        acc += tl.load(B + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        if GATHER:
            acc += tl.load(POS + cell[:, None] * stride_pr + offs_h[None, :] * stride_ph, mask=mask,
                           other=0.0).to(tl.float32)
        if SAVE_PRE:
            tl.store(PRE + rows[:, None] * hidden + offs_h[None, :], acc, mask=mask)
        h = _gelu(acc)
        if HEAD:
            w4 = tl.load(W4 + offs_h * stride_w4i, mask=mask_h, other=0.0).to(tl.float32)
            logit = tl.sum(h * w4[None, :], 1) + tl.load(B4).to(tl.float32)
            logit = logit.to(LOGITS.dtype.element_ty)
            tl.store(LOGITS + offs_r, logit, mask=mask_r)
            if HAS_NOISE:
                noise = tl.load(NOISE + offs_r, mask=mask_r, other=0.0).to(tl.float32)
                # from the rounded logit and rounded soft, as the torch Gumbel-Sigmoid sees them
                soft = tl.sigmoid((logit.to(tl.float32) + noise) * inv_temperature).to(SOFT.dtype.element_ty)
                tl.store(SOFT + offs_r, soft, mask=mask_r)
                tl.store(HARD + offs_r, (soft.to(tl.float32) > 0.5).to(tl.uint8), mask=mask_r)
        else:
            tl.store(OUT + rows[:, None] * hidden + offs_h[None, :], h.to(OUT.dtype.element_ty), mask=mask)


def _wide_tile_fits(capability: int, meta: dict) -> bool:
    """64 regions: fp32 (IEEE dots) everywhere; fp16/bf16 on sm_80+, and a list's gather (per-row
    strides, LIST) only on sm_90: it spilled 16-24 B per thread on sm_80/86/89 (compile report)."""
    if meta["DOT_PRECISION"] == "ieee":
        return True
    return capability >= (90 if meta.get("LIST") else 80)


# Measured with the compile report (bench/results/compile): 32 regions x 8 warps is clean on every
# target and dtype; 64 regions spill 10 KB per thread in fp16 on sm_70/75, so they run on sm_80+.
_CONFIGS = [] if triton is None else [
    (triton.Config({"BLOCK_R": 32, "BLOCK_K": 32}, num_warps=8, num_stages=1), None),
    (triton.Config({"BLOCK_R": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2), _wide_tile_fits),
]
_GATE = None if triton is None else TritonKernel(
    _gate_layer_kernel, _CONFIGS, key=["K", "HID", "GATHER", "LIST"], interpret_meta={"BLOCK_R": 64, "BLOCK_K": 64})


def _gate_forward(images: Tensor, region_size: int, weights: Tuple[Tensor, ...], noise: Optional[Tensor],
                  temperature: float, save_a1: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the kernel. Returns logits ``[B, Nc]`` (images' dtype), soft ``[B, Nc]`` and hard bool
    ``[B, Nc]`` (``[0]`` without noise), a1 fp32 ``[B*Nc, hidden]`` (``[0, hidden]`` unless saved)."""
    check_launchable(images)
    batch, chans, height, width = images.shape
    grid_w = width // region_size
    n_coarse = (height // region_size) * grid_w
    geometry = dict(n_coarse=n_coarse, grid_w=grid_w, strides=images.stride(), node_pixels=None, first_node=0)
    logits, soft, hard, a1 = _launch_layers(images, batch * n_coarse, chans, region_size, weights, noise,
                                            temperature, save_a1, **geometry)
    sampled = (batch, n_coarse) if noise is not None else (0,)
    return logits.view(batch, n_coarse), soft.view(sampled), hard.view(sampled), a1


def _list_gate_forward(pixels: Tensor, node_pixels: Tensor, first_node: int, region_size: int,
                       weights: Tuple[Tensor, ...], noise: Optional[Tensor], temperature: float,
                       save_a1: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LIST launch: logits ``[R]`` of the global nodes ``first_node .. first_node + R`` of a list's
    flat pixel buffer, R the rows of the flat position table; soft, hard and a1 as :func:`_gate_forward`."""
    check_launchable(pixels)
    chans = weights[0].shape[1] // (region_size * region_size)
    geometry = dict(n_coarse=1, grid_w=1, strides=(0, 0, 0, 0), node_pixels=node_pixels, first_node=first_node)
    return _launch_layers(pixels, weights[2].shape[0], chans, region_size, weights, noise, temperature, save_a1,
                          **geometry)


def _launch_layers(images, n_regions, chans, region_size, weights, noise, temperature, save_a1, *, n_coarse,
                   grid_w, strides, node_pixels, first_node) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One launch per layer over ``n_regions`` flat regions (a batch's geometry: n_coarse, grid_w,
    the images' strides; a list's: node_pixels and first_node). Flat outputs ``[n_regions]``."""
    w1, b1, pos, w2, b2, w3, b3, w4, b4 = weights
    hidden = w1.shape[0]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"the Triton gate supports hidden <= {MAX_HIDDEN}, got {hidden}; use kernels='reference'")
    logits = images.new_empty(n_regions)
    soft = images.new_empty(n_regions if noise is not None else 0)
    hard = torch.empty(soft.shape, dtype=torch.uint8, device=images.device)  # bytes: no i1 pointers in kernels
    a1 = torch.empty((n_regions if save_a1 else 0, hidden), dtype=torch.float32, device=images.device)
    if n_regions == 0:
        return logits, soft, hard.view(torch.bool), a1
    noise_arg = noise.contiguous() if noise is not None else logits  # never read without HAS_NOISE
    hid = max(16, triton.next_power_of_2(hidden))  # tl.dot needs dimensions >= 16
    grid = lambda meta: (triton.cdiv(n_regions, meta["BLOCK_R"]),)  # noqa: E731
    common = dict(REGION=region_size, HID=hid, HAS_NOISE=noise is not None, DOT_PRECISION=dot_precision(w1.dtype))
    n_nodes = node_pixels.shape[1] if node_pixels is not None else 0
    h1, h2 = (torch.empty(n_regions, hidden, dtype=w1.dtype, device=images.device) for _ in range(2))
    for x, w, b, out, layer in ((None, w1, b1, h1, 1), (h1, w2, b2, h2, 2), (h2, w3, b3, None, 3)):
        gather = layer == 1
        _GATE[grid](
            images if gather else x, images, w, b, pos, w4, b4, noise_arg, a1, out if out is not None else logits,
            logits, soft, hard, node_pixels if node_pixels is not None else logits,
            n_regions, n_coarse, grid_w, hidden, 1.0 / temperature, first_node, n_nodes,
            0 if gather else x.stride(0), *strides, *w.stride(), *pos.stride(), w4.stride(1),
            K=chans * region_size * region_size if gather else hidden, GATHER=gather, HEAD=layer == 3,
            SAVE_PRE=gather and save_a1, LIST=gather and node_pixels is not None, **common,
        )
    return logits, soft, hard.view(torch.bool), a1


@kernel_op("msvit::fused_gate", [_GATE])
def _fused_gate_op(images: Tensor, w1: Tensor, b1: Tensor, pos: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                   b3: Tensor, w4: Tensor, b4: Tensor, noise: Optional[Tensor], region_size: int,
                   temperature: float, save_a1: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits, soft, hard, a1); see :func:`_gate_forward`."""
    return _gate_forward(images, region_size, (w1, b1, pos, w2, b2, w3, b3, w4, b4), noise, temperature, save_a1)


@_fused_gate_op.register_fake
def _(images, w1, b1, pos, w2, b2, w3, b3, w4, b4, noise, region_size, temperature, save_a1):
    batch, n_coarse = images.shape[0], (images.shape[2] // region_size) * (images.shape[3] // region_size)
    sampled = (batch, n_coarse) if noise is not None else (0,)
    return (images.new_empty(batch, n_coarse), images.new_empty(sampled),
            images.new_empty(sampled, dtype=torch.bool),
            images.new_empty((batch * n_coarse if save_a1 else 0, w1.shape[0]), dtype=torch.float32))


def _gelu_grad(x: Tensor) -> Tensor:
    """d gelu(x) / dx for the exact GELU: Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _setup_context(ctx, inputs, output):
    images, w1, b1, pos, w2, b2, w3, b3, w4, b4, noise, region_size, temperature, save_a1 = inputs
    _, soft, _, a1 = output
    ctx.save_for_backward(images, w1, w2, b2, w3, b3, w4, soft, a1)
    ctx.region_size, ctx.temperature = region_size, temperature
    ctx.dtypes = [t.dtype for t in (w1, b1, pos, w2, b2, w3, b3, w4, b4)]
    ctx.mark_non_differentiable(a1)


def _backward(ctx, g_logits, g_soft, g_hard, g_a1):
    """Gradients of the nine gate tensors (w1 ... b4) from those of the logits and the soft sample."""
    images, w1, w2, b2, w3, b3, w4, soft, a1 = ctx.saved_tensors
    batch = images.shape[0]
    regions = patchify(images, ctx.region_size).reshape(a1.shape[0], -1)
    grads = _mlp_grads(ctx, g_logits, g_soft, (w2, b2, w3, b3, w4, soft, a1), regions)
    d_pos = grads[2].view(batch, a1.shape[0] // batch, -1).sum(0)  # every image shares the table
    return (None, *_cast(ctx, grads[:2] + (d_pos,) + grads[3:]), None, None, None, None)


def _mlp_grads(ctx, g_logits, g_soft, saved, regions) -> Tuple[Tensor, ...]:
    """fp32 gradients (w1, b1, d_a1 per region, w2, b2, w3, b3, w4, b4) from those of the logits and
    the soft sample: layers 2-4 recomputed from the saved a1, W1's from ``regions`` (the
    re-gathered region pixels ``[R, C*S*S]``)."""
    w2, b2, w3, b3, w4, soft, a1 = saved
    if a1.shape[0] == 0:
        raise RuntimeError("the fused gate ran without saving activations (no parameter required grad)")
    g = torch.zeros(a1.shape[0], device=a1.device) if g_logits is None else g_logits.float().reshape(-1)
    if g_soft is not None and soft.numel():
        s = soft.float().reshape(-1)
        g = g + g_soft.float().reshape(-1) * s * (1 - s) / ctx.temperature
    w2f, w3f, w4f = w2.float(), w3.float(), w4.float()
    h1 = F.gelu(a1)
    a2 = F.linear(h1, w2f, b2.float())
    h2 = F.gelu(a2)
    a3 = F.linear(h2, w3f, b3.float())
    h3 = F.gelu(a3)
    d_a3 = g[:, None] * w4f * _gelu_grad(a3)
    d_a2 = (d_a3 @ w3f) * _gelu_grad(a2)
    d_a1 = (d_a2 @ w2f) * _gelu_grad(a1)
    # W1's gradient in the pixels' dtype, as autograd of the torch gate would compute it
    d_w1 = (d_a1.to(regions.dtype).transpose(0, 1) @ regions).float()
    return (d_w1, d_a1.sum(0), d_a1, d_a2.transpose(0, 1) @ h1, d_a2.sum(0),
            d_a3.transpose(0, 1) @ h2, d_a3.sum(0), (g[:, None] * h3).sum(0, keepdim=True), g.sum().reshape(1))


def _cast(ctx, grads) -> Tuple[Tensor, ...]:
    return tuple(grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes))


_fused_gate_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("msvit::list_fused_gate", [_GATE])
def _list_gate_op(pixels: Tensor, node_pixels: Tensor, w1: Tensor, b1: Tensor, pos: Tensor, w2: Tensor, b2: Tensor,
                  w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, noise: Optional[Tensor], first_node: int,
                  region_size: int, segment: int, temperature: float,
                  save_a1: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits, soft, hard, a1) of a list; see :func:`_list_gate_forward` (``segment`` serves the backward)."""
    weights = (w1, b1, pos, w2, b2, w3, b3, w4, b4)
    return _list_gate_forward(pixels, node_pixels, first_node, region_size, weights, noise, temperature, save_a1)


@_list_gate_op.register_fake
def _(pixels, node_pixels, w1, b1, pos, w2, b2, w3, b3, w4, b4, noise, first_node, region_size, segment,
      temperature, save_a1):
    n_regions = pos.shape[0]
    sampled = n_regions if noise is not None else 0
    return (pixels.new_empty(n_regions), pixels.new_empty(sampled), pixels.new_empty(sampled, dtype=torch.bool),
            pixels.new_empty((n_regions if save_a1 else 0, w1.shape[0]), dtype=torch.float32))


def _list_setup_context(ctx, inputs, output):
    pixels, node_pixels, w1, b1, pos, w2, b2, w3, b3, w4, b4, noise, first_node, region_size, segment = inputs[:15]
    _, soft, _, a1 = output
    ctx.save_for_backward(pixels, node_pixels, w1, w2, b2, w3, b3, w4, soft, a1)
    ctx.first_node, ctx.region_size, ctx.segment, ctx.temperature = first_node, region_size, segment, inputs[15]
    ctx.dtypes = [t.dtype for t in (w1, b1, pos, w2, b2, w3, b3, w4, b4)]
    ctx.mark_non_differentiable(a1)


def _list_backward(ctx, g_logits, g_soft, g_hard, g_a1):
    """The gate tensors' gradients of a list: as the batch op's, the region pixels re-gathered from
    the flat buffer (``reference.flat_cells``) and the flat position table's row r getting region r's."""
    pixels, node_pixels, w1, w2, b2, w3, b3, w4, soft, a1 = ctx.saved_tensors
    size, chans = ctx.region_size, w1.shape[1] // (ctx.region_size * ctx.region_size)
    nodes = torch.arange(ctx.first_node, ctx.first_node + a1.shape[0], device=pixels.device)
    regions = flat_cells(pixels, node_pixels, nodes, size, chans, ctx.segment).flatten(1)
    grads = _mlp_grads(ctx, g_logits, g_soft, (w2, b2, w3, b3, w4, soft, a1), regions)
    return (None, None, *_cast(ctx, grads), None, None, None, None, None, None)


_list_gate_op.register_autograd(_list_backward, setup_context=_list_setup_context)


class FusedGateOutput(NamedTuple):
    """logits ``[B, Nc]``; soft ``[B, Nc]`` and hard bool ``[B, Nc]`` (True = fine), or None
    when no noise was given. Everything in the images' dtype except ``hard``."""

    logits: Tensor
    soft: Optional[Tensor]
    hard: Optional[Tensor]


def fused_gate(images: Tensor, region_size: int, w1: Tensor, b1: Tensor, pos: Tensor, w2: Tensor, b2: Tensor,
               w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, *, noise: Optional[Tensor] = None,
               temperature: float = 0.3) -> FusedGateOutput:
    """The gate of every coarse region of ``images`` with the Triton kernel.

    images: float16/bfloat16/float32 ``[B, C, H, W]`` on CUDA (CPU only under TRITON_INTERPRET=1),
    any strides, H and W multiples of ``region_size``; weights as in
    :func:`reference.gate_mlp_reference` (same dtype as images; hidden <= 128), pos ``[Nc, hidden]``;
    noise: optional logistic noise ``[B, Nc]`` for the Gumbel-Sigmoid sample at ``temperature``.
    Differentiable w.r.t. the weights and pos (through logits and soft), not the images.
    """
    weights = (w1, b1, pos, w2, b2, w3, b3, w4, b4)
    save_a1 = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    if skips_custom_op(*weights):
        logits, soft, hard, _ = _gate_forward(images, int(region_size), weights, noise, float(temperature), False)
    else:
        logits, soft, hard, _ = _fused_gate_op(images, *weights, noise, int(region_size), float(temperature), save_a1)
    if noise is None:
        return FusedGateOutput(logits, None, None)
    return FusedGateOutput(logits, soft, hard)


def list_fused_gate(pixels: Tensor, node_pixels: Tensor, nodes: range, region_size: int, segment: int, w1: Tensor,
                    b1: Tensor, pos: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor,
                    *, noise: Optional[Tensor] = None, temperature: float = 0.3) -> FusedGateOutput:
    """The gate of global nodes of a list of images of different sizes, one launch per layer.

    pixels: float16/bfloat16/float32 ``[sum C H_b W_b]``, every ``[C, H_b, W_b]`` image flattened in
    turn (the list's flat pixel buffer), on CUDA (CPU only under TRITON_INTERPRET=1); node_pixels:
    int64 ``[4, n_nodes]`` (``tree_batch.TreeBatch.node_pixels``) on the pixels' device; nodes: the
    range of global nodes to gate, each a whole ``region_size`` px cell (every node of one scale);
    segment: a width dividing every origin, stride and region_size (the fine patch), for the
    backward's gather; weights as :func:`fused_gate`, pos the flat position table
    ``[len(nodes), hidden]`` (row r: node ``nodes[r]``'s row of its image's table at its own grid);
    noise: optional logistic noise ``[len(nodes)]``. Returns flat ``[len(nodes)]`` fields, equal to
    ``reference.gate_mlp_patches`` on ``reference.flat_cells`` of the nodes; differentiable w.r.t. the
    weights and pos (through logits and soft), not the pixels. No host read.
    """
    check_flat_nodes(pixels, node_pixels, nodes)
    if pos.dim() != 2 or pos.shape[0] != len(nodes):
        raise ValueError(f"pos must be the flat position table [{len(nodes)}, hidden] (a row per node), "
                         f"got {list(pos.shape)}")
    if noise is not None and noise.shape != (len(nodes),):
        raise ValueError(f"noise must be [{len(nodes)}] (one value per node), got {list(noise.shape)}")
    if w1.dtype != pixels.dtype:
        raise TypeError(f"the weights ({w1.dtype}) and pixels ({pixels.dtype}) must have the same dtype")
    weights = (w1, b1, pos, w2, b2, w3, b3, w4, b4)
    save_a1 = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    args = (nodes.start, int(region_size))
    if skips_custom_op(*weights):
        logits, soft, hard, _ = _list_gate_forward(pixels, node_pixels, *args, weights, noise, float(temperature), False)
    else:
        logits, soft, hard, _ = _list_gate_op(pixels, node_pixels, *weights, noise, *args, int(segment),
                                              float(temperature), save_a1)
    if noise is None:
        return FusedGateOutput(logits, None, None)
    return FusedGateOutput(logits, soft, hard)
