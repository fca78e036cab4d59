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
fallback of last resort. ``max_seqlen`` (``max_seqlen_k``) must bound every query (key) sequence:
nothing reads the lengths to check it, so a sequence over its bound, which no slot holds whole, gets
NaN in every row, as does every row outside the sequences (before ``cu_seqlens[0]``, after
``cu_seqlens[-1]``) or a sequence running past the rows there are, and every row of a layout whose
offsets decrease; never another row's value. A non-finite value in one sequence stays in it: slot
rows past a sequence's end are zeroed with a ``where`` (docs/design.md section 3).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import packed_attention_signature


def _gather(x: Tensor, cu_seqlens: Tensor, max_seqlen: int):
    """``x [T, H, D]`` -> ``[S, H, L, D]`` slots (zeros past each end) and the slot mask ``[S, L]``."""
    start = cu_seqlens[:-1].long()
    offset = torch.arange(max_seqlen, device=x.device)
    valid = offset < (cu_seqlens[1:].long() - start)[:, None]
    rows = (start[:, None] + offset).clamp(0, max(x.shape[0] - 1, 0))
    slots = x.index_select(0, rows.flatten()).unflatten(0, rows.shape)  # [S, L, H, D]
    # zeros, not a neighbour's values: a where, not a product with the mask (NaN * 0 is NaN, and a
    # slot's tail reads the next sequence's rows, so a product let one image's NaN into the one before)
    slots = torch.where(valid[:, :, None, None], slots, 0.0)
    return slots.transpose(1, 2), valid


@packed_attention_signature
def padded_sdpa_attention(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k) -> Tensor:
    """Non-causal attention within each sequence of a packed batch, as one padded SDPA call.

    q: ``[T, H, D]``, k, v: ``[T_k, H, D]`` (any float dtype and device); cu_seqlens (cu_seqlens_k,
    default cu_seqlens): int32 ``[S+1]``; max_seqlen (max_seqlen_k): Python ints bounding every
    query (key) sequence. Returns ``[T, H, D]`` in q's dtype, differentiable. A query whose key
    sequence is empty gets zeros (flash-attn's convention).
    """
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    # each packed row reads its slot: sequence = the last start <= row (right: empty sequences skip)
    row = torch.arange(q.shape[0], device=q.device)
    sequence = torch.searchsorted(cu_seqlens.long(), row, right=True) - 1
    fits = _fits(cu_seqlens, max_seqlen, q.shape[0]) & _fits(cu_seqlens_k, max_seqlen_k, k.shape[0])
    count = fits.shape[0]
    placed = (sequence >= 0) & (sequence < count)  # inside [cu_seqlens[0], cu_seqlens[-1])
    sequence = sequence.clamp(0, max(count - 1, 0))
    if count:
        placed = placed & fits[sequence]
    if count == 0 or max_seqlen == 0 or max_seqlen_k == 0 or k.shape[0] == 0:  # no query meets a key
        result = q.new_zeros(q.shape)
    else:
        out = _padded_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, scale)
        offset = (row - cu_seqlens.long()[sequence]).clamp(0, max_seqlen - 1)
        result = out.transpose(1, 2)[sequence, offset]  # [T, H, D]
    return torch.where(placed[:, None, None], result, float("nan"))


def _fits(cu_seqlens: Tensor, bound: int, rows: int) -> Tensor:
    """bool ``[S]``: the sequences no longer than ``bound`` that end within the ``rows`` there are,
    none if ``cu_seqlens`` decreases anywhere (rows in two sequences: no row's sequence is known)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return (lengths <= bound) & (cu_seqlens[1:] <= rows) & (lengths >= 0).all()


def _padded_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, scale) -> Tensor:
    """``[S, H, max_seqlen, D]``: every sequence's attention in its slot."""
    qs, _ = _gather(q, cu_seqlens, max_seqlen)
    ks, keys = _gather(k, cu_seqlens_k, max_seqlen_k)
    vs, _ = _gather(v, cu_seqlens_k, max_seqlen_k)
    # a sequence without keys would softmax over nothing (NaN): give it one zero key, zeros out (a
    # where, not a product: a NaN query without keys gets zeros, as in the other backends)
    has_keys = keys.any(1)
    keys = keys | (~has_keys)[:, None] & (torch.arange(keys.shape[1], device=q.device) == 0)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keys[:, None, None, :], scale=scale)
    return torch.where(has_keys[:, None, None, None], out, 0.0)
