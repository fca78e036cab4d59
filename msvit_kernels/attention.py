"""``packed_attention``: non-causal attention over a packed batch of variable-length sequences.

The layout is flash-attn's varlen layout: all tokens of all images stacked in one ``[T, H, D]``
tensor, and ``cu_seqlens`` (int32 ``[B+1]``) marking where each image starts. Keys and values may
have a layout of their own (``cu_seqlens_k``, as ``flash_attn_varlen_func``'s ``cu_seqlens_k``):
query sequence ``b`` then attends to key sequence ``b`` (e.g. one pooling query per image over
that image's tokens). Backends register themselves in ``BACKENDS``; ``auto`` takes the first one
in ``AUTO_ORDER`` that can run the call.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .dispatch import normalize_choice
from .grouped_attention import (
    grouped_sdpa_attention,
    grouped_sdpa_auto_support,
    grouped_sdpa_block_attention,
    grouped_sdpa_support,
)
from .padded_attention import padded_sdpa_attention
from .reference import packed_attention_reference

DEPRECATED_BACKENDS = {"torch": "torch_varlen"}  # old name -> name, accepted for one release
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One way of computing packed attention.

    ``support(device, dtype, head_dim)`` returns None when the backend can run such a call, else
    a sentence saying why not and how to get it. ``fn(q, k, v, cu_seqlens, max_seqlen, scale)``
    computes self-attention; a backend with ``separate_kv=True`` also takes the keywords
    ``cu_seqlens_k=, max_seqlen_k=`` (keys in a layout of their own; passed only when the caller
    gives one, so backends registered before the keywords existed keep working).
    ``auto_support`` (same signature, default ``support``) is the stricter check ``backend="auto"``
    uses: a backend can be able to run somewhere without being a good choice there (the Triton
    interpreter on CPU runs, slowly, for tests). ``host_free``: a call reads nothing back to the
    host (shapes and launches follow ``max_seqlen`` and tensor shapes only), so it can run inside a
    CUDA graph or a ``torch.compile(fullgraph=True)`` graph; the reference reads the lengths.
    ``block_fn`` (default ``fn``, self-attention signature) is what a model's blocks call through
    ``resolved_attention``, where a backend may skip work a block does not need.
    """

    name: str
    fn: Callable[..., Tensor]
    support: Callable[[torch.device, torch.dtype, int], Optional[str]]
    auto_support: Optional[Callable[[torch.device, torch.dtype, int], Optional[str]]] = None
    separate_kv: bool = False
    host_free: bool = True
    block_fn: Optional[Callable[..., Tensor]] = None


def _reference_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    return None


BACKENDS: Dict[str, Backend] = {
    "reference": Backend(
        "reference", packed_attention_reference, _reference_support, separate_kv=True, host_free=False
    ),
    "padded_sdpa": Backend("padded_sdpa", padded_sdpa_attention, _reference_support, separate_kv=True),
    "grouped_sdpa": Backend(
        "grouped_sdpa",
        grouped_sdpa_attention,
        grouped_sdpa_support,
        auto_support=grouped_sdpa_auto_support,
        separate_kv=True,
        host_free=False,
        block_fn=grouped_sdpa_block_attention,
    ),
}

# Preference for backend="auto", fastest first. Backends from later modules insert themselves
# by measured speed (see bench/results/); grouped_sdpa is the CPU's (docs/design.md section 13);
# the reference runs anywhere and closes the list.
AUTO_ORDER: List[str] = ["grouped_sdpa", "reference"]


def register_backend(backend: Backend, auto_rank: Optional[int] = None) -> None:
    """Add a backend; ``auto_rank`` is its index in the auto preference list (None: not used by auto)."""
    BACKENDS[backend.name] = backend
    if auto_rank is not None and backend.name not in AUTO_ORDER:
        AUTO_ORDER.insert(auto_rank, backend.name)


def available_backends(device=None, dtype: Optional[torch.dtype] = None, head_dim: int = 64) -> List[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    _check_device_here(device)
    dtypes = [dtype] if dtype is not None else list(FLOAT_DTYPES)
    return [
        name
        for name, backend in BACKENDS.items()
        if any(backend.support(device, dt, head_dim) is None for dt in dtypes)
    ]


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, separate_kv: bool = False
) -> Backend:
    """The backend that runs a call: ``name`` itself (or a clear error), or the auto choice.

    ``separate_kv``: the call gives keys a layout of their own (``cu_seqlens_k``)."""
    name = normalize_choice("packed-attention backend", name, ["auto", *BACKENDS], DEPRECATED_BACKENDS)
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = BACKENDS[candidate]
            if separate_kv and not backend.separate_kv:
                continue
            if (backend.auto_support or backend.support)(device, dtype, head_dim) is None:
                return backend
        raise RuntimeError(f"no packed-attention backend supports {device}, {dtype}")  # unreachable: reference
    backend = BACKENDS[name]
    reason = backend.support(device, dtype, head_dim)
    if reason is None and separate_kv and not backend.separate_kv:
        reason = "it does not take a separate key layout (cu_seqlens_k); use backend='reference'"
    if reason is not None:
        raise RuntimeError(f"packed-attention backend {name!r} cannot run here: {reason}")
    return backend


