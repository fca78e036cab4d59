"""One vocabulary for choosing an implementation, shared by every op of the package.

``"auto"`` (the fastest implementation that can run the call: a Triton kernel on CUDA, else the
reference), ``"triton"`` (the kernel, or an error saying why it cannot run here) and
``"reference"`` (pure torch, any device and dtype). Attention adds the wrappers of other libraries,
named for what they are: ``"flash_attn"`` and ``"torch_varlen"``. The old spellings (``"torch"``
for the tokenizer's reference and for torch's varlen attention) keep working for one release with
a DeprecationWarning.
"""

import functools
import warnings
from typing import Callable, Dict, Sequence

import torch
from torch import Tensor

from ._triton import triton_support

IMPLEMENTATIONS = ("auto", "triton", "reference")


def normalize_choice(what: str, value: str, choices: Sequence[str], deprecated: Dict[str, str]) -> str:
    """``value`` if it is one of ``choices``; a deprecated spelling is mapped (with a warning);
    anything else is a ValueError listing the choices."""
    if value in deprecated:
        new = deprecated[value]
        warnings.warn(f"{what} {value!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=3)
        return new
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of: {', '.join(map(repr, choices))}")
    return value


def use_triton(kernels: str, tensor: Tensor, fallback: str = "") -> bool:
    """Resolve a ``kernels`` choice for one call: "reference" -> False; "auto" -> True on CUDA when
    the kernels can run; "triton" -> True, or a RuntimeError saying why they cannot run here.

    fallback: why this call must take the reference path anyway (e.g. a module the kernels do not
    fuse); "auto" follows it silently, "triton" with a warning that says so.
    """
    kernels = normalize_choice("kernels", kernels, IMPLEMENTATIONS, {"torch": "reference"})
    if kernels == "reference":
        return False
    reason = triton_support(tensor)
    if kernels == "triton" and reason:
        raise RuntimeError(f"kernels='triton' cannot run here: {reason}; use kernels='auto' or 'reference'")
    if fallback:
        if kernels == "triton":
            warnings.warn(f"kernels='triton': {fallback}; this call runs the reference tokenizer", stacklevel=3)
        return False
    return not reason and (kernels == "triton" or tensor.device.type == "cuda")


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype the kernels compute in: autocast's for the tensor's device when it is on (custom
    ops are not cast by autocast, so callers cast their inputs), else the tensor's."""
    if torch.is_autocast_enabled(tensor.device.type):
        return torch.get_autocast_dtype(tensor.device.type)
    return tensor.dtype


def triton_installed() -> bool:
    """Whether triton imports here (it is optional off Linux)."""
    from . import _triton

    return _triton.triton is not None


def packed_attention_signature(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k)`` as a packed-attention
    backend function (``attention.Backend.fn``): ``(q, k, v, cu_seqlens, max_seqlen, scale=None, *,
    cu_seqlens_k=None, max_seqlen_k=None)``, the keys in q's layout (the very same tensor) unless a
    layout of their own is given. One signature and one default for the backends that take both."""

    @functools.wraps(fn)
    def backend(q, k, v, cu_seqlens, max_seqlen, scale=None, *, cu_seqlens_k=None, max_seqlen_k=None):
        if cu_seqlens_k is None:
            cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
        return fn(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k)

    del backend.__wrapped__  # help() and inspect.signature show the backend's signature, not fn's
    return backend
