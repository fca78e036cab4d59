"""Window packing: which attention window (and which slot in it) every present token falls in.

Swin's (shifted) window attention over the tokens that exist: only the windows holding at least
one present token are laid out, each padded to the full window (``N = wh * ww`` slots); a slot
without a token is a masked key. Empty windows get no row, so they are never computed. The shift
follows timm's ``torch.roll(x, -shift)``: a token at (y, x) sits at ((y - sh) mod H, (x - sw) mod W)
of the shifted grid.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from msvit.models.swin.layout import TokenCoords


class WindowLayout(NamedTuple):
    """dest: int64 ``[T]`` slot of each token row in the padded buffer ``[windows * N]``;
    windows: number of laid-out (non-empty) windows; window_in_image: int64 ``[windows]`` each
    window's index inside its image (selects its shift mask); window_image: int64 ``[windows]``
    its image; key_present: bool ``[windows, N]`` slots holding a key that may be attended."""

    dest: Tensor
    windows: int
    window_in_image: Tensor
    window_image: Tensor
    key_present: Tensor


def windows_per_image(grid: Tuple[int, int], window: Tuple[int, int]) -> int:
    return (grid[0] // window[0]) * (grid[1] // window[1])


def window_layout(
    coords: TokenCoords,
    grid: Tuple[int, int],
    window: Tuple[int, int],
    shift: Tuple[int, int],
    key_active: Optional[Tensor] = None,
) -> WindowLayout:
    """The ``WindowLayout`` of tokens at ``coords`` on a ``grid`` (H, W) divisible by ``window``.

    key_active: optional bool ``[T]``; tokens with False are laid out (their queries run, as in the
    dense-masked baseline) but are not keys. Default: every token is a key.
    """
    (h, w), (wh, ww), (sh, sw) = grid, window, shift
    if h % wh or w % ww:
        raise ValueError(f"grid {h}x{w} is not a whole number of {wh}x{ww} windows")
    ys, xs = (coords.y - sh) % h, (coords.x - sw) % w
    per_image = windows_per_image(grid, window)
    window_id = coords.image * per_image + (ys // wh) * (w // ww) + xs // ww
    used, compact = torch.unique(window_id, return_inverse=True)
    n = wh * ww
    dest = compact * n + (ys % wh) * ww + xs % ww
    present = torch.zeros(used.numel() * n, dtype=torch.bool, device=dest.device)
    present[dest] = True if key_active is None else key_active
    return WindowLayout(dest, used.numel(), used % per_image, used // per_image, present.view(-1, n))
