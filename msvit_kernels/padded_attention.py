"""``padded_sdpa``: packed attention as one padded SDPA call, with no host read.

Every sequence is gathered into a ``[S, max_seqlen, H, D]`` slot (rows past its end are zeros and
masked as keys), one ``F.scaled_dot_product_attention`` call runs over all slots, and each packed
row reads its result back from slot ``(sequence, offset)``. Every shape depends only on ``T``,
``S`` and ``max_seqlen``, and no value is read by the host, so the call can be captured in a CUDA
graph or traced by ``torch.compile(fullgraph=True)`` on any device. The reference backend
(``reference.packed_attention_reference``) is its oracle; it reads the lengths on the host and
runs one SDPA per sequence instead.

Cost: ``S * max_seqlen^2`` scores against the reference's ``sum(L_i^2)``; the static forward of
``msvit.compile_packed`` takes it on CPU (where no varlen kernel exists) and on GPUs it is the
fallback of last resort. ``max_seqlen`` must bound every sequence: a row past ``max_seqlen`` of its
sequence gets NaN (it could not be computed), never another row's value.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _gather(x: Tensor, cu_seqlens: Tensor, max_seqlen: int):
    """``x [T, H, D]`` -> ``[S, H, L, D]`` slots (zeros past each end) and the slot mask ``[S, L]``."""
    start = cu_seqlens[:-1].long()
    offset = torch.arange(max_seqlen, device=x.device)
    valid = offset < (cu_seqlens[1:].long() - start)[:, None]
    rows = (start[:, None] + offset).clamp(0, max(x.shape[0] - 1, 0))
    slots = x.index_select(0, rows.flatten()).unflatten(0, rows.shape)  # [S, L, H, D]
    slots = slots * valid[:, :, None, None].to(x.dtype)  # zeros, not a neighbour's values
    return slots.transpose(1, 2), valid


def padded_sdpa_attention(
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
    """Non-causal attention within each sequence of a packed batch, as one padded SDPA call.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` (any float dtype and device); cu_seqlens (cu_seqlens_k,
    default cu_seqlens): int32 ``[S+1]``; max_seqlen (max_seqlen_k): Python ints bounding every
    query (key) sequence. Returns ``[T, H, D]`` in q's dtype, differentiable. A query whose key
    sequence is empty gets zeros (flash-attn's convention).
    """
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    if q.shape[0] == 0 or max_seqlen == 0 or max_seqlen_k == 0 or k.shape[0] == 0:
        return q.new_zeros(q.shape)
    qs, _ = _gather(q, cu_seqlens, max_seqlen)
    ks, keys = _gather(k, cu_seqlens_k, max_seqlen_k)
    vs, _ = _gather(v, cu_seqlens_k, max_seqlen_k)
    # a sequence without keys would softmax over nothing (NaN): give it one zero key, masked output
    has_keys = keys.any(1)
    keys = keys | (~has_keys)[:, None] & (torch.arange(keys.shape[1], device=q.device) == 0)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keys[:, None, None, :], scale=scale)
    out = out * has_keys[:, None, None, None].to(out.dtype)
    # each packed row reads its slot: sequence = the last start <= row (right: empty sequences skip)
    row = torch.arange(q.shape[0], device=q.device)
    sequence = torch.searchsorted(cu_seqlens.long(), row, right=True) - 1
    sequence = sequence.clamp(0, cu_seqlens.shape[0] - 2)
    offset = row - cu_seqlens.long()[sequence]
    inside = offset < max_seqlen
    result = out.transpose(1, 2)[sequence, offset.clamp_max(max_seqlen - 1)]  # [T, H, D]
    return torch.where(inside[:, None, None], result, torch.full_like(result, float("nan")))
