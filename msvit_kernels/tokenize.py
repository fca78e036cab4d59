"""The fused mixed-scale tokenizer: what its three Triton ops share, and when they can run.

The tokenizer reads each image twice and writes only the tokens that survive (Section 2.1):

1. ``gate_kernel.fused_gate``: per coarse region, its ``S_c x S_c x C`` pixels -> 4-layer gate MLP
   -> logit (and, with caller-supplied logistic noise, the Gumbel-Sigmoid sample and the hard
   decision), one launch.
2. ``index_kernel.triton_mixed_scale_index``: tokens per image, ``cu_seqlens``, every region's
   first packed row, then every index map of ``varlen.MixedScaleIndex`` by direct scatter (no
   sort), two launches and the forward's one host read (``T``, ``max_seqlen``).
3. ``pack_kernel.gather_embed_pack``: every surviving token gathers its pixels (a fine patch, or a
   coarse patch area-averaged to the fine size on the fly), ``@ W_embed + b + pos``, times its
   straight-through value, written at its packed row; prefix rows written in place.

Each kernel file reads top to bottom: kernel, launcher, ``torch.library`` op with its autograd
(backwards are torch on re-gathered pixels: no gradient reaches the pixels), entry point. The
oracles are in ``reference.py`` and ``varlen.py``.

Portability (Triton 3.6 to 3.9, sm_70+): pointer arithmetic with masks (no ``tl.make_block_ptr``),
no inline asm, no explicit libdevice import. The gate's exact GELU uses ``tl.math.erf``, a core
Triton op: the compiler lowers it to the libdevice that ships inside Triton (``__nv_erff``) and
the interpreter to ``math.erf``, so the kernel matches ``F.gelu`` (erf form) and needs no tanh
approximation on either side.

On CPU the kernels run only under ``TRITON_INTERPRET=1``, set before this module is imported
(``triton.jit`` decides at decoration time). triton is optional: without it, ``triton_support``
says so and the model layer runs the torch tokenizer.
"""
import warnings

import torch
from torch import Tensor

from .launch import INTERPRET, bfloat16_reason, recording, tl, triton

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_CHOICES = ("auto", "triton", "torch")


if triton is not None:

    @triton.jit
    def patch_features(k0, K: tl.constexpr, PATCH: tl.constexpr, BLOCK_K: tl.constexpr):
        """Features ``k0 .. k0 + BLOCK_K`` of a flattened patch in (C, p, p) order (patchify's, a conv
        weight's): returns (offsets, in-range mask, channel, row, column) with
        ``k = (c * p + y) * p + x``."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return offs_k, offs_k < K, offs_k // (PATCH * PATCH), (offs_k // PATCH) % PATCH, offs_k % PATCH

else:
    patch_features = None


def triton_support(tensor: Tensor) -> str:
    """'' when the tokenizer kernels can run on ``tensor``'s device and dtype, else why not."""
    if triton is None:
        return "triton is not installed: pip install triton (or pip install .[triton])"
    if tensor.dtype not in KERNEL_DTYPES:
        return f"the Triton tokenizer takes float16, bfloat16 or float32 tensors, not {tensor.dtype}"
    if tensor.device.type == "cuda":
        return bfloat16_reason(tensor)
    if (tensor.device.type == "cpu" and INTERPRET) or recording():
        return ""
    return (f"the Triton tokenizer runs on CUDA GPUs, not on {tensor.device.type}; on CPU it runs only under "
            "TRITON_INTERPRET=1 set before importing msvit_kernels (slow, meant for tests)")


def use_triton(kernels: str, tensor: Tensor, fallback: str = "") -> bool:
    """Resolve a ``kernels`` choice for one call: "torch" -> False; "auto" -> True on CUDA when the
    kernels can run; "triton" -> True, or a RuntimeError saying why they cannot run here.

    fallback: why this call must take the torch path anyway (e.g. a module the kernels do not
    fuse); "auto" follows it silently, "triton" with a warning that says so.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of: {', '.join(map(repr, KERNEL_CHOICES))}")
    if kernels == "torch":
        return False
    reason = triton_support(tensor)
    if kernels == "triton" and reason:
        raise RuntimeError(f"kernels='triton' cannot run here: {reason}; use kernels='auto' or 'torch'")
    if fallback:
        if kernels == "triton":
            warnings.warn(f"kernels='triton': {fallback}; this call runs the torch tokenizer", stacklevel=3)
        return False
    return not reason and (kernels == "triton" or tensor.device.type == "cuda")


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype the kernels compute in: autocast's for the tensor's device when it is on (custom
    ops are not cast by autocast, so callers cast their inputs), else the tensor's."""
    if torch.is_autocast_enabled(tensor.device.type):
        return torch.get_autocast_dtype(tensor.device.type)
    return tensor.dtype


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact fp32 products ("ieee", no TF32) so results track the fp32 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_launchable(images: Tensor) -> None:
    """Raise the ``triton_support`` reason for ``images`` if the kernels cannot run on it."""
    reason = triton_support(images)
    if reason:
        raise RuntimeError(reason)
