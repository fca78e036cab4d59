"""The GPU backends of ``packed_attention``: our Triton kernel, flash-attn and torch's varlen attention
(``torch_varlen``; ``"torch"`` is its deprecated name).

Importing this module (``import msvit_kernels`` does) registers the three backends with
``attention.register_backend``. Each one's ``support(device, dtype, head_dim)`` returns None or a
sentence saying why it cannot run and how to get it; ``packed_attention(backend=name)`` raises
that sentence, ``backend="auto"`` skips to the next one.

``auto`` order (``attention.AUTO_ORDER``): flash_attn, torch_varlen, triton, grouped_sdpa, reference.
On CUDA that is flash_attn, torch_varlen, triton, then the reference. Measured on an H200 (bf16,
ViT-S shapes: 256 images of 50-260 tokens, H=6, D=64; bench/results/cuda-nvidia-h200): torch's
varlen kernel 171 us forward / 1.04 ms forward+backward against ours 193 us / 1.17 ms; flash-attn
was not installed there and stays first as the kernel torch_varlen wraps. Where torch_varlen cannot
run (V100/T4, fp32, head dims not a multiple of 8, torch < 2.10) auto falls to triton. On CPU
``auto`` picks ``grouped_sdpa`` (grouped_attention.py; the fastest whole forwards measured there,
docs/design.md section 13): the Triton interpreter can run the triton backend on CPU
(``TRITON_INTERPRET=1``), but only when asked for by name.

Optional dependencies are detected without importing them eagerly when absent: triton (optional
off Linux) is imported here only if installed; flash-attn only on first use.
"""

import functools
import importlib
import importlib.util
import inspect
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._triton import KERNEL_DTYPES, PORTABLE_CAPABILITY, recording
from .attention import Backend, register_backend
from .dispatch import packed_attention_signature

LOW_PRECISION = (torch.float16, torch.bfloat16)

if importlib.util.find_spec("triton") is not None:
    # Installed: import now, so the torch.library op exists before torch.compile traces a call.
    # A broken triton install fails loudly here rather than hiding behind a "not available".
    from . import attention_launch as _triton_attention
else:
    _triton_attention = None


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> Tuple[int, int]:
    if not torch.cuda.is_available():  # tracing for a GPU no driver here answers for (fake CUDA tensors)
        return divmod(PORTABLE_CAPABILITY, 10)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)


def _sm(device: torch.device) -> str:
    major, minor = _capability(device)
    return f"sm_{major}{minor}"


def _head_dim_reason(head_dim: int, limit: int = 256) -> Optional[str]:
    if head_dim > limit:
        return f"head_dim must be <= {limit}, got {head_dim}; use backend='reference'"
    return None


# ---------------------------------------------------------------------------------------------- triton


def _triton_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if _triton_attention is None:
        return (
            "triton is not installed: pip install triton (or pip install .[triton]); Linux CUDA builds of torch ship it"
        )
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, not {dtype}; use backend='reference'"
    reason = _head_dim_reason(head_dim)
    if reason is not None:
        return reason
    if device.type == "cuda":
        if _capability(device) < (7, 0):
            return f"the Triton kernel needs an NVIDIA GPU of sm_70 (Volta) or newer; this GPU is {_sm(device)}"
        if dtype == torch.bfloat16 and _capability(device) < (8, 0):
            return f"bfloat16 needs sm_80 (Ampere) or newer; this GPU is {_sm(device)}: use float16"
        if head_dim > _triton_attention.MAX_HEAD_DIM_BEFORE_AMPERE and _capability(device) < (8, 0):
            return (
                f"head_dim {head_dim} needs sm_80 (Ampere) or newer for the Triton kernel (it spills on "
                f"{_sm(device)}); use head_dim <= {_triton_attention.MAX_HEAD_DIM_BEFORE_AMPERE} or backend='reference'"
            )
        return None
    if recording():  # launches are recorded, not run (compile report, host-overhead benchmark)
        return None
    if device.type == "cpu":
        if not _triton_attention.INTERPRET:
            return (
                "the Triton kernel runs on CUDA GPUs; on CPU it runs only in the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing msvit_kernels (slow, meant for tests)"
            )
        if dtype == torch.bfloat16:
            return (
                "bfloat16 is not reliable in the Triton interpreter (numpy has no bfloat16); "
                "use float16 or float32 on CPU"
            )
        return None
    return f"the Triton kernel runs on CUDA GPUs, not on {device.type}"


def _triton_auto_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if device.type != "cuda":
        return "auto never picks the Triton interpreter; request backend='triton' explicitly"
    return _triton_support(device, dtype, head_dim)


def _triton_fn(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale=None, **key_layout
) -> Tensor:
    return _triton_attention.triton_packed_attention(q, k, v, cu_seqlens, max_seqlen, scale, **key_layout)


