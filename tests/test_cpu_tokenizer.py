"""The CPU (torch) tokenizer's shared work: the entropy levels of a tree gate binned once
(``entropy_levels_reference``) and the tree layout built once per tree; both give exactly what
the per-level and per-call code gave. Its pixels: ``area_pool`` is avg_pool2d up to rounding, and
the one-table gather gives the rows of the per-scale tables it replaced."""

import pytest
import torch
import torch.nn.functional as F

from msvit.models.tree_gate import TreeGate
from msvit_kernels.reference import (
    area_pool,
    entropy_levels_reference,
    entropy_reference,
    gather_patches_reference,
    patchify,
)
from msvit_kernels.scale_tree import ScaleTree

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def odd_images(size=(88, 120), batch=3, seed=0):
    """Images whose sides are no multiple of the coarsest cell, with flat and busy parts."""
    images = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    images[0, :, :40] = 0.3
    images[1, :, :, ::2] = -0.5
    return images


def test_levels_binned_once_equal_separate_calls_value_for_value():
    images = odd_images()
    for patches in ((8,), (8, 16), (8, 16, 32), (16, 32)):
        got = entropy_levels_reference(images, patches, MEAN, STD, bins=64)
        for patch, entropy in zip(patches, got):
            h, w = images.shape[-2] // patch * patch, images.shape[-1] // patch * patch
            expected = entropy_reference(images[..., :h, :w], patch, MEAN, STD, bins=64)
            assert torch.equal(entropy, expected), patch


def test_a_tree_gate_decides_as_its_levels_do_one_by_one():
    images = odd_images()
    gate = TreeGate.entropy(8, 2, 3, (11, 15), (4.5, 3.5), mean=MEAN, std=STD, bins=64)
    gate.kernels = "reference"
    got = gate.decide(images)
    parts = [level.decide(gate._crop(images, s)) for level, s in zip(gate.levels, gate.level_scales)]
    assert torch.equal(got.hard, torch.cat([p.hard for p in parts], 1)) and got.hard.any() and not got.hard.all()
    assert torch.equal(got.logits, torch.cat([p.logits for p in parts], 1))
    assert torch.equal(gate(images), got.logits)
    # levels that bin differently each bin their own pixels
    gate.levels[0].bins = 32
    mixed = gate.decide(images)
    assert torch.equal(mixed.logits[:, : gate.tree_of(images).counts[2]], gate.levels[0](gate._crop(images, 2)))


def test_the_cpu_tree_layout_is_built_once_and_is_no_inference_tensor():
    tree = ScaleTree.of((11, 15), 2, 3)
    with torch.inference_mode():
        first = tree.layout()
    assert tree.layout("cpu") is first and not first.order.is_inference()
    fresh = tree._build_layout("cpu")
    for name in ("order", "scale", "region", "first", "count"):
        assert torch.equal(getattr(first, name), getattr(fresh, name)), name


def test_area_pool_is_the_mean_of_each_block():
    images = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    # block (0, 0) of image 0: pixels 0, 1, 6, 7 -> 3.5; block (1, 2): 16, 17, 22, 23 -> 19.5
    pooled = area_pool(images, 2)
    assert pooled.shape == (2, 1, 2, 3) and pooled[0, 0, 0, 0] == 3.5 and pooled[0, 0, 1, 2] == 19.5
    assert torch.equal(area_pool(images, 1), images)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-15), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_area_pool_is_avg_pool2d_up_to_rounding(dtype, tol, factor):
    images = odd_images(size=(36, 48)).to(dtype)[..., 1:, :]  # a strided view
    images = images[..., : images.shape[-2] // factor * factor, :]
    expected = F.avg_pool2d(images.double(), factor)
    got = area_pool(images, factor)
    assert got.dtype == dtype and got.shape == expected.shape
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() <= tol


@pytest.mark.parametrize("scales, ratio, size", [(2, 2, (88, 120)), (3, 2, (88, 120)), (2, 3, (56, 40))])
def test_one_table_gather_equals_the_per_scale_tables(scales, ratio, size):
    """Rows of every scale (finest first, images in turn, raster order), the border past the
    coarsest whole cell not read, the same values as the concatenated per-scale tables."""
    images, p = odd_images(size=size).double().requires_grad_(), 4
    tables = []
    for s in range(scales):
        side = p * ratio**s
        cropped = images[..., : size[0] // side * side, : size[1] // side * side]
        tables.append(patchify(F.avg_pool2d(cropped, ratio**s) if s else cropped, p).flatten(0, 1))
    expected = torch.cat(tables)
    source = torch.randperm(expected.shape[0], generator=torch.Generator().manual_seed(1))[:40]
    got = gather_patches_reference(images, source, p, ratio, scales)
    torch.testing.assert_close(got, expected[source], rtol=1e-12, atol=1e-12)
    grad, expected_grad = (torch.autograd.grad(t.sum(), images)[0] for t in (got, expected[source]))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(IndexError):  # a row past the table is refused, as index_select refuses it
        gather_patches_reference(images, torch.tensor([expected.shape[0]]), p, ratio, scales)
