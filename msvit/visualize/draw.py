"""Mask pictures like the paper's Fig. 1: coarse regions outlined large, fine regions as 2x2 cells
(more than two scales: every token outlined at its size, one colour per scale)."""

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.patheffects import withStroke  # noqa: E402
from torch import Tensor  # noqa: E402

FINE_COLOUR = "#ff3b30"
COARSE_COLOUR = "#34c759"
COARSE_FILL = (0.2, 0.78, 0.35, 0.18)  # light enough to see the image through
LEGEND_INCHES = 0.3  # the strip under the pictures that holds the legend
MIDDLE_COLOURS = ("#ff9500", "#007aff", "#af52de")  # the scales between the finest and the coarsest
# Every outline is drawn over a slightly wider dark stroke: a red line alone vanished on a red photo
# (issue 29), a dark one on a dark photo; the pair shows on any.
HALO = "#101010"
TITLE_CHARS = 44  # characters per title line in a 3-inch column at 8 pt: longer titles wrap


def outline(lw: float) -> dict:
    """Rectangle keywords for a line of width ``lw`` over its dark halo."""
    return {"lw": lw, "path_effects": [withStroke(linewidth=lw + 0.7, foreground=HALO, alpha=0.6)]}


def set_title(ax, title: Optional[str]) -> None:
    """An 8 pt title wrapped to the picture's width (long ones overlapped their neighbours)."""
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, TITLE_CHARS)), fontsize=8)


