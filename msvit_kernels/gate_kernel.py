"""The scale gate as one Triton kernel: region pixels -> 4-layer MLP -> logit (-> Gumbel-Sigmoid).

Each program takes BLOCK_R coarse regions (flat over the batch), gathers their ``S_c x S_c x C``
pixels straight from the NCHW image in (C, S, S) order, and runs
``gelu(x W1^T + b1 + pos) -> gelu(. W2^T + b2) -> gelu(. W3^T + b3) -> . w4 + b4`` with ``tl.dot``.
Layer 1 streams W1 in BLOCK_K slices (3072 x 106 at 32px regions does not fit on chip); W2, W3
and w4 stay in registers for the whole program. The hidden width (106 by default) is padded to a
power of two with zero-masked weights: a padded unit is gelu(0) = 0 and adds nothing.
Its oracle is ``reference.gate_mlp_reference`` (exact erf GELU on both sides, see tokenize.py).

With caller-supplied logistic noise the kernel also writes ``soft = sigmoid((logit + noise) / tau)``
and ``hard = soft > 0.5`` (``msvit.gate.gumbel_sigmoid`` in one launch, reproducible).

Backward (torch, fp32): the kernel saves the layer-1 pre-activation ``a1`` ``[R, hidden]`` when a
gate parameter needs a gradient; layers 2-4 are recomputed from it (hidden^2 MACs, 4% of the gate)
and W1's gradient is ``dA1^T @ regions`` on re-gathered region pixels. No gradient reaches pixels.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import patchify
from .tokenize import INTERPRET, check_launchable, dot_precision, patch_features, tl, triton

MAX_HIDDEN = 128  # W2 and W3 are held in registers as HID x HID tiles

if triton is not None:

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _hidden_layer(h, W, B, stride_out, stride_in, hidden, HID: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """gelu(h @ W^T + b) for h fp32 ``[BLOCK_R, HID]``; W ``[hidden, hidden]`` loaded transposed."""
        offs_in = tl.arange(0, HID)
        offs_out = tl.arange(0, HID)
        mask = (offs_in[:, None] < hidden) & (offs_out[None, :] < hidden)
        wt = tl.load(W + offs_out[None, :] * stride_out + offs_in[:, None] * stride_in, mask=mask, other=0.0)
        bias = tl.load(B + offs_out, mask=offs_out < hidden, other=0.0).to(tl.float32)
        a = tl.dot(h.to(wt.dtype), wt, input_precision=DOT_PRECISION) + bias[None, :]
        return _gelu(a)

    @triton.jit
    def _gate_kernel(
        IMG, W1, B1, POS, W2, B2, W3, B3, W4, B4, NOISE, LOGITS, SOFT, HARD, A1,
        n_regions, n_coarse, grid_w, hidden, inv_temperature,
        stride_ib, stride_ic, stride_ih, stride_iw,
        stride_w1o, stride_w1i, stride_pr, stride_ph,
        stride_w2o, stride_w2i, stride_w3o, stride_w3i, stride_w4i,
        REGION: tl.constexpr, K_IN: tl.constexpr, HID: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_NOISE: tl.constexpr, SAVE_A1: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program: BLOCK_R regions. Region r is image r // n_coarse, raster cell r % n_coarse."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < n_regions
        image = (offs_r // n_coarse).to(tl.int64)  # B * stride_b may pass 2**31
        cell = offs_r % n_coarse
        y0 = (cell // grid_w) * REGION
        x0 = (cell % grid_w) * REGION
        base = IMG + image * stride_ib + y0 * stride_ih + x0 * stride_iw
        offs_h = tl.arange(0, HID)
        mask_h = offs_h < hidden

        acc = tl.zeros([BLOCK_R, HID], dtype=tl.float32)
        for k0 in range(0, K_IN, BLOCK_K):
            offs_k, mask_k, chan, py, px = patch_features(k0, K_IN, REGION, BLOCK_K)
            pix = tl.load(base[:, None] + (chan * stride_ic + py * stride_ih + px * stride_iw)[None, :],
                          mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            w1t = tl.load(W1 + offs_h[None, :] * stride_w1o + offs_k[:, None] * stride_w1i,
                          mask=mask_h[None, :] & mask_k[:, None], other=0.0)
            acc += tl.dot(pix.to(w1t.dtype), w1t, input_precision=DOT_PRECISION)

        bias1 = tl.load(B1 + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        pos = tl.load(POS + cell[:, None] * stride_pr + offs_h[None, :] * stride_ph,
                      mask=mask_r[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        a1 = acc + bias1[None, :] + pos
        if SAVE_A1:
            tl.store(A1 + offs_r.to(tl.int64)[:, None] * hidden + offs_h[None, :], a1,
                     mask=mask_r[:, None] & mask_h[None, :])
        h = _hidden_layer(_gelu(a1), W2, B2, stride_w2o, stride_w2i, hidden, HID, DOT_PRECISION)
        h = _hidden_layer(h, W3, B3, stride_w3o, stride_w3i, hidden, HID, DOT_PRECISION)
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


# GPU tiles are autotuned over these (unmeasured so far: no GPU in the session that wrote them).
# W2 and W3 tiles are HID x HID (128 x 128 for hidden 106): 8 warps keep them in registers.
_CONFIGS = [] if triton is None else [
    triton.Config({"BLOCK_R": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_R": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_R": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
]
if triton is None:
    _launch_gate = None
elif INTERPRET:  # one program at a time: few, large programs
    _launch_gate, _META = _gate_kernel, {"BLOCK_R": 64, "BLOCK_K": 64}
else:  # the kernel only writes what it never reads, so timing a config in place is harmless
    _launch_gate, _META = triton.autotune(_CONFIGS, key=["K_IN", "HID"])(_gate_kernel), {}


def _gate_forward(images: Tensor, region_size: int, weights: Tuple[Tensor, ...], noise: Optional[Tensor],
                  temperature: float, save_a1: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the kernel. Returns logits ``[B, Nc]`` (images' dtype), soft ``[B, Nc]`` and hard bool
    ``[B, Nc]`` (``[0]`` without noise), a1 fp32 ``[B*Nc, hidden]`` (``[0, hidden]`` unless saved)."""
    check_launchable(images)
    w1, b1, pos, w2, b2, w3, b3, w4, b4 = weights
    batch, chans, height, width = images.shape
    grid = (height // region_size, width // region_size)
    n_coarse, hidden = grid[0] * grid[1], w1.shape[0]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"the Triton gate supports hidden <= {MAX_HIDDEN}, got {hidden}; use kernels='torch'")
    n_regions = batch * n_coarse
    logits = images.new_empty(batch, n_coarse)
    soft = images.new_empty((batch, n_coarse) if noise is not None else (0,))
    hard = torch.empty(soft.shape, dtype=torch.uint8, device=images.device)  # bytes: no i1 pointers in kernels
    a1 = torch.empty((n_regions if save_a1 else 0, hidden), dtype=torch.float32, device=images.device)
    if n_regions == 0:
        return logits, soft, hard.view(torch.bool), a1
    noise_arg = noise.contiguous() if noise is not None else logits  # never read without HAS_NOISE
    _launch_gate[lambda meta: (triton.cdiv(n_regions, meta["BLOCK_R"]),)](
        images, w1, b1, pos, w2, b2, w3, b3, w4, b4, noise_arg, logits, soft, hard, a1,
        n_regions, n_coarse, grid[1], hidden, 1.0 / temperature,
        *images.stride(), *w1.stride(), *pos.stride(), *w2.stride(), *w3.stride(), w4.stride(1),
        REGION=region_size, K_IN=chans * region_size * region_size,
        HID=max(16, triton.next_power_of_2(hidden)),  # tl.dot needs dimensions >= 16
        HAS_NOISE=noise is not None, SAVE_A1=save_a1, DOT_PRECISION=dot_precision(w1.dtype), **_META,
    )
    return logits, soft, hard.view(torch.bool), a1


