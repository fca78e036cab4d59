"""Datasets and loaders for ``msvit train``: the built-in cluttered digits or an ImageFolder tree.

Crop augmentations follow the paper's ablation (Section 4.3.1): ``standard`` is the Inception-style
RandomResizedCrop (scale 0.08-1, a large train/test shift), ``light`` keeps at least half of the
image (scale 0.5-1), ``none`` uses the image as it is (digits) or the evaluation view (ImageFolder:
shorter side to --image-size / 0.875, centre crop), so every image has the size the model expects.
"""

from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from msvit.data.digits import ClutteredDigits
from msvit.data.native import ResizeToPatches, TokenBudgetBatchSampler, collate_images, size_for_patches
from msvit.data.sample_images import IMAGENET_MEAN, IMAGENET_STD

CROPS = {"standard": (0.08, 1.0), "light": (0.5, 1.0), "none": None}
DIGITS = "cluttered-digits"


class DataBundle(NamedTuple):
    train: Dataset
    val: Dataset
    classes: list
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    val_boxes: Optional[Tensor]  # digits only: int64 [N_val, 4] digit boxes (y0, x0, y1, x1), end exclusive
    # native resolution: (train sizes, val sizes), the (H, W) of every item, known before loading
    sizes: Optional[Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]] = None


def train_transform(crop: str, size: Tuple[int, int], hflip: bool):
    from torchvision.transforms import v2

    steps = []
    if CROPS[crop] is not None:
        steps.append(v2.RandomResizedCrop(size, scale=CROPS[crop], antialias=True))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else None


def shift_inside(image: Tensor, box: Tensor, limit: int) -> Tensor:
    """``image`` [C, H, W] translated by a random integer offset of at most ``limit`` px per axis,
    chosen so that ``box`` (y0, x0, y1, x1), end exclusive, stays inside; uncovered borders repeat
    the edge pixels (the digits' backgrounds are smooth ramps)."""
    h, w = image.shape[-2:]
    y0, x0, y1, x1 = (int(v) for v in box)
    dy = int(torch.randint(max(-limit, -y0), min(limit, h - y1) + 1, ()))
    dx = int(torch.randint(max(-limit, -x0), min(limit, w - x1) + 1, ()))
    if dy == 0 and dx == 0:
        return image
    padded = F.pad(image[None], (limit, limit, limit, limit), mode="replicate")[0]
    return padded[:, limit - dy : limit - dy + h, limit - dx : limit - dx + w]


def require_boxes(shift: int, boxes: Optional[Tensor]) -> None:
    if shift and boxes is None:
        raise ValueError("shift augmentation needs the object boxes, to keep the objects inside the image")


