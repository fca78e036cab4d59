"""MAC counting from the tokens each image actually gets.

Counted: the patch embedding per token, the gate per region, every block's linear layers per
token and its attention's two N^2 matrix products (QK^T and AV), and the head. Not counted
(as in the paper's DeepSpeed counts and FlopCounterMode): norms, activations, softmax, the
position-embedding add and the 2x2 average pooling of coarse patches. With APT's aggregation
(``aggregate="zero_conv"``) every coarse token adds its r*r sub-patch embeddings, the r x r conv
and the linear layer (``aggregation``); with more than two scales the package computes the term of
every node at once (``ZeroConvAggregation.tree_terms``): every finest cell's embedding, and the conv
and the linear layer once per node of every scale >= 1, whatever the mask.

A list of images of different sizes is counted per image (``count_macs``): each image's MACs are
those it costs alone, since a packed forward's attention stays within each image's sequence.
"""

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from msvit.models.checks import is_image_list
from msvit.models.mixed_scale_vit import Images, MSViT
from msvit_kernels.varlen import count_border_cells


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def macs_for_tokens(
    model: MSViT,
    tokens: Tensor,
    n_regions: int,
    include_gate: bool = True,
    coarse: Optional[Tensor] = None,
    fine_grid=None,
) -> Dict[str, Tensor]:
    """MACs per image, by part, for images with ``tokens`` ``[B]`` tokens each (prefix included).

    coarse: coarse tokens per image ``[B]`` (counted only with APT's aggregation); default: from
    ``tokens``, for images of the size the model was built for (whose border cells it knows).
    fine_grid: the images' finest grid (more than two scales with APT's aggregation; default the
    model's)."""
    tokens = tokens.to(torch.float64)
    tokenizer = model.tokenizer
    patch_tokens = tokens - tokenizer.num_prefix
    embed = tokenizer.embed
    embed_macs = embed.in_features * embed.out_features
    parts = {"embed": patch_tokens * embed_macs}
    if tokenizer.aggregation is not None and tokenizer.scales > 2:  # every node, every mask (docstring)
        tree = tokenizer.tree(tokenizer.grid if fine_grid is None else fine_grid)
        per_image = tree.counts[0] * embed_macs + sum(tree.counts[1:]) * tokenizer.aggregation.macs_per_token()
        parts["aggregation"] = torch.full_like(tokens, float(per_image))
    elif tokenizer.aggregation is not None:
        if coarse is None:  # tokens = P + border + Nc + (r*r - 1) * fine regions
            fixed = tokenizer.num_prefix + count_border_cells(tokenizer.grid, tokenizer.ratio) + n_regions
            coarse = n_regions - (tokens - fixed) / max(tokenizer.ratio**2 - 1, 1)
        per_token = tokenizer.ratio**2 * embed_macs + tokenizer.aggregation.macs_per_token()
        parts["aggregation"] = coarse.to(torch.float64) * per_token
    gate = gate_macs(model, n_regions) if include_gate else 0
    parts["gate"] = torch.full_like(tokens, float(gate))
    linear = sum(_linear_macs(block) for block in model.blocks)
    attn_dim = sum(block.attn.num_heads * block.attn.head_dim for block in model.blocks)
    parts["blocks_linear"] = tokens * linear
    parts["attention"] = 2 * tokens.square() * attn_dim
    parts["head"] = torch.full_like(tokens, float(_linear_macs(model.head)))
    parts["total"] = sum(parts.values())
    return parts


def gate_macs(model: MSViT, n_regions: int, fine_grid=None) -> int:
    """The gate's MACs per image: per region times regions, or, with more than two scales, every
    level's gate over every node of its scale (``fine_grid``: the images', default the model's)."""
    tokenizer = model.tokenizer
    if tokenizer.scales <= 2:
        return model.gate.macs_per_region() * n_regions
    return model.gate.macs(tokenizer.tree(tokenizer.grid if fine_grid is None else fine_grid))


@torch.no_grad()
def count_macs(
    model: MSViT,
    images: Optional[Images] = None,
    *,
    mask=None,
    include_gate: bool = True,
    breakdown: bool = False,
):
    """MACs per image ``[B]`` (float64) for the tokens the model would process.

    images: ``[B, C, H, W]`` (the gate decides the mask) or None with a ``mask`` of a 224px-like
    grid; mask: bool ``[B, Nc]`` overriding the gate (``[B, D]`` split decisions with more than
    two scales: every token then costs one embedding; the area pooling is not counted). The gate is counted unless
    ``include_gate=False`` (it runs whenever the model runs without a given mask).
    ``breakdown=True`` returns a dict of per-part tensors (embed, gate, blocks_linear, attention,
    head, total; aggregation with ``aggregate="zero_conv"``) instead.

    images may be a list of ``[C, H_b, W_b]`` images of different sizes (``mask``: then a list of
    bool ``[D_b]``, as ``MSViT.forward`` takes it): ``[B]`` MACs per image, each equal to that
    image counted alone (the gate decides the whole list at once).
    """
    if is_image_list(images):
        return _count_list(model, images, mask, include_gate, breakdown)
    if mask is None:
        if images is None:
            raise ValueError("count_macs needs images (the gate decides) or a mask")
        mask = model.gate_mask(images)
    elif images is not None:
        model.decide(images, mask=mask)  # validates the mask against the images' grid
    if hasattr(model, "mac_parts"):  # a mixed-scale Swin counts its windows (msvit.models.swin.flops)
        parts = model.mac_parts(mask, include_gate)
    else:
        tokens = model.tokens_per_image(mask, images=images)
        if model.tokenizer.scales > 2:  # the gate's MACs come from the tree of the images' size
            fine_grid = None if images is None else model.tokenizer.grids(images)[0]
            parts = macs_for_tokens(model, tokens, 0, False, fine_grid=fine_grid)
            gate = gate_macs(model, 0, fine_grid) if include_gate else 0
            parts["total"] = parts["total"] + gate
            parts["gate"] = torch.full_like(parts["gate"], float(gate))
        else:
            parts = macs_for_tokens(model, tokens, mask.shape[1], include_gate, coarse=mask.shape[1] - mask.sum(1))
    projector = getattr(model, "projector_macs", None)  # a VLM tower's projector (msvit.models.vlm_tower)
    if projector is not None:
        fine_grid = model.tokenizer.grid if images is None else model.tokenizer.grids(images)[0]
        parts["projector"] = torch.full_like(parts["total"], float(projector(fine_grid)))
        parts["total"] = parts["total"] + parts["projector"]
    return parts if breakdown else parts["total"]


def _count_list(model: MSViT, images, mask, include_gate: bool, breakdown: bool):
    """``count_macs`` of a list: the list's masks (checked against it, or the gate's), then every
    image counted alone with its own mask, parts concatenated."""
    if mask is None:
        mask = model.gate_mask(images)
    else:
        model.decide(images, mask=mask)  # names the mask entry that does not fit its image
    per_image = [
        count_macs(model, image[None], mask=entry[None], include_gate=include_gate, breakdown=True)
        for image, entry in zip(images, mask)
    ]
    parts = {name: torch.cat([part[name] for part in per_image]) for name in per_image[0]}
    return parts if breakdown else parts["total"]