@torch.library.custom_op("msvit::fused_gate", mutates_args=())
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
    if a1.shape[0] == 0:
        raise RuntimeError("the fused gate ran without saving activations (no parameter required grad)")
    batch, n_coarse = images.shape[0], a1.shape[0] // images.shape[0]
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
    regions = patchify(images, ctx.region_size).reshape(a1.shape[0], -1)
    # W1's gradient in the pixels' dtype, as autograd of the torch gate would compute it
    d_w1 = (d_a1.to(regions.dtype).transpose(0, 1) @ regions).float()
    grads = (d_w1, d_a1.sum(0), d_a1.view(batch, n_coarse, -1).sum(0), d_a2.transpose(0, 1) @ h1, d_a2.sum(0),
             d_a3.transpose(0, 1) @ h2, d_a3.sum(0), (g[:, None] * h3).sum(0, keepdim=True), g.sum().reshape(1))
    grads = tuple(grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes))
    return (None, *grads, None, None, None, None)


_fused_gate_op.register_autograd(_backward, setup_context=_setup_context)


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
    logits, soft, hard, _ = _fused_gate_op(images, *weights, noise, int(region_size), float(temperature), save_a1)
    if noise is None:
        return FusedGateOutput(logits, None, None)
    return FusedGateOutput(logits, soft, hard)