def draw_mask(
    ax, image: Tensor, mask: Tensor, coarse_patch: int, fine_patch: int, title: Optional[str] = None, scales: int = 2
) -> None:
    """image ``[3, H, W]`` in [0, 1]; mask bool ``[Nc]`` (True = fine) over the coarse grid, or
    with more ``scales`` the split decisions ``[D]`` (``msvit_kernels.scale_tree``)."""
    if scales > 2:
        return draw_tree_mask(ax, image, mask, coarse_patch // fine_patch, fine_patch, scales, title)
    h, w = image.shape[-2:]
    wc = w // coarse_patch
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    ratio = coarse_patch // fine_patch
    for j, fine in enumerate(mask.tolist()):
        y, x = (j // wc) * coarse_patch, (j % wc) * coarse_patch
        if fine:
            for k in range(ratio * ratio):
                ax.add_patch(
                    Rectangle(
                        (x + (k % ratio) * fine_patch, y + (k // ratio) * fine_patch),
                        fine_patch,
                        fine_patch,
                        fill=False,
                        ec=FINE_COLOUR,
                        **outline(0.6),
                    )
                )
        else:
            ax.add_patch(
                Rectangle(
                    (x, y), coarse_patch, coarse_patch, fill=True, ec=COARSE_COLOUR, fc=COARSE_FILL, **outline(1.0)
                )
            )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    set_title(ax, title)


def draw_tree_mask(ax, image: Tensor, mask: Tensor, ratio: int, fine_patch: int, scales: int, title=None) -> None:
    """Every token of a quadtree mask outlined at its size: finest red, coarsest green and filled."""
    from msvit_kernels.scale_tree import ScaleTree

    h, w = image.shape[-2:]
    tree = ScaleTree.of((h // fine_patch, w // fine_patch), ratio, scales)
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    for s, tokens in enumerate(tree.token_weights(mask.reshape(1, -1).cpu())):
        size, width = fine_patch * ratio**s, tree.grids[s][1]
        colour = scale_colour(s, scales)
        coarsest = s == scales - 1
        for cell in tokens[0].nonzero().flatten().tolist():
            corner = ((cell % width) * size, (cell // width) * size)
            ax.add_patch(
                Rectangle(
                    corner, size, size, fill=coarsest, ec=colour, fc=COARSE_FILL, **outline(0.6 if s == 0 else 1.0)
                )
            )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    set_title(ax, title)


def scale_colour(s: int, scales: int) -> str:
    if s == 0:
        return FINE_COLOUR
    return COARSE_COLOUR if s == scales - 1 else MIDDLE_COLOURS[(s - 1) % len(MIDDLE_COLOURS)]


def add_mask_legend(fig, coarse_patch: int, fine_patch: int, scales: int = 2):
    """One legend under the figure's pictures saying which outline is which token scale."""
    ratio = coarse_patch // fine_patch
    if scales > 2:
        handles = [
            Rectangle((0, 0), 1, 1, fill=s == scales - 1, lw=1.0, ec=scale_colour(s, scales), fc=COARSE_FILL)
            for s in range(scales)
        ]
        labels = [f"token of {fine_patch * ratio**s}px" for s in range(scales)]
        return fig.legend(handles, labels, loc="lower center", ncol=scales, fontsize=7, frameon=False)
    handles = [
        Rectangle((0, 0), 1, 1, fill=False, lw=1.0, ec=FINE_COLOUR),
        Rectangle((0, 0), 1, 1, fill=True, lw=1.0, ec=COARSE_COLOUR, fc=COARSE_FILL),
    ]
    labels = [f"fine region: {ratio * ratio} tokens of {fine_patch}px", f"coarse region: 1 token of {coarse_patch}px"]
    return fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)


def save_figure(fig, path, coarse_patch: int, fine_patch: int, scales: int = 2) -> Path:
    """Add the mask legend below the pictures, lay out, write ``path`` (PNG) and close."""
    fig.tight_layout(rect=(0, LEGEND_INCHES / fig.get_figheight(), 1, 1), h_pad=1.2)
    add_mask_legend(fig, coarse_patch, fine_patch, scales)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)  # tight_layout alone cut titles by a few pixels
    plt.close(fig)
    return Path(path)


def save_overlay(
    path, image: Tensor, mask: Tensor, coarse_patch: int, fine_patch: int, title: Optional[str] = None, scales: int = 2
) -> Path:
    """Write one image with its mixed-scale mask to ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(4, 4 * image.shape[-2] / image.shape[-1] + LEGEND_INCHES), dpi=100)
    draw_mask(ax, image, mask, coarse_patch, fine_patch, title, scales)
    return save_figure(fig, path, coarse_patch, fine_patch, scales)


def save_grid(
    path,
    images: Tensor,
    masks: Tensor,
    coarse_patch: int,
    fine_patch: int,
    titles: Sequence[str],
    columns: int = 4,
    scales: int = 2,
) -> Path:
    """All images with their masks in one figure."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows + LEGEND_INCHES), dpi=100, squeeze=False)
    for ax in axes.flat[len(images) :]:
        ax.set_axis_off()
    for ax, image, mask, title in zip(axes.flat, images, masks, titles):
        draw_mask(ax, image, mask, coarse_patch, fine_patch, title, scales)
    return save_figure(fig, path, coarse_patch, fine_patch, scales)


def class_colours(num_classes: int):
    """``[K, 4]`` RGBA colours, one per class: tab20's for up to 20 classes, else hues spaced evenly."""
    import numpy as np

    if num_classes <= 20:
        return matplotlib.colormaps["tab20"](np.arange(num_classes))
    return matplotlib.colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))


def draw_segmentation(
    ax,
    labels: Tensor,
    num_classes: int,
    image: Optional[Tensor] = None,
    class_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    alpha: float = 0.65,
) -> None:
    """labels: int ``[H, W]`` class ids in [0, K); drawn in class colours over ``image [3, H, W]``
    (in [0, 1], optional), with a legend of the classes that occur (at most 12)."""
    colours = class_colours(num_classes)
    ids = labels.long().cpu().clamp(0, num_classes - 1).numpy()
    if image is not None:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    ax.imshow(colours[ids], alpha=alpha if image is not None else 1.0, interpolation="nearest")
    present = sorted(set(ids.flatten().tolist()))[:12]
    names = class_names if class_names is not None else [str(k) for k in range(num_classes)]
    ax.legend(
        handles=[Rectangle((0, 0), 1, 1, fc=colours[k]) for k in present],
        labels=[names[k] for k in present],
        loc="upper right",
        fontsize=6,
        framealpha=0.7,
    )
    ax.set_axis_off()
    set_title(ax, title)


def save_segmentation(
    path,
    image: Tensor,
    mask: Tensor,
    labels: Tensor,
    coarse_patch: int,
    fine_patch: int,
    num_classes: int,
    class_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    scales: int = 2,
) -> Path:
    """Write the mixed-scale mask and the predicted map side by side (as the paper's Fig. 13) to ``path``."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4 * image.shape[-2] / image.shape[-1] + LEGEND_INCHES), dpi=100)
    draw_mask(axes[0], image, mask, coarse_patch, fine_patch, title, scales)
    draw_segmentation(axes[1], labels, num_classes, image, class_names, "predicted map")
    return save_figure(fig, path, coarse_patch, fine_patch, scales)
