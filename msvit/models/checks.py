"""Input validation with messages that say what was expected."""

import numbers
from typing import Tuple

import torch
from torch import Tensor

MODES = ("packed", "masked", "trimmed")


def check_images(images, in_chans: int, patch: int, smallest: int) -> None:
    """A float ``[B, C, H, W]`` batch of a size ``check_image_size`` takes (``smallest``: one
    region of the coarsest scale)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, {in_chans}, H, W], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a float tensor (normalised pixels), got {images.dtype}; "
            "convert with images.float() / 255 and apply the model's normalisation"
        )
    if images.dim() != 4:
        hint = " (missing batch dimension? use images[None] for one image)" if images.dim() == 3 else ""
        raise ValueError(f"images must have shape [B, {in_chans}, H, W], got {tuple(images.shape)}{hint}")
    if images.shape[1] != in_chans:
        raise ValueError(f"images must have {in_chans} channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    check_image_size(images.shape[-2:], patch, smallest)


def check_image_size(image_size, patch: int, smallest: int, name: str = "image_size") -> Tuple[int, int]:
    """``(H, W)`` of ``image_size`` (``H`` or ``(H, W)`` in pixels): what the forward takes, checked
    with the forward's messages wherever a size is an argument (static shapes, compiled runners).

    H and W are positive multiples of the (fine) patch size; regions that are not whole at the
    border stay fine (docs/design.md section 2). Both are at least ``smallest``, the coarsest patch
    size: an image without one whole coarsest region has nothing for the gate to decide (section 3).
    ``name``: the argument's, for a value that is no size at all.
    """
    size = (image_size, image_size) if is_int(image_size) else image_size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(is_int(n) for n in size):
        raise TypeError(f"{name} must be H or (H, W) in pixels (ints), got {image_size!r}")
    h, w = (int(n) for n in size)
    if h % patch or w % patch or h <= 0 or w <= 0:
        raise ValueError(
            f"image size {h}x{w} must be a positive multiple of the patch size {patch} in both dimensions "
            f"(as for the timm model); resize or crop, e.g. to {max(1, h // patch) * patch}x"
            f"{max(1, w // patch) * patch}"
        )
    if h < smallest or w < smallest:
        raise ValueError(
            f"image size {h}x{w} is smaller than one coarse region ({smallest}x{smallest} pixels, the coarsest "
            f"patch size): the gate has no region to decide; the smallest size that works here is "
            f"{max(h, smallest)}x{max(w, smallest)} (resize or pad), or use a smaller coarse patch size"
        )
    return h, w


def check_batch_size(batch_size, smallest: int = 0) -> int:
    """A batch size argument: an int of at least ``smallest`` (the forward takes an empty batch)."""
    if not is_int(batch_size) or batch_size < smallest:
        raise ValueError(f"batch_size must be an int >= {smallest} (images per batch), got {batch_size!r}")
    return int(batch_size)


def is_int(value) -> bool:
    """An int, numpy int or torch.SymInt (a traced shape, as torch.export passes it), not a bool."""
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_dtype(images: Tensor, model_dtype: torch.dtype) -> None:
    """A float image of another dtype than the weights fails deep inside a matmul otherwise (under
    autocast the matmuls cast their inputs themselves, so mixed dtypes are left to it)."""
    if images.dtype != model_dtype and not torch.is_autocast_enabled(images.device.type):
        raise TypeError(
            f"images are {images.dtype} but the model's weights are {model_dtype}; cast the images "
            f"(images.to({model_dtype})) or the model (model.to({images.dtype}))"
        )


def check_mask_or_budget(mask, budget) -> None:
    """A caller's mask fixes every scale decision, so a budget beside it would be silently ignored
    (it was, before): refused."""
    if mask is not None and budget is not None:
        raise ValueError(
            f"pass mask or budget, not both: the mask fixes every scale decision, so budget={budget!r} would be ignored"
        )


def check_mask(mask, batch: int, coarse_grid) -> None:
    n_regions = coarse_grid[0] * coarse_grid[1]
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor [B, Nc] = [{batch}, {n_regions}], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = fine region), got {mask.dtype}; use mask > 0.5 or mask.bool()")
    if tuple(mask.shape) != (batch, n_regions):
        raise ValueError(
            f"mask must have shape [B, Nc] = [{batch}, {n_regions}] (one entry per coarse region of the "
            f"{coarse_grid[0]}x{coarse_grid[1]} coarse grid, raster order), got {tuple(mask.shape)}"
        )


def check_counted_mask(mask, coarse_grid, images=None) -> None:
    """``check_mask`` for ``tokens_per_image``. A mask of another region count would give token
    counts of regions that do not exist."""
    check_mask(mask, counted_batch(mask, images), coarse_grid)


def counted_batch(mask, images=None):
    """The B a counted mask must have: the images' when given, else the mask's own ("B" in a
    message when it has none)."""
    if images is not None:
        return images.shape[0]
    return mask.shape[0] if isinstance(mask, Tensor) and mask.dim() else "B"


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(map(repr, choices))}")


def is_image_list(images) -> bool:
    """A Python list or tuple of images (native resolution, docs/design.md section 11)."""
    return isinstance(images, (list, tuple))


def check_image_list(images, in_chans: int, patch: int, smallest: int) -> None:
    """A non-empty list of float ``[C, H_b, W_b]`` images of one dtype and device, each size a
    multiple of the (fine) patch and at least ``smallest`` (one coarsest region); every message
    names the image."""
    if len(images) == 0:
        raise ValueError(f"images is an empty {type(images).__name__}: pass at least one [{in_chans}, H, W] image")
    first = images[0]
    for b, image in enumerate(images):
        if isinstance(image, Tensor) and image.dim() != 3:
            hint = " (a list holds single images: drop the batch dimension, e.g. image[0])" if image.dim() == 4 else ""
            raise ValueError(f"images[{b}] must have shape [{in_chans}, H, W], got {tuple(image.shape)}{hint}")
        try:
            check_images(image[None] if isinstance(image, Tensor) else image, in_chans, patch, smallest)
        except (TypeError, ValueError) as error:
            raise type(error)(f"images[{b}]: {error}") from None
        if image.dtype != first.dtype:
            raise TypeError(
                f"images[{b}] is {image.dtype} but images[0] is {first.dtype}: the images of a list share one "
                f"dtype; cast them (image.to({first.dtype}))"
            )
        if image.device != first.device:
            raise ValueError(
                f"images[{b}] is on {image.device} but images[0] is on {first.device}: the images of a list share "
                f"one device; move them (image.to({str(first.device)!r}))"
            )


def check_mask_list(mask, expected) -> list:
    """Per-image bool masks for a list of images: ``expected`` holds, per image, its entry count
    and what the entries are (e.g. "the 3x4 coarse regions"). Returns the masks as a list."""
    if not isinstance(mask, (list, tuple)):
        raise TypeError(
            f"for a list of images, mask must be a list of per-image bool masks (one 1-D tensor per image), "
            f"got {type(mask).__name__}"
        )
    if len(mask) != len(expected):
        raise ValueError(f"mask has {len(mask)} entries for {len(expected)} images: pass one bool mask per image")
    for b, (m, (count, what)) in enumerate(zip(mask, expected)):
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"mask[{b}] must be a bool tensor [{count}] (True = fine / split), got {got}")
        if tuple(m.shape) != (count,):
            raise ValueError(
                f"mask[{b}] must have shape [{count}]: one entry per {what} of image {b}, got {tuple(m.shape)}"
            )
    return list(mask)