def resolve_host_free_backend(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, separate_kv: bool = False
) -> Backend:
    """The backend a static forward (no host read: CUDA graphs, ``torch.compile``) runs: ``auto``
    takes the first host-free backend of the auto order that can run here, else ``padded_sdpa``;
    a named backend must be host-free (the reference is not) and able to run."""
    if normalize_choice("packed-attention backend", name, ["auto", *BACKENDS], DEPRECATED_BACKENDS) != "auto":
        backend = resolve_backend(name, device, dtype, head_dim, separate_kv)
        if not backend.host_free:
            raise ValueError(
                f"packed-attention backend {name!r} reads sequence lengths on the host, which a static forward "
                "(CUDA graph, torch.compile) cannot do; use 'auto' or one of: "
                + ", ".join(repr(n) for n, b in BACKENDS.items() if b.host_free)
            )
        return backend
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        if backend.host_free and (not separate_kv or backend.separate_kv):
            if (backend.auto_support or backend.support)(device, dtype, head_dim) is None:
                return backend
    return BACKENDS["padded_sdpa"]


def resolved_attention(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, *, host_free: bool = False
) -> Callable[..., Tensor]:
    """``fn(q, k, v, cu_seqlens, max_seqlen, scale)`` of the backend ``name`` resolves to here (the
    host-free one with ``host_free``), for a caller that resolves once and calls many times with a
    layout it built itself (the model's blocks): no validation per call, unlike ``packed_attention``,
    whose checks and backend resolution cost about as much host time as the backend call
    (bench/results/<cpu>/host_overhead.md)."""
    resolve = resolve_host_free_backend if host_free else resolve_backend
    backend = resolve(name, device, dtype, head_dim)
    return backend.block_fn or backend.fn


def _check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float (or None for D ** -0.5), got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"scale must be a finite number > 0 (the softmax temperature, default D ** -0.5), got {scale}: "
            "NaN or infinite scores make every attention weight NaN, zero makes attention a plain average "
            "and a negative scale attends to the least similar keys"
        )


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, separate_kv: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [T, H, D], got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [T, H, D] (3 dims), got shape {tuple(t.shape)}")
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(
            f"q must have at least one head and a head dim >= 1, got [T, H, D] = {tuple(q.shape)} "
            "(an attention with no heads or empty heads has no output features)"
        )
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not separate_kv:
        for name, t in (("k", k), ("v", v)):
            if t.shape != q.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; expected equal [T, H, D] "
                    "(pass cu_seqlens_k= and max_seqlen_k= for keys with a layout of their own)"
                )
        return
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; expected equal [H, D]")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; expected equal [T_k, H, D]")


