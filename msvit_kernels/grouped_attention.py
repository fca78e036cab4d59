"""``grouped_sdpa``: packed attention as one SDPA call per run of equal-length images (the CPU fast path).

A run of consecutive sequences of equal length (and equal key length) is a strided view
``[n, L, H, D]`` of the packed rows: no gather, no padding. Each run takes one batched
``F.scaled_dot_product_attention`` call (torch's fused CPU flash kernel); a single run (batch 1,
or every image the same length: a token budget) returns the kernel's output as a view, several
runs are joined by one copy. The runs come from the layout's offsets on the host, read once per
layout (``varlen.host_offsets``: the index builder's own read of the token count fills it), and
the plan is cached by those offsets, so the blocks of a forward read nothing and plan nothing.

Why not the alternatives (docs/design.md section 13 has the numbers): ``padded_sdpa`` computes
``S * max_seqlen^2`` scores and copies q, k, v into slots, which costs more than it saves unless
every image has about the same length; buckets of similar lengths (sorted, padded to each bucket's
longest, one masked call each) batch the kernel better, but gathering q, k, v into the buckets and
the rows back costs more than that saves; torch's jagged nested tensors run SDPA on CPU through the
math backend (an unfused softmax, a split with a host read per call). The reference (the oracle)
adds a sum and a host read per call to detect non-finite values, and a copy of every output.

Non-finite values: torch's CPU flash kernel writes zeros for a query whose scores are all NaN (a
NaN in the query), where textbook softmax gives NaN; ``packed_attention`` restores NaN in such a
row from the sum of the query row (a reduction on the device, no host read), so a NaN query gives
a NaN row, as in the reference. A model's blocks skip that pass (``grouped_sdpa_block_attention``
says why). NaN in a key or value gives NaN in its sequence's rows; runs are
separate batch entries of the kernel, so a NaN never reaches another sequence. A layout nobody
checked (a sequence over its bound, rows outside ``cu_seqlens[0]:cu_seqlens[-1]``) goes to the
reference, which gives NaN in the rows it cannot compute.
"""

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import packed_attention_reference
from .varlen import host_offsets


class _Plan(NamedTuple):
    """Runs of a layout: ``(images, query length, key length)`` each, and the rows each run spans."""

    runs: Tuple[Tuple[int, int, int], ...]
    q_rows: List[int]
    k_rows: List[int]


@functools.lru_cache(maxsize=64)
def _plan(
    bounds: Tuple[int, ...], bounds_k: Tuple[int, ...], bound: int, bound_k: int, rows: int, rows_k: int
) -> Optional[_Plan]:
    """The runs of a layout, or None for a layout nobody checked (it goes to the reference). The
    check is cached with the plan: a model's twelve blocks check one layout once."""
    if not (_valid(bounds, bound, rows) and _valid(bounds_k, bound_k, rows_k)):
        return None
    runs: List[List[int]] = []
    for a, b, a_k, b_k in zip(bounds, bounds[1:], bounds_k, bounds_k[1:]):
        if runs and runs[-1][1:] == [b - a, b_k - a_k]:
            runs[-1][0] += 1
        else:
            runs.append([1, b - a, b_k - a_k])
    return _Plan(tuple(tuple(r) for r in runs), [n * lq for n, lq, _ in runs], [n * lk for n, _, lk in runs])


def _valid(bounds: Tuple[int, ...], bound: int, rows: int) -> bool:
    """Offsets from 0 to ``rows``, non-decreasing, no sequence longer than ``bound``."""
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    return bounds[0] == 0 and bounds[-1] == rows and all(0 <= n <= bound for n in lengths)


def grouped_sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
    *,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_k: Optional[int] = None,
) -> Tensor:
    """Non-causal attention within each sequence of a packed batch, one SDPA call per run of
    equal-length sequences.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` (any float dtype and device; views of a fused qkv
    projection are fine); cu_seqlens (cu_seqlens_k, default cu_seqlens): int32 ``[S+1]``;
    max_seqlen (max_seqlen_k): Python ints. Returns ``[T, H, D]`` in q's dtype, differentiable. A
    query whose key sequence is empty gets zeros (flash-attn's convention); a query holding a NaN
    or an infinity gets NaN in its row (the module docstring).
    """
    return _grouped(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k, restore_nan=True)


