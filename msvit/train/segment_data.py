"""Segmentation data for ``msvit train --task segmentation``: the dense cluttered digits (held in
memory) or a folder of image / label-map pairs (layout in ``msvit.train.segment``).

Augmentations move image and label map together: horizontal flips and, on the digits, ``--shift``
translations that keep the digit's box inside the image (``msvit.data.loaders.shift_inside``).
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from msvit.data.digits import DenseClutteredDigits
from msvit.data.loaders import DIGITS, DataBundle, require_boxes, shift_inside
from msvit.models.segmentation import IGNORE_INDEX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SegmentationTensors(Dataset):
    """uint8 images ``[N, 3, H, W]`` and label maps ``[N, H, W]`` (255 = ignore) in memory.
    Items: (float32 image in [0, 1], int64 map); ``hflip`` flips both together; ``shift`` > 0
    translates both by up to ``shift`` px, keeping ``boxes`` (int ``[N, 4]``, y0, x0, y1, x1) inside."""

    def __init__(self, images, maps, hflip: bool = False, boxes: Optional[Tensor] = None, shift: int = 0):
        require_boxes(shift, boxes)
        self.images, self.maps, self.hflip, self.boxes, self.shift = images, maps, hflip, boxes, shift

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i):
        image, label_map = self.images[i].float() / 255, self.maps[i].long()
        if self.shift:
            # one translation for both: the map rides along as a fourth channel (class ids are exact in float)
            moved = shift_inside(torch.cat([image, label_map[None].float()]), self.boxes[i], self.shift)
            image, label_map = moved[:3], moved[3].long()
        return joint_flip(image, label_map, self.hflip)


def joint_flip(image, label_map, hflip: bool):
    if hflip and torch.rand(()) < 0.5:
        return image.flip(-1), label_map.flip(-1)
    return image, label_map


def materialize_dense(ds: DenseClutteredDigits, desc: str, show: bool) -> SegmentationTensors:
    """Generate every image, map and digit box once (an epoch then costs no generation)."""
    images = torch.empty(len(ds), 3, *ds.image_size, dtype=torch.uint8)
    maps = torch.empty(len(ds), *ds.image_size, dtype=torch.uint8)
    boxes = torch.empty(len(ds), 4, dtype=torch.long)
    for i in tqdm(range(len(ds)), desc=desc, unit="img", disable=not show, leave=False):
        sample = ds.sample(i)  # what ds[i] returns (no transform here), plus the box
        maps[i] = torch.where(sample.mask, sample.label + 1, 0)
        images[i], boxes[i] = (sample.image * 255).round().to(torch.uint8), torch.tensor(sample.box)
    return SegmentationTensors(images, maps, boxes=boxes)


class SegmentationFolder(Dataset):
    """``split/images/*`` with ``split/labels/<stem>.png``, resized to ``size``."""

    def __init__(self, split_dir, size, num_classes: int, hflip: bool = False):
        split_dir = Path(split_dir)
        images = sorted(p for p in (split_dir / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"no images (*.png, *.jpg) in {split_dir / 'images'}")
        missing = [p.name for p in images if not (split_dir / "labels" / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) in {split_dir / 'images'} have no label map "
                f"labels/<stem>.png, e.g. {', '.join(missing[:3])}"
            )
        self.images, self.size, self.num_classes, self.hflip = images, tuple(size), num_classes, hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        path = self.images[i]
        label_path = path.parent.parent / "labels" / f"{path.stem}.png"
        label = np.array(Image.open(label_path))
        if label.ndim != 2:
            raise ValueError(f"{label_path}: label maps must be single-channel (class ids), got shape {label.shape}")
        wrong = label[(label != IGNORE_INDEX) & (label >= self.num_classes)]
        if wrong.size:
            raise ValueError(
                f"{label_path}: label {int(wrong.max())} is not a class id below {self.num_classes} "
                f"nor {IGNORE_INDEX} (ignore)"
            )
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        label = F.interpolate(
            torch.from_numpy(label.astype(np.int64))[None, None].float(), size=self.size, mode="nearest"
        )[0, 0].long()
        return joint_flip(image.clamp(0, 1), label, self.hflip)


def build_segmentation_data(args, show: bool) -> DataBundle:
    """Train/val datasets of ``--data`` (the dense digits or a folder) as a ``DataBundle``."""
    size = (args.image_size, args.image_size)
    if args.data == DIGITS:
        options = {"digit_scale": tuple(args.digit_scale)} if args.digit_scale else {}
        train = materialize_dense(
            DenseClutteredDigits(args.train_size, size, seed=args.seed, split="train", **options),
            "generating train",
            show,
        )
        val = materialize_dense(
            DenseClutteredDigits(args.val_size, size, seed=args.seed + 1, split="val", **options),
            "generating val",
            show,
        )
        train.hflip = bool(args.hflip)  # digits are not mirror-symmetric: off unless asked for
        train.shift = args.shift
        return DataBundle(train, val, DenseClutteredDigits.classes, size, (0.5,) * 3, (0.5,) * 3, None)
    root = Path(args.data)
    if not (root / "train" / "images").is_dir() or not (root / "val" / "images").is_dir():
        raise FileNotFoundError(
            f"--data must be {DIGITS!r} or a folder with train/images, train/labels, "
            f"val/images and val/labels; got {root}"
        )
    if (root / "classes.txt").is_file():
        classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
    elif args.num_classes:
        classes = [str(c) for c in range(args.num_classes)]
    else:
        raise ValueError(f"{root} has no classes.txt: pass --num-classes")
    from msvit.data.sample_images import IMAGENET_MEAN, IMAGENET_STD

    train = SegmentationFolder(root / "train", size, len(classes), hflip=args.hflip is not False)
    val = SegmentationFolder(root / "val", size, len(classes))
    return DataBundle(train, val, classes, size, IMAGENET_MEAN, IMAGENET_STD, None)