class InMemoryImages(Dataset):
    """uint8 images ``[N, 3, H, W]`` (or a list of ``[3, H_i, W_i]``, native resolution) and labels
    ``[N]`` held in memory; items are float [0, 1].

    boxes: optional int ``[N, 4]`` object boxes (y0, x0, y1, x1), end exclusive. With ``shift`` > 0
    every item is translated at random by up to ``shift`` px (``shift_inside``), never pushing its
    box out of the image: the same render then shows up at new positions each epoch.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform=None, boxes: Optional[Tensor] = None, shift: int = 0):
        require_boxes(shift, boxes)
        self.images, self.labels, self.transform, self.boxes, self.shift = images, labels, transform, boxes, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i].float() / 255
        if self.shift:
            image = shift_inside(image, self.boxes[i], self.shift)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


def materialize(ds: ClutteredDigits, desc: str, show: bool) -> InMemoryImages:
    """Generate every image once (generation costs ~0.4 ms; an epoch then costs nothing). Images of
    their own sizes (``ds.sizes``) are held as a list."""
    if ds.sizes is None:
        images = torch.empty(len(ds), 3, *ds.image_size, dtype=torch.uint8)
    else:
        images = [torch.empty(3, *ds.size_of(i), dtype=torch.uint8) for i in range(len(ds))]
    labels = torch.empty(len(ds), dtype=torch.long)
    boxes = torch.empty(len(ds), 4, dtype=torch.long)
    for i in tqdm(range(len(ds)), desc=desc, unit="img", disable=not show, leave=False):
        sample = ds.sample(i)
        image = ds.transform(sample.image) if ds.transform is not None else sample.image
        images[i], labels[i], boxes[i] = (image * 255).round().to(torch.uint8), sample.label, torch.tensor(sample.box)
    return InMemoryImages(images, labels, boxes=boxes)


def build_data(
    data: str,
    image_size: int,
    crop: str,
    hflip: Optional[bool],
    train_size: int,
    val_size: int,
    seed: int,
    show: bool,
    digit_scale=None,
    shift: int = 0,
    native: Optional[Tuple[int, Sequence[float]]] = None,
) -> DataBundle:
    """The train and val datasets of ``data`` (``cluttered-digits`` or an ImageFolder root with
    ``train/`` and ``val/`` sub-folders). ``shift``: digits only, see ``InMemoryImages``.

    native: ``(cell, aspect_ratios)`` for native-resolution data (``--max-tokens-per-batch``): every
    image keeps its own size, a multiple of ``cell`` (the coarsest patch) with at most the cells of
    ``image_size`` squared: the digits render at each aspect ratio (width / height) in turn, drawn
    per image; folder images keep their own aspect ratio (``ResizeToPatches``, no crop)."""
    if shift and data != DIGITS:
        raise ValueError(f"shift augmentation needs object boxes: only --data {DIGITS} has them")
    size = (image_size, image_size)
    if native is not None:
        return build_native_data(data, image_size, native, hflip, train_size, val_size, seed, show, digit_scale, shift)
    if data == DIGITS:
        options = {"digit_scale": tuple(digit_scale)} if digit_scale else {}
        train = materialize(
            ClutteredDigits(train_size, size, seed=seed, split="train", **options), "generating train", show
        )
        val_digits = ClutteredDigits(val_size, size, seed=seed + 1, split="val", **options)
        val = materialize(val_digits, "generating val", show)
        train.transform = train_transform(crop, size, bool(hflip))  # digits are not mirror-symmetric
        train.shift = shift
        return DataBundle(train, val, list(range(10)), size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), val.boxes)
    root = Path(data)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(
            f"--data must be {DIGITS!r} or a folder with train/ and val/ ImageFolder trees; got {data}"
        )
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    resize = int(round(image_size / 0.875))
    eval_view = [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]  # shorter side, then the centre
    # Every training image ends at --image-size whatever the flags: a random resized crop, or else
    # the evaluation view (no train/test shift); the flip comes after and keeps the size.
    view = [v2.RandomResizedCrop(size, scale=CROPS[crop], antialias=True)] if CROPS[crop] is not None else eval_view
    flip = [v2.RandomHorizontalFlip()] if hflip is not False else []
    train = ImageFolder(str(root / "train"), transform=v2.Compose(to_tensor + view + flip))
    val = ImageFolder(str(root / "val"), transform=v2.Compose(to_tensor + eval_view))
    check_same_classes(train.classes, val.classes, root)
    return DataBundle(train, val, train.classes, size, IMAGENET_MEAN, IMAGENET_STD, None)


def native_sizes(image_size: int, cell: int, aspect_ratios: Sequence[float]) -> List[Tuple[int, int]]:
    """One (H, W) per aspect ratio (width / height): the largest of that ratio with at most the
    ``cell``-sized cells of an ``image_size`` square (``size_for_patches``)."""
    budget = max(image_size // cell, 1) ** 2
    return [size_for_patches(10_000, max(1, round(10_000 * r)), cell, budget) for r in aspect_ratios]


def build_native_data(data, image_size, native, hflip, train_size, val_size, seed, show, digit_scale, shift):
    """``build_data(..., native=...)``: items of their own sizes, with those sizes in ``sizes``."""
    cell, aspect_ratios = native
    if data == DIGITS:
        sizes = native_sizes(image_size, cell, aspect_ratios)
        options = {"digit_scale": tuple(digit_scale)} if digit_scale else {}
        splits = []
        for n, split, offset in ((train_size, "train", 0), (val_size, "val", 1)):
            digits = ClutteredDigits(n, sizes=sizes, seed=seed + offset, split=split, **options)
            splits.append((materialize(digits, f"generating {split}", show), [digits.size_of(i) for i in range(n)]))
        (train, train_sizes), (val, val_sizes) = splits
        train.shift = shift
        mean = (0.5, 0.5, 0.5)
        return DataBundle(
            train, val, list(range(10)), (image_size,) * 2, mean, mean, val.boxes, (train_sizes, val_sizes)
        )
    root = Path(data)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(
            f"--data must be {DIGITS!r} or a folder with train/ and val/ ImageFolder trees; got {data}"
        )
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    max_cells = max(image_size // cell, 1) ** 2
    resize = ResizeToPatches(cell, max_cells, "bicubic")
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    flip = [v2.RandomHorizontalFlip()] if hflip is not False else []
    train = ImageFolder(str(root / "train"), transform=v2.Compose([resize, *to_tensor, *flip]))
    val = ImageFolder(str(root / "val"), transform=v2.Compose([resize, *to_tensor]))
    check_same_classes(train.classes, val.classes, root)

    def sizes_of(folder, desc):  # image headers only: PIL reads the size without decoding
        out = []
        for path, _ in tqdm(folder.samples, desc=desc, unit="img", disable=not show, leave=False):
            with Image.open(path) as image:
                out.append(size_for_patches(image.height, image.width, cell, max_cells))
        return out

    sizes = (sizes_of(train, "reading train sizes"), sizes_of(val, "reading val sizes"))
    return DataBundle(train, val, train.classes, (image_size,) * 2, IMAGENET_MEAN, IMAGENET_STD, None, sizes)


def check_same_classes(train_classes, val_classes, root: Path) -> None:
    """val labels are indices into val's own sorted folder list: with another list they mean other classes."""
    if train_classes == val_classes:
        return
    missing = sorted(set(train_classes) - set(val_classes))
    extra = sorted(set(val_classes) - set(train_classes))
    raise ValueError(
        f"--data {root}: val/ must hold the same class folders as train/ (labels are folder indices); "
        f"missing from val/: {missing or 'none'}; only in val/: {extra or 'none'}"
    )


