"""The CPU (torch) tokenizer's shared work: the entropy levels of a tree gate binned once
(``entropy_levels_reference``) and the tree layout built once per tree; both give exactly what
the per-level and per-call code gave."""

import torch

from msvit.models.tree_gate import TreeGate
from msvit_kernels.reference import entropy_levels_reference, entropy_reference
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