def grouped_sdpa_block_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: Optional[float] = None
) -> Tensor:
    """``grouped_sdpa_attention`` for a model's blocks (``attention.resolved_attention``): without
    restoring NaN in the rows of non-finite queries, which costs a pass over q and one over the
    output in every block. A block needs none: a query row is non-finite only when its token is
    (the residual stream then carries it to the output) or when a weight is, and then the block
    computes what timm's own block computes with the same CPU kernel (``F.scaled_dot_product_attention``)."""
    return _grouped(q, k, v, cu_seqlens, max_seqlen, scale, None, None, restore_nan=False)


def _grouped(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k, restore_nan: bool) -> Tensor:
    bounds = tuple(host_offsets(cu_seqlens))
    if cu_seqlens_k is None:
        bounds_k, max_seqlen_k = bounds, max_seqlen
    else:
        bounds_k = tuple(host_offsets(cu_seqlens_k))
    plan = _plan(bounds, bounds_k, max_seqlen, max_seqlen_k, q.shape[0], k.shape[0])
    if plan is None:
        return packed_attention_reference(
            q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k
        )
    if len(plan.runs) == 1:  # batch 1 or a budget: no split (a split is ~10 us per block at batch 1)
        outputs = [_run(plan.runs[0], q, k, v, scale)]
    else:
        # split, not slicing: the backward of a split is one concatenation (reference.py says why)
        parts = zip(plan.runs, q.split(plan.q_rows), k.split(plan.k_rows), v.split(plan.k_rows))
        outputs = [_run(run, qg, kg, vg, scale) for run, qg, kg, vg in parts]
    if not outputs:  # no sequence, so no row (T = 0): an empty result in q's graph
        return q * 0
    if not restore_nan:
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if len(outputs) > 1:
        return _nan_where_query_is_not_finite(q, torch.cat(outputs), in_place=True)
    # one run: the kernel's own output, which its backward saves (no in-place write while recording)
    return _nan_where_query_is_not_finite(q, outputs[0], in_place=not outputs[0].requires_grad)


def _run(run: Tuple[int, int, int], q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """One run of ``n`` sequences of ``length`` queries and ``length_k`` keys: its output rows."""
    n, length, length_k = run
    if length == 0:
        return q
    if length_k == 0:  # softmax over no keys: zeros and a zero gradient, kept in q's graph
        return q.masked_fill(torch.ones((), dtype=torch.bool, device=q.device), 0.0)
    heads, dim = q.shape[1:]
    qs, ks, vs = (t.view(n, -1, heads, dim).transpose(1, 2) for t in (q, k, v))  # [n, H, L, D] views
    out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
    return out.transpose(1, 2).reshape(n * length, heads, dim)  # a view of the kernel's output


def _nan_where_query_is_not_finite(q: Tensor, out: Tensor, in_place: bool) -> Tensor:
    """NaN in every row whose query holds a NaN or an infinity (textbook softmax gives NaN there;
    the CPU flash kernel gives zeros for an all-NaN score row). The sum runs in fp32 or wider, so
    finite fp16 never overflows it; a finite fp32 row that overflows it has infinite scores anyway."""
    total = q.detach().sum(-1, keepdim=True, dtype=torch.promote_types(q.dtype, torch.float32))
    if in_place:
        return out.masked_fill_(~total.isfinite(), float("nan"))
    return torch.where(total.isfinite(), out, float("nan"))


def grouped_sdpa_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    return None


def grouped_sdpa_auto_support(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """``auto`` takes it on CPU only: on a GPU the varlen kernels read nothing back to the host."""
    if device.type != "cpu":
        return "auto takes grouped_sdpa on CPU only (it reads the layout's offsets on the host)"
    return None
