"""Where the fine tokens of a mixed-scale Swin sit, stage by stage.

Fine tokens are stored region-major: the fine regions of the batch in raster order (image, then
region row, then region column), and inside each region its r x r tokens in Morton (Z) order.
Z order puts the four tokens that one patch merging fuses next to each other, with the parents
again in Z order, so merging is a reshape and never a search; after the last merge (r = 1) each
region is one token, in the order of the fine regions. docs/design.md section 8.
"""

from typing import NamedTuple, Tuple

import torch
from torch import Tensor


class TokenCoords(NamedTuple):
    """Per token row: image ``[T]``, row ``y [T]`` and column ``x [T]`` on its stage's grid (int64)."""

    image: Tensor
    y: Tensor
    x: Tensor


def morton_offsets(r: int, device=None) -> Tuple[Tensor, Tensor]:
    """(dy, dx) int64 ``[r*r]``: the in-region position of each Z-order index; r a power of two.

    Bit k of dx is bit 2k of the index and bit k of dy is bit 2k+1, so the lowest two bits of an
    index are (dy0, dx0): four consecutive indices form one 2x2 block in the order
    (0,0), (0,1), (1,0), (1,1).
    """
    if r < 1 or r & (r - 1):
        raise ValueError(f"tokens per region side must be a power of two, got {r}")
    z = torch.arange(r * r, device=device)
    dy, dx = torch.zeros_like(z), torch.zeros_like(z)
    for bit in range(max(r.bit_length() - 1, 0)):
        dx |= ((z >> (2 * bit)) & 1) << bit
        dy |= ((z >> (2 * bit + 1)) & 1) << bit
    return dy, dx


def fine_token_coords(fine_regions: Tensor, coarse_grid: Tuple[int, int], r: int) -> TokenCoords:
    """Coordinates of the fine tokens on a stage grid with r x r tokens per region.

    fine_regions: int64 ``[F]`` flat indices ``image * Nc + region`` of the fine regions, ascending.
    Returns ``TokenCoords`` of ``F * r * r`` rows in region-major Z order.
    """
    nc = coarse_grid[0] * coarse_grid[1]
    image = fine_regions // nc
    region = fine_regions % nc
    ry, rx = region // coarse_grid[1], region % coarse_grid[1]
    dy, dx = morton_offsets(r, fine_regions.device)
    y = (ry[:, None] * r + dy).flatten()
    x = (rx[:, None] * r + dx).flatten()
    return TokenCoords(image.repeat_interleave(r * r), y, x)


def dense_coords(batch: int, grid: Tuple[int, int], device=None) -> TokenCoords:
    """Coordinates of every cell of a ``[B, H, W]`` grid in raster order (the dense layout)."""
    h, w = grid
    cells = torch.arange(batch * h * w, device=device)
    return TokenCoords(cells // (h * w), (cells // w) % h, cells % w)
