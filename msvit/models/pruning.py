"""EViT-style token pruning on packed mixed-scale tokens (Section 4.2.2, Appendix E.2).

At chosen blocks each image keeps the ``k = ceil(keep_ratio * n)`` of its ``n`` patch tokens that
its class token attends to most (attention averaged over heads, softmax within the image's own
sequence); prefix tokens (cls, registers) always stay. With ``fuse`` the pruned tokens of an image
become one extra token, their average weighted by that attention (EViT's "inattentive token
fusion"; EViT sums them with the raw weights, we normalise so the token keeps the scale of the
others). Every image keeps its own count: the batch stays packed and varlen, and the packed
layout is rebuilt after each pruning (one host read: the new total and longest sequence).

The gate's packed tokens are the input, so mixed-scale tokenization and pruning compose: the mask
needs no separate sort-and-prune (E.2), each surviving row carries its own scale; ``origin`` maps
every row back to the unpruned packed batch.

Placement: blocks run through ``msvit.models.layers.packed_blocks`` unchanged, so the pruning of block
``i`` uses block ``i``'s class attention and applies to its output. EViT prunes between the
block's attention and its MLP; here block ``i``'s MLP still runs on all of its tokens (one MLP
pass more per pruning layer than EViT), and every later block runs on the survivors.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from msvit.io.architecture import msvit as describe_msvit
from msvit.models.gate import Budget
from msvit.models.layers import packed_blocks
from msvit.models.mixed_scale_vit import Images, MSViT, MSViTOutput, PackedFeatures
from msvit_kernels.varlen import MixedScaleIndex, cu_seqlens_from_lengths, host_total_and_longest

EPS = 1e-9  # keep_ratio * n within EPS of an integer counts as that integer (0.7 * 10 = 7.000000000000001)


class PrunedIndex(NamedTuple):
    """Varlen metadata of a (possibly pruned) packed batch: the fields ``packed_blocks`` and the
    model's pooling read, plus where each row came from.

    cu_seqlens: int32 ``[B+1]``; max_seqlen, total: ints; rows: int64 ``[T - B*P]`` non-prefix
    rows; prefix_rows: int64 ``[B, P]``; row_image: int64 ``[T]``; origin: int64 ``[T]`` row of
    the unpruned packed batch each row is (-1 for a fused token).
    """

    cu_seqlens: Tensor
    max_seqlen: int
    total: int
    rows: Tensor
    prefix_rows: Tensor
    row_image: Tensor
    origin: Tensor

    @property
    def batch(self) -> int:
        """Images in the batch (a pruned layout has no padding sequences)."""
        return self.cu_seqlens.numel() - 1

    @classmethod
    def from_packed(cls, index: MixedScaleIndex) -> "PrunedIndex":
        origin = torch.arange(index.total, device=index.cu_seqlens.device)
        return cls(
            index.cu_seqlens, index.max_seqlen, index.total, index.rows, index.prefix_rows, index.row_image, origin
        )


@dataclass(frozen=True)
class PruneConfig:
    """keep_ratio in (0, 1]: share of each image's patch tokens kept at each pruning block;
    layers: 0-based block indices after which tokens are pruned (EViT on DeiT-S: 3, 6, 9);
    fuse: fuse each image's pruned tokens into one extra token."""

    keep_ratio: float = 0.7
    layers: Tuple[int, ...] = (3, 6, 9)
    fuse: bool = True

    def __post_init__(self):
        if (
            isinstance(self.keep_ratio, bool)
            or not isinstance(self.keep_ratio, (int, float))
            or not 0 < self.keep_ratio <= 1
        ):
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        layers = tuple(self.layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers) or len(
            set(layers)
        ) != len(layers):
            raise ValueError(f"layers must be distinct non-negative block indices, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(sorted(layers)))


def prune_options(config: PruneConfig) -> dict:
    """``PrunedMSViT``'s keywords as a checkpoint's ``config["pruning"]`` records them."""
    return {"keep_ratio": config.keep_ratio, "layers": list(config.layers), "fuse": config.fuse}


def cls_attention(q: Tensor, k: Tensor, scale: float, index: PrunedIndex) -> Tensor:
    """``[T]``: the attention of each row's image's class token to the row, mean over heads.

    q, k: ``[T, H, D]`` (after q/k norm); the softmax runs over each image's own rows, so the
    values of one image sum to 1. Costs O(T * H * D): only the class token's row of scores.
    """
    batch = index.cu_seqlens.numel() - 1
    q_cls = q[index.prefix_rows[:, 0]]  # [B, H, D]
    scores = (k * q_cls[index.row_image]).sum(-1) * scale  # [T, H]
    heads = scores.shape[1]
    image = index.row_image[:, None].expand(-1, heads)
    peak = scores.new_full((batch, heads), float("-inf")).scatter_reduce(0, image, scores, "amax")
    e = torch.exp(scores - peak[index.row_image])
    total = e.new_zeros(batch, heads).index_add_(0, index.row_image, e)
    return (e / total[index.row_image]).mean(1)


def keep_counts(index: PrunedIndex, keep_ratio: float) -> Tuple[Tensor, Tensor]:
    """(patch tokens per image ``n``, kept per image ``ceil(keep_ratio * n)``), int64 ``[B]``."""
    n = (index.cu_seqlens[1:] - index.cu_seqlens[:-1]).long() - index.prefix_rows.shape[1]
    kept = torch.ceil(n.double() * keep_ratio - EPS).long().clamp(min=0)
    return n, torch.minimum(kept, n)


def prune_tokens(
    x: Tensor, scores: Tensor, index: PrunedIndex, keep_ratio: float, fuse: bool
) -> Tuple[Tensor, PrunedIndex]:
    """Keep each image's top-k patch rows by ``scores`` (plus its prefix rows, and a fused row).

    x: ``[T, C]``; scores: ``[T]`` (class attention; its gradient reaches the fused tokens).
    Returns ``[T', C]`` with every image's rows in their original order (prefix first), the fused
    row last, and the rebuilt index. One host read (T' and the longest sequence).
    """
    batch, total = index.cu_seqlens.numel() - 1, x.shape[0]
    n_prefix = index.prefix_rows.shape[1]
    device = x.device
    n, kept = keep_counts(index, keep_ratio)
    start = index.cu_seqlens[:-1].long()
    is_prefix = torch.zeros(total, dtype=torch.bool, device=device)
    is_prefix[index.prefix_rows.flatten()] = True

    # Rank rows within their image, prefix first, then by descending score (two stable sorts).
    key = torch.where(is_prefix, torch.full_like(scores, float("inf")), scores.detach())
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(index.row_image[order], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(total, device=device) - start[index.row_image[order]]
    keep = rank < (n_prefix + kept)[index.row_image]

    fused_rows = (kept < n) & fuse
    lengths = n_prefix + kept + fused_rows.long()
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    new_total, max_seqlen = host_total_and_longest(cu_seqlens)

    # Candidates: every row, then one fused row per image. Sorting by (image, offset) with the
    # fused row at offset T puts it last in its image; dropped candidates sort past the end.
    offset = torch.arange(total, device=device) - start[index.row_image]
    keys = torch.cat([index.row_image * (total + 1) + offset, torch.arange(batch, device=device) * (total + 1) + total])
    valid = torch.cat([keep, fused_rows])
    source = torch.argsort(torch.where(valid, keys, batch * (total + 1)), stable=True)[:new_total]
    candidates = x
    if fuse:
        weight = torch.where(keep, torch.zeros_like(scores), scores)
        mass = weight.new_zeros(batch).index_add_(0, index.row_image, weight).clamp_min(1e-30)
        fused = x.new_zeros(batch, x.shape[1]).index_add_(0, index.row_image, x * weight[:, None].to(x.dtype))
        candidates = torch.cat([x, fused / mass[:, None].to(x.dtype)])
    origin = torch.cat([index.origin, index.origin.new_full((batch,), -1)]).index_select(0, source)

    row_image = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=new_total)
    new_offset = torch.arange(new_total, device=device) - cu_seqlens.long()[row_image]
    rows = torch.argsort((new_offset < n_prefix).to(torch.uint8), stable=True)[: new_total - batch * n_prefix]
    prefix_rows = cu_seqlens[:-1, None].long() + torch.arange(n_prefix, device=device)
    return candidates.index_select(0, source), PrunedIndex(
        cu_seqlens, max_seqlen, new_total, rows, prefix_rows, row_image, origin
    )


PrunedOutput = MSViTOutput  # the old name of the shared output type, kept for one release


class PrunedMSViT(nn.Module):
    """An MSViT whose packed tokens are pruned EViT-style at ``layers`` (see ``PruneConfig``).

    Wraps the model (shares its weights; the model itself is unchanged). Needs a class token.
    With ``keep_ratio=1`` it computes exactly what the model computes in packed mode.
    """

    def __init__(
        self,
        model: MSViT,
        keep_ratio: float = 0.7,
        layers: Sequence[int] = (3, 6, 9),
        fuse: bool = True,
        config: Optional[PruneConfig] = None,
    ):
        super().__init__()
        if not isinstance(model, MSViT):
            raise TypeError(f"model must be an msvit.MSViT, got {type(model).__name__}")
        config = config or PruneConfig(keep_ratio, tuple(layers), fuse)
        if getattr(model, "rope", None) is not None:
            # the pruned index does not carry the tokens' positions, so their rotations would be lost
            raise NotImplementedError("PrunedMSViT does not support RoPE models (rotary position embeddings)")
        if model.tokenizer.num_prefix == 0:
            raise ValueError("EViT ranks tokens by the class token's attention; this model has no class token")
        if config.layers and config.layers[-1] >= len(model.blocks):
            raise ValueError(f"pruning layers {config.layers} must be below the model's depth {len(model.blocks)}")
        self.model = model
        self.config = config

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def in_chans(self) -> int:
        return self.model.in_chans

    @property
    def gate(self) -> nn.Module:
        """The wrapped model's gate."""
        return self.model.gate

    def describe_architecture(self) -> dict:
        """What ``config.json`` records: the wrapped model's architecture and the pruning
        (``msvit.io.architecture.describe``)."""
        return {**describe_msvit(self.model), "pruning": prune_options(self.config)}

    def forward(self, images: Images, *, mask=None, budget: Budget = None, return_gate: bool = False):
        """Classify ``images [B, C, H, W]``, or a list of ``[C, H_b, W_b]`` images of different sizes
        (one packed forward; each image pruned within its own sequence, as alone), with pruning;
        arguments as ``MSViT.forward`` (packed)."""
        features, counts = self._pruned_features(images, mask, budget)
        logits = self.forward_head(features)
        if not return_gate:
            return logits
        tokens = torch.stack([(cu[1:] - cu[:-1]).long() for cu in counts])
        return MSViTOutput(logits, features.gate, tokens)

    def forward_features(self, images: Images, *, mask=None, budget: Budget = None) -> PackedFeatures:
        """The final-normed packed tokens that survive pruning; their ``index`` is a ``PrunedIndex``
        (it has no ``fine_to_row``: pruned tokens cannot be unpacked to the fine grid)."""
        return self._pruned_features(images, mask, budget)[0]

    def forward_head(self, features: PackedFeatures, pre_logits: bool = False) -> Tensor:
        """The wrapped model's ``forward_head``: pooling, fc_norm and classifier."""
        return self.model.forward_head(features, pre_logits)

    def _pruned_features(self, images: Images, mask, budget: Budget) -> Tuple[PackedFeatures, list]:
        """(features, the ``cu_seqlens`` entering the first block and after each pruning)."""
        model, config = self.model, self.config
        decision = model.decide(images, mask=mask, budget=budget)
        x, packed = model.tokenizer.pack(images, decision.hard, decision.st)
        x, index = model.norm_pre(x), PrunedIndex.from_packed(packed)
        counts = [index.cu_seqlens]
        start = 0
        for layer in config.layers:
            x = packed_blocks(model.blocks[start:layer], x, index, model.attention_backend)
            x, qk = self._run_capturing_qk(model.blocks[layer], x, index)
            scores = cls_attention(*qk, model.blocks[layer].attn.scale, index)
            x, index = prune_tokens(x, scores, index, config.keep_ratio, config.fuse)
            counts.append(index.cu_seqlens)
            start = layer + 1
        x = packed_blocks(model.blocks[start:], x, index, model.attention_backend)
        return PackedFeatures(model.norm(x), index, decision, model.fine_grid(images)), counts

    def _run_capturing_qk(
        self, block: nn.Module, x: Tensor, index: PrunedIndex
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """Run one block; capture its normed q and k ``[T, H, D]`` from the q/k norm modules, which
        ``run_block`` applies to them (no second qkv projection)."""
        captured = {}
        hooks = [
            block.attn.q_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
            block.attn.k_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
        ]
        try:
            x = packed_blocks([block], x, index, self.model.attention_backend)
        finally:
            for hook in hooks:
                hook.remove()
        return x, (captured["q"], captured["k"])
