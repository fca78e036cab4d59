"""Patch merging at a stage boundary, on the present fine tokens.

timm's ``PatchMerging`` concatenates each 2x2 group in the order (dx, dy) = (0,0), (0,1), (1,0),
(1,1) (x offset major), normalises and projects. Fine tokens are stored in Z order
(``msvit.models.swin.layout``): every four consecutive rows are one complete 2x2 group in the order
(dy, dx) = (0,0), (0,1), (1,0), (1,1), so merging is a reshape plus a swap of the two offsets.
A group is always complete: a fine region holds whole 2x2 groups at every scale below S_c.
"""

from torch import Tensor, nn


def merge_packed(downsample: nn.Module, x: Tensor) -> Tensor:
    """timm ``PatchMerging`` on Z-ordered rows ``x [4P, C]`` -> ``[P, C_out]`` (parents in Z order)."""
    if x.shape[0] % 4:
        raise ValueError(f"Z-ordered fine tokens come in groups of 4, got {x.shape[0]} rows")
    groups = x.view(-1, 2, 2, x.shape[-1]).transpose(1, 2).flatten(1)  # (dy, dx) -> timm's (dx, dy)
    return downsample.reduction(downsample.norm(groups))