# ---------------------------------------------------------------------------------------------- flash_attn


@functools.lru_cache(maxsize=None)
def _flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=None)
def _flash_varlen_func() -> Callable[..., Tensor]:
    try:
        return importlib.import_module("flash_attn").flash_attn_varlen_func
    except Exception as exc:  # an ABI mismatch with torch shows up here, not in find_spec
        raise RuntimeError(
            f"flash-attn is installed but does not import ({type(exc).__name__}: {exc}); "
            "reinstall it against this torch: pip install --force-reinstall --no-build-isolation flash-attn"
        ) from exc


def _flash_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if device.type != "cuda":
        return f"flash-attn runs on NVIDIA GPUs of the Ampere generation or newer (sm_80+), not on {device.type}"
    if not _flash_installed():
        return "flash-attn is not installed: pip install .[flash] (needs an Ampere or newer GPU)"
    if _capability(device) < (8, 0):
        return f"flash-attn 2 needs an Ampere or newer GPU (sm_80+); this GPU is {_sm(device)}: use backend='triton'"
    if dtype not in LOW_PRECISION:
        return f"flash-attn takes float16 or bfloat16, not {dtype}: cast q, k, v or use backend='triton'"
    return _head_dim_reason(head_dim)


@packed_attention_signature
def flash_attn_packed_attention(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k) -> Tensor:
    """``flash_attn.flash_attn_varlen_func`` on the packed layout.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` fp16/bf16 on CUDA (sm_80+), last dim contiguous;
    cu_seqlens (cu_seqlens_k, default cu_seqlens) int32 ``[B+1]``. Returns ``[T, H, D]``.

    Unchecked layouts (``packed_attention(check_values=False)``): flash-attn validates nothing on
    the device. A row no program computes (a sequence over max_seqlen, rows outside
    ``cu_seqlens[0]:cu_seqlens[-1]``, a negative length from decreasing offsets) keeps whatever
    its new output buffer held, rows two sequences claim (decreasing offsets) are written by both
    in no set order, and offsets past the rows read out of bounds (docs/design.md section 3).
    """
    return _flash_varlen_func()(
        q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, dropout_p=0.0, softmax_scale=scale, causal=False
    )


# ---------------------------------------------------------------------------------------------- torch


@functools.lru_cache(maxsize=None)
def _torch_varlen_attn() -> Optional[Callable[..., Tensor]]:
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    return getattr(importlib.import_module("torch.nn.attention.varlen"), "varlen_attn", None)


@functools.lru_cache(maxsize=None)
def _torch_varlen_takes_scale() -> bool:
    return "scale" in inspect.signature(_torch_varlen_attn()).parameters


def _torch_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if device.type != "cuda":
        return f"torch varlen_attn runs on NVIDIA GPUs of the Ampere generation or newer (sm_80+), not on {device.type}"
    if _torch_varlen_attn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn: it needs torch >= 2.10"
    if _capability(device) < (8, 0):
        return (
            f"torch varlen_attn (flash attention) needs sm_80 (Ampere) or newer; this GPU is {_sm(device)}: "
            "use backend='triton'"
        )
    if dtype not in LOW_PRECISION:
        return f"torch varlen_attn takes float16 or bfloat16, not {dtype}: cast q, k, v or use backend='triton'"
    if head_dim % 8 != 0:
        return f"torch varlen_attn needs head_dim to be a multiple of 8, got {head_dim}; use backend='triton'"
    return _head_dim_reason(head_dim)


@packed_attention_signature
def torch_varlen_packed_attention(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k) -> Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` on the packed layout.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` fp16/bf16 on CUDA (sm_80+); cu_seqlens (cu_seqlens_k,
    default cu_seqlens) int32 ``[B+1]``. Returns ``[T, H, D]``. Unchecked layouts: what
    :func:`flash_attn_packed_attention` says (varlen_attn runs aten's copy of the flash-attn 2 kernels).
    """
    fn = _torch_varlen_attn()
    if scale is not None and not _torch_varlen_takes_scale():
        # early releases take no scale argument: fold the ratio to the default D**-0.5 into q
        q = q * (scale * math.sqrt(q.shape[-1]))
        scale = None
    kwargs = {} if scale is None else {"scale": scale}
    return fn(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **kwargs)


# auto preference (measured, see the module docstring): flash_attn, torch_varlen, triton, then reference.
# All three take a separate key layout (cu_seqlens_k), as flash_attn_varlen_func and varlen_attn do.
register_backend(Backend("flash_attn", flash_attn_packed_attention, _flash_support, separate_kv=True), auto_rank=0)
register_backend(Backend("torch_varlen", torch_varlen_packed_attention, _torch_support, separate_kv=True), auto_rank=1)
register_backend(
    Backend("triton", _triton_fn, _triton_support, auto_support=_triton_auto_support, separate_kv=True), auto_rank=2
)