def _check_layout(cu_name: str, cu: Tensor, max_name: str, max_len, device) -> None:
    """One varlen layout's types: ``cu`` int32 ``[B+1]`` on q's device, ``max_len`` a Python int."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{cu_name} must be an int32 torch.Tensor [B+1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{cu_name} must be int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{cu_name} is on {cu.device} but q is on {device}; put it on q's device")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{cu_name} must be 1-D with B+1 >= 1 entries, got shape {tuple(cu.shape)}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        raise TypeError(f"{max_name} must be a non-negative Python int, got {max_len!r}")


def _check_bounds(cu_name: str, cu: Tensor, max_name: str, max_len: int, total: int, rows: str) -> None:
    """One varlen layout's values: 0 .. ``total``, non-decreasing, none longer than ``max_len``."""
    bounds = cu.tolist()  # one host read; callers that built cu_seqlens themselves skip it
    if bounds[0] != 0:
        raise ValueError(f"{cu_name} must start at 0, got {bounds[0]}")
    if bounds[-1] != total:
        raise ValueError(f"{cu_name} must end at T={total} ({rows}), got {bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{cu_name} must be non-decreasing, got {bounds}")
    if lengths and max(lengths) > max_len:
        raise ValueError(f"{max_name}={max_len} is smaller than the longest sequence ({max(lengths)})")


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen,
    check_values: bool,
    scale=None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_k=None,
) -> None:
    if (cu_seqlens_k is None) != (max_seqlen_k is None):
        given, missing = ("cu_seqlens_k", "max_seqlen_k") if max_seqlen_k is None else ("max_seqlen_k", "cu_seqlens_k")
        raise ValueError(f"{given} was given without {missing}: a separate key layout needs both")
    separate_kv = cu_seqlens_k is not None
    _check_qkv(q, k, v, separate_kv)
    _check_scale(scale)
    _check_layout("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen, q.device)
    if separate_kv:
        _check_layout("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k, q.device)
        if cu_seqlens_k.numel() != cu_seqlens.numel():
            raise ValueError(
                f"cu_seqlens_k has {cu_seqlens_k.numel()} entries but cu_seqlens has {cu_seqlens.numel()}: "
                "query sequence b attends to key sequence b, so both layouts need the same batch count"
            )
    if not check_values:
        return
    _check_bounds("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen, q.shape[0], "q.shape[0]")
    if separate_kv:
        _check_bounds("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k, k.shape[0], "k.shape[0]")


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_k: Optional[int] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    check_values: bool = True,
) -> Tensor:
    """Non-causal attention within each sequence of a packed batch.

    Args:
        q, k, v: ``[T, H, D]``, one float dtype, one device. Strided views (e.g. of a packed
            ``[T, 3, H, D]`` qkv tensor) are accepted. With ``cu_seqlens_k``, k and v are
            ``[T_k, H, D]`` with their own row count.
        cu_seqlens: int32 ``[B+1]`` on q's device: ``0 = cu[0] <= cu[1] <= ... <= cu[B] = T``.
            Sequence ``b`` is rows ``cu[b]:cu[b+1]``; empty sequences are allowed.
        max_seqlen: the longest sequence length (Python int, computed once per forward).
        cu_seqlens_k, max_seqlen_k: keys and values in a layout of their own (both or neither;
            flash-attn's ``cu_seqlens_k`` / ``max_seqlen_k``): int32 ``[B+1]`` over k's rows, same
            B as ``cu_seqlens``; query sequence ``b`` attends to key sequence ``b``. Default:
            self-attention, keys in q's layout. A query whose key sequence is empty gets zeros
            (flash-attn's convention; softmax over no keys is undefined) and a zero gradient.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto" | "triton" | "flash_attn" | "torch_varlen" | "padded_sdpa" | "reference"``
            (``"torch"``: the deprecated name of ``"torch_varlen"``). ``padded_sdpa`` is one padded
            SDPA call with no host read (``msvit_kernels.padded_attention``).
        check_values: verify cu_seqlens' values and max_seqlen (one host read). Callers that built
            them by construction (the model, once per forward) pass False. Unchecked values are
            guarded on the device instead (no host read): reference, padded_sdpa and triton give
            NaN in every row they cannot compute (each row of a sequence longer than max_seqlen,
            or whose keys are longer than max_seqlen_k, and each row outside
            ``cu_seqlens[0]:cu_seqlens[-1]``), never stale memory, and keep the other rows exact;
            a sequence running past q's (k's) rows is NaN too (the reference raises), and every
            row is NaN if the offsets decrease anywhere. flash_attn and torch_varlen check nothing
            (rows they do not compute keep stale memory; docs/design.md section 3). A static
            layout's upper bound and padding sequences are valid input. A NaN in a query gives
            NaN in its row; a non-finite value in one sequence never reaches another's rows.

    Returns:
        ``[T, H, D]`` (q's rows) in q's dtype; differentiable with respect to q, k and v.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, check_values, scale, cu_seqlens_k, max_seqlen_k)
    separate_kv = cu_seqlens_k is not None
    chosen = resolve_backend(backend, q.device, q.dtype, q.shape[-1], separate_kv)
    if not separate_kv:
        return chosen.fn(q, k, v, cu_seqlens, max_seqlen, scale)
    return chosen.fn(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)


def _check_device_here(device: torch.device) -> None:
    """``available_backends`` for a CUDA device this machine does not have raises a RuntimeError
    saying so, rather than torch's "Found no NVIDIA driver" from a capability query, or an empty
    list that would read as "CUDA is here but nothing runs on it"."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RuntimeError(
            f"available_backends({str(device)!r}): no CUDA device is available here "
            "(torch.cuda.is_available() is False); available_backends('cpu') lists the backends of this machine"
        )
    if device.index is not None and device.index >= count:
        raise RuntimeError(
            f"available_backends({str(device)!r}): this machine has {count} CUDA device(s), 0 .. {count - 1}"
        )
