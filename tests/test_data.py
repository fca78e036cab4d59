"""ClutteredDigits: determinism, shapes, boxes and masks, labels, splits, flat backgrounds, errors."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from msvit.data import ClutteredDigits, region_overlap


def local_gradient(image):
    """float [H-1, W-1]: max over channels of the absolute forward difference in y and x."""
    gy = (image[:, 1:, :-1] - image[:, :-1, :-1]).abs().amax(0)
    gx = (image[:, :-1, 1:] - image[:, :-1, :-1]).abs().amax(0)
    return torch.maximum(gy, gx)


def test_deterministic_per_seed_and_index():
    a, b = ClutteredDigits(10, 64, seed=3), ClutteredDigits(10, 64, seed=3)
    for i in (0, 7, -1):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] and a.box(i) == b.box(i)
        assert torch.equal(a[i][0], a[i][0])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], ClutteredDigits(10, 64, seed=4)[0][0])
    assert torch.equal(a[9][0], a[-1][0])


@pytest.mark.parametrize("size", [128, (96, 160), (160, 64), 32])
def test_shapes_ranges_boxes_and_masks(size):
    ds = ClutteredDigits(12, size, seed=1)
    h, w = (size, size) if isinstance(size, int) else size
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.image.shape == (3, h, w) and s.image.dtype == torch.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert isinstance(s.label, int) and 0 <= s.label <= 9
        y0, x0, y1, x1 = s.box
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert s.mask.shape == (h, w) and s.mask.dtype == torch.bool
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert s.mask.sum() >= 10 and not (s.mask & ~inside).any()  # the box is the digit's tight box
        assert s.mask[y0:y1, x0:x1].float().mean() > 0.15  # and the digit fills a good part of it
        # side between 3/16 and 7/16 of the short side (the box may be thinner than the square)
        assert max(y1 - y0, x1 - x0) <= round(0.4375 * min(h, w)) and max(y1 - y0, x1 - x0) >= 0.1 * min(h, w)
        assert torch.equal(ds.mask(i), s.mask) and ds.box(i) == s.box


def test_digit_is_visible_against_its_background():
    ds = ClutteredDigits(16, 128, seed=2)
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    for i in range(len(ds)):
        s = ds.sample(i)
        y0, x0, y1, x1 = s.box
        lum = (s.image * luma).sum(0)[y0:y1, x0:x1]
        m = s.mask[y0:y1, x0:x1]
        assert (lum[m].mean() - lum[~m].mean()).abs() > 0.2


def test_labels_match_source_digits():
    target = load_digits().target
    ds = ClutteredDigits(200, 32, seed=0)
    labels = []
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.label == target[s.source] and ds[i][1] == s.label and s.source in set(ds.pool.tolist())
        labels.append(s.label)
    assert set(labels) == set(ClutteredDigits.classes) == set(range(10))


def test_train_and_val_use_disjoint_source_digits():
    train, val, full = (ClutteredDigits(50, 32, split=s) for s in ("train", "val", "all"))
    assert set(train.pool.tolist()).isdisjoint(val.pool.tolist())
    assert set(train.pool.tolist()) | set(val.pool.tolist()) == set(full.pool.tolist()) == set(range(1797))
    assert 0.15 < len(val.pool) / len(full.pool) < 0.25
    assert all(val.sample(i).source in set(val.pool.tolist()) for i in range(len(val)))
    assert not torch.equal(train[0][0], val[0][0])  # the split also selects a different RNG stream


@pytest.mark.parametrize("size", [128, (96, 160)])
def test_background_is_mostly_flat(size):
    ds = ClutteredDigits(16, size, seed=5)
    region_flat = []
    for i in range(len(ds)):
        g = local_gradient(ds[i][0])
        assert (g < 0.02).float().mean() > 0.85  # pixel level: edges only at the digit and clutter
        h, w = g.shape
        regions = g[: h // 32 * 32, : w // 32 * 32].unfold(0, 32, 32).unfold(1, 32, 32).amax((-1, -2))
        region_flat.append((regions < 0.02).float().mean().item())
    # region level: a good share of 32px regions holds no edge at all, so a gate can keep them coarse
    assert np.mean(region_flat) > 0.4


def test_region_overlap_and_box_regions():
    got = region_overlap((0, 0, 33, 10), (64, 96), 32)
    assert got.tolist() == [True, False, False, True, False, False]
    assert region_overlap((31, 31, 33, 33), (64, 64), 32).all()
    ds = ClutteredDigits(4, (64, 96))
    regions = ds.box_regions(0, 32)
    assert regions.shape == (6,) and 1 <= regions.sum() <= 6


def test_transform_and_dataloader():
    ds = ClutteredDigits(6, (32, 48), transform=lambda x: x * 2 - 1)
    assert ds[0][0].min() < 0 and torch.allclose((ds[0][0] + 1) / 2, ds.sample(0).image)
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 48) and labels.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": 2.5},
        {"image_size": 8},
        {"image_size": (0, 64)},
        {"image_size": (64, 64, 3)},
        {"image_size": 64.0},
        {"seed": -1},
        {"split": "test"},
        {"digit_scale": (0.5, 0.2)},
        {"digit_scale": (0.01, 0.3)},
        {"clutter": (3, 1)},
        {"clutter": (-1, 2)},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ClutteredDigits(**{"n": 4, **kwargs})


def test_bad_index_raises():
    ds = ClutteredDigits(4, 32)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds.box(-5)
    with pytest.raises(TypeError):
        ds[1.0]
    with pytest.raises(TypeError):
        ClutteredDigits(4, 32, transform="flip")


def test_shift_augmentation_keeps_the_digit_inside_and_moves_it():
    """Each draw moves the image by at most `limit` px and never pushes the box out of frame."""
    from msvit.data.loaders import InMemoryImages, shift_inside

    image = torch.zeros(1, 16, 16)
    image[0, 1:4, 10:15] = 1.0  # the "digit": rows 1..3, cols 10..14, near the top-right corner
    box = torch.tensor([1, 10, 4, 15])
    torch.manual_seed(0)
    offsets = set()
    for _ in range(200):
        moved = shift_inside(image, box, limit=4)
        assert moved.shape == image.shape and moved.sum() == image.sum()  # all 15 digit pixels still inside
        ys, xs = torch.nonzero(moved[0] == 1.0, as_tuple=True)
        dy, dx = int(ys.min()) - 1, int(xs.min()) - 10
        assert -1 <= dy <= 4 and -4 <= dx <= 1  # bounded by the limit and by the image edges
        offsets.add((dy, dx))
    assert len(offsets) > 20  # and it really moves
    data = InMemoryImages(
        (image * 255).to(torch.uint8).expand(3, 3, 16, 16).clone(),
        torch.zeros(3, dtype=torch.long),
        boxes=box.expand(3, 4),
        shift=4,
    )
    assert data[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="boxes"):
        InMemoryImages(data.images, data.labels, shift=2)