def loaders(
    bundle: DataBundle,
    batch_size: int,
    workers: int,
    distributed: bool,
    seed: int,
    max_tokens: int = 0,
    tokens_of: Optional[Callable[[Sequence[Tuple[int, int]]], List[int]]] = None,
):
    """(train loader, its sampler or None, val loader). Val is never shuffled (boxes align).

    max_tokens > 0 (native resolution, ``bundle.sizes`` set): batches are lists of images packed
    up to ``max_tokens`` tokens (``tokens_of(sizes)``: each item's upper bound) and at most
    ``batch_size`` images; the train sampler shuffles per epoch (``set_epoch``), splits batches
    between ranks, and yields the same number of batches every epoch (``drop_last``)."""
    if max_tokens:
        return native_loaders(bundle, batch_size, workers, seed, max_tokens, tokens_of)
    sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed) if distributed else None
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        bundle.train,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        generator=generator,
        persistent_workers=workers > 0,
    )
    val = DataLoader(bundle.val, batch_size=batch_size, shuffle=False, num_workers=workers)
    return train, sampler, val


def native_loaders(bundle: DataBundle, batch_size: int, workers: int, seed: int, max_tokens: int, tokens_of):
    train_sizes, val_sizes = bundle.sizes
    sampler = TokenBudgetBatchSampler(
        tokens_of(train_sizes), max_tokens, max_images=batch_size, seed=seed, drop_last=True, equal_epochs=True
    )
    generator = torch.Generator().manual_seed(seed)  # worker seeds; the order is the sampler's
    common = {"collate_fn": collate_images, "num_workers": workers}
    train = DataLoader(
        bundle.train, batch_sampler=sampler, generator=generator, persistent_workers=workers > 0, **common
    )
    val_batches = TokenBudgetBatchSampler(
        tokens_of(val_sizes), max_tokens, max_images=batch_size, shuffle=False, num_replicas=1, rank=0
    )
    return train, sampler, DataLoader(bundle.val, batch_sampler=val_batches, **common)
