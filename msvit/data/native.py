"""Native-resolution data: aspect-preserving sizes under a patch budget, and batches under a token
budget (docs/design.md section 11).

A packed forward costs what its tokens cost, so images need not share a size: each keeps its
aspect ratio, resized to the largest size with at most ``max_patches`` fine patches (timm's NaFlex
rule), and a batch holds as many images as fit ``max_tokens`` (NaViT's packing) instead of a fixed
count. ``MSViT`` takes such a batch as a list of ``[C, H_i, W_i]`` tensors.

    transform = msvit.eval_transform(model, max_patches=256)     # no crop, aspect kept
    sampler = TokenBudgetBatchSampler(tokens, max_tokens=4096)   # tokens[i]: image i's upper bound
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate_images)
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def size_for_patches(height: int, width: int, patch: int, max_patches: int) -> Tuple[int, int]:
    """The largest ``(H, W)`` of the aspect ratio ``height : width``, each side a multiple of
    ``patch``, with ``(H / patch) * (W / patch) <= max_patches`` (upscaling included).

    The rule of timm's NaFlex loader (``timm.data.naflex_transforms.get_image_size_for_seq``): the
    largest scale r whose sides, rounded up to whole patches, fit the budget. That r is always one
    where a side lands exactly on a patch boundary (r = a * patch / height, or b * patch / width), so
    the search runs over those in integer arithmetic instead of bisecting r.
    """
    for name, value in (("height", height), ("width", width), ("patch", patch), ("max_patches", max_patches)):
        _positive_int(name, value)
    best = (0.0, (patch, patch))
    for rows in range(1, max_patches + 1):  # scale rows * patch / height: rows whole, columns rounded up
        cols = -(-width * rows // height)
        if rows * cols <= max_patches and rows / height > best[0]:
            best = (rows / height, (rows * patch, cols * patch))
    for cols in range(1, max_patches + 1):
        rows = -(-height * cols // width)
        if rows * cols <= max_patches and cols / width > best[0]:
            best = (cols / width, (rows * patch, cols * patch))
    return best[1]


class ResizeToPatches:
    """Resize a PIL image or a float tensor ``[C, H, W]`` to ``size_for_patches`` of its own size:
    the aspect ratio kept (to within a patch), no crop. A class so loader workers can pickle it."""

    def __init__(self, patch: int, max_patches: int, interpolation: str = "bicubic"):
        self.patch = _positive_int("patch", patch)
        self.max_patches = _positive_int("max_patches", max_patches)
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.interpolation = interpolation

    def __call__(self, image):
        if isinstance(image, Tensor):
            if image.dim() != 3 or not image.is_floating_point():
                raise ValueError(f"expected a float image tensor [C, H, W], got {image.dtype} {list(image.shape)}")
            h, w = image.shape[-2:]
            size = size_for_patches(int(h), int(w), self.patch, self.max_patches)
            antialias = self.interpolation != "nearest"
            out = F.interpolate(image[None], size=size, mode=self.interpolation, antialias=antialias)[0]
            return out.clamp(0, 1) if self.interpolation == "bicubic" else out
        from PIL import Image

        w, h = image.size
        size = size_for_patches(h, w, self.patch, self.max_patches)
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
        return image.resize((size[1], size[0]), resample[self.interpolation])

    def __repr__(self) -> str:
        return f"ResizeToPatches(patch={self.patch}, max_patches={self.max_patches}, {self.interpolation!r})"


def image_tokens(sizes: Sequence[Tuple[int, int]], patch: int, num_prefix: int = 0) -> List[int]:
    """Upper bound of each image's packed tokens: every fine patch plus the prefix (cls,
    registers). The gate can only lower it, so a batch packed on it never exceeds its budget."""
    _positive_int("patch", patch)
    out = []
    for i, (h, w) in enumerate(sizes):
        if h % patch or w % patch or h < patch or w < patch:
            raise ValueError(f"image {i}: size {h}x{w} is not a positive multiple of the patch {patch}")
        out.append(num_prefix + (h // patch) * (w // patch))
    return out


class TokenBudgetBatchSampler(Sampler[List[int]]):
    """Batches of dataset indices whose tokens sum to at most ``max_tokens`` (NaViT's packing).

    Args:
        tokens: tokens of each dataset item (``image_tokens`` of its size, or the gate's count).
        max_tokens: the budget of one batch; an item over it alone is refused (naming it).
        max_images: optional cap on the images of one batch (a captured forward's image count).
        shuffle: a new order each epoch from ``seed + epoch`` (``set_epoch``), as
            ``DistributedSampler``: the same on every rank, so ranks never share a batch.
        num_replicas, rank: torch.distributed's, read from the process group when it is
            initialised; rank r takes batches r, r + R, ... of the epoch's list, which is cut to a
            multiple of R (``drop_last``) or padded by repeating its first batches, so every rank
            runs the same number of steps.
        equal_epochs: every epoch yields the batch count of epoch 0, so a schedule counted in steps
            knows an epoch's length: a new order packs into a few batches more or fewer; the surplus
            is dropped (its images wait for the next epoch), a shortfall repeats the first batches.

    Items are packed greedily in order: a batch closes when the next item would exceed the budget.
    """

    def __init__(
        self,
        tokens: Sequence[int],
        max_tokens: int,
        *,
        max_images: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        equal_epochs: bool = False,
    ):
        self.tokens = [int(t) for t in tokens]
        if not self.tokens:
            raise ValueError("tokens is empty: a dataset of no items has no batches")
        self.max_tokens = _positive_int("max_tokens", max_tokens)
        self.max_images = None if max_images is None else _positive_int("max_images", max_images)
        over = [i for i, t in enumerate(self.tokens) if t > max_tokens or t < 1]
        if over:
            i = over[0]
            raise ValueError(
                f"item {i} has {self.tokens[i]} tokens, outside 1..max_tokens={max_tokens} "
                f"({len(over)} such items): raise max_tokens or resize the images to fewer patches"
            )
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        self.num_replicas = _positive_int("num_replicas", num_replicas)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        self.rank, self.shuffle, self.seed, self.drop_last = rank, shuffle, int(seed), drop_last
        self.epoch = 0
        self.batches_per_epoch = len(self._pack(0)) if equal_epochs else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_batches(self) -> List[List[int]]:
        """Every rank's batches of this epoch, before the split between ranks."""
        batches = self._pack(self.epoch)
        if self.batches_per_epoch is not None:
            fixed = self.batches_per_epoch
            batches = (batches + batches * (fixed // len(batches) + 1))[:fixed]
        return batches

    def _pack(self, epoch: int) -> List[List[int]]:
        n = len(self.tokens)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        batches, batch, total = [], [], 0
        for i in order:
            full = self.max_images is not None and len(batch) == self.max_images
            if batch and (total + self.tokens[i] > self.max_tokens or full):
                batches.append(batch)
                batch, total = [], 0
            batch.append(i)
            total += self.tokens[i]
        batches.append(batch)
        return batches

    def _rank_batches(self) -> List[List[int]]:
        batches = self.epoch_batches()
        r = self.num_replicas
        if len(batches) % r:
            if self.drop_last and len(batches) >= r:
                batches = batches[: len(batches) - len(batches) % r]
            else:
                batches += [batches[i % len(batches)] for i in range(r - len(batches) % r)]
        return batches[self.rank :: r]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())


def collate_images(batch) -> Tuple[List[Tensor], Tensor]:
    """``DataLoader`` collate for images of different sizes: (list of ``[C, H_i, W_i]``, labels
    stacked), the form ``MSViT`` takes for a native-resolution forward."""
    if not batch:
        raise ValueError("collate_images got an empty batch")
    images, labels = zip(*batch)
    return list(images), torch.as_tensor(labels) if not isinstance(labels[0], Tensor) else torch.stack(labels)
