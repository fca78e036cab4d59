"""What ``from_timm`` needs from a timm model before its blocks, per family (``timm_compat`` for
ViTs, ``naflex`` for NaFlexViT): the patch embedding as MSViT's linear one, position table, prefix
tokens and the norms around them."""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn


class EmbedParts(NamedTuple):
    """What differs between timm families before the blocks: the patch embedding as MSViT's
    linear one ((C, p, p) flattening order), the fine patch, the position table's grid and table
    (``[1, P_pos + h*w, d]`` or None), the prefix tokens ``[1, P, d]`` (or None), whether the
    position table skips the prefix, the norm after the embedding and the one before the blocks;
    grid_positions: instead of a table, a module giving the fine table of any grid by the family's
    own rule (the tokenizer's ``grid_positions``; NaFlexViT)."""

    embed: nn.Linear
    fine: int
    grid: Tuple[int, int]
    pos_embed: Optional[torch.Tensor]
    prefix: Optional[torch.Tensor]
    no_embed_class: bool
    embed_norm: Optional[nn.Module]
    norm_pre: nn.Module
    grid_positions: Optional[nn.Module] = None


def conv_as_linear(proj: nn.Module) -> nn.Linear:
    """A square non-overlapping conv patch embedding as the equal linear one ((C, p, p) order)."""
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.kernel_size[0] != proj.kernel_size[1]:
        raise NotImplementedError("the patch embedding must be a square, non-overlapping Conv2d")
    embed = nn.Linear(proj.weight[0].numel(), proj.out_channels, bias=proj.bias is not None)
    embed = embed.to(device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        embed.weight.copy_(proj.weight.reshape(proj.out_channels, -1))
        if proj.bias is not None:
            embed.bias.copy_(proj.bias)
    return embed
