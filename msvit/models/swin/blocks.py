"""One stage of timm Swin blocks on token rows (packed fine tokens, or the dense-masked grid).

The blocks are timm's ``SwinTransformerBlock`` modules (their weights are the model's); only the
window attention changes (``msvit.models.swin.attention``). Layouts are built once per stage for each
(window, shift) its blocks use, not once per block.
"""

from typing import Dict, Optional, Tuple

from torch import Tensor, nn

from msvit.models.layers import drop_images
from msvit.models.swin.attention import window_attention, window_mask
from msvit.models.swin.layout import TokenCoords
from msvit.models.swin.windows import WindowLayout, window_layout
from msvit.models.timm_blocks import add_residual, mlp_branch


def shift_mask(block: nn.Module, device, dtype) -> Optional[Tensor]:
    """timm's shifted-window mask ``[windows per image, N, N]`` of ``block`` (None if unshifted)."""
    if not any(block.shift_size):
        return None
    mask = block.attn_mask
    return mask if mask is not None else block.get_attn_mask(device=device, dtype=dtype)


def run_stage_blocks(
    blocks: nn.Sequential,
    x: Tensor,
    coords: TokenCoords,
    grid: Tuple[int, int],
    batch: int,
    key_active: Optional[Tensor] = None,
) -> Tensor:
    """Run a stage's ``blocks`` on rows ``x [T, C]`` at ``coords`` on ``grid``; returns ``[T, C]``.

    key_active: bool ``[T]`` for the dense-masked baseline (False = not a key), None when every
    row is a present token (packed).
    """
    layouts: Dict[tuple, Tuple[WindowLayout, Tensor]] = {}
    for block in blocks:
        window, shift = tuple(block.window_size), tuple(block.shift_size)
        if (window, shift) not in layouts:
            layout = window_layout(coords, grid, window, shift, key_active)
            layouts[window, shift] = layout, window_mask(layout, shift_mask(block, x.device, x.dtype), x.dtype)
        attended = window_attention(block.attn, block.norm1(x), *layouts[window, shift])
        x = x + drop_images(block.drop_path1, attended, coords.image, batch)
        x = add_residual(x, drop_images(block.drop_path2, mlp_branch(block.mlp, block.norm2(x)), coords.image, batch))
    return x


def check_no_padding(blocks: nn.Sequential, grid: Tuple[int, int], stage: int) -> None:
    """The packed path lays out whole windows only; timm pads a grid that is not a whole number of
    windows with zero tokens that are keys, which present-token windows cannot reproduce."""
    for block in blocks:
        wh, ww = block.window_size
        if grid[0] % wh or grid[1] % ww:
            raise NotImplementedError(
                f"stage {stage} has a {grid[0]}x{grid[1]} token grid, not a whole number of {wh}x{ww} "
                "windows; mixed-scale Swin supports image sizes whose fine stages need no window padding"
            )
