"""Real photos that ship inside scikit-image's wheel (no download), as model-ready tensors."""

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Colour and grey photos bundled with scikit-image (others in skimage.data need a download).
SAMPLE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "camera",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor_image(array: np.ndarray, size: Tuple[int, int]) -> Tensor:
    """uint8/bool HxW or HxWxC array -> float ``[3, H, W]`` in [0, 1]: centre crop to the target
    aspect ratio, then bilinear resize (antialiased)."""
    image = torch.from_numpy(np.asarray(array, dtype=np.float32) / (1.0 if array.dtype == bool else 255.0))
    image = image[..., None].expand(-1, -1, 3) if image.dim() == 2 else image[..., :3]
    image = image.permute(2, 0, 1)
    h, w = image.shape[-2:]
    target = size[0] / size[1]
    if h / w > target:
        crop = int(round(w * target))
        image = image[:, (h - crop) // 2 : (h - crop) // 2 + crop]
    else:
        crop = int(round(h / target))
        image = image[:, :, (w - crop) // 2 : (w - crop) // 2 + crop]
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def sample_photos(size=(224, 224), names: Sequence[str] = SAMPLE_PHOTOS) -> Tuple[List[str], Tensor]:
    """(names, images ``[N, 3, H, W]`` in [0, 1]) of scikit-image's bundled photos."""
    import skimage.data

    size = (size, size) if isinstance(size, int) else tuple(size)
    return list(names), torch.stack([to_tensor_image(getattr(skimage.data, n)(), size) for n in names])


def normalize(images: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """[0, 1] pixels -> the normalised input timm ViTs expect."""
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std
