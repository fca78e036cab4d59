"""Native-resolution data (msvit.data.native): patch-budget sizes, the evaluation transform without
a crop, token-budget batches (single process and split between ranks), the variable-size digits."""

import random

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.naflex_transforms import get_image_size_for_seq
from torch.utils.data import DataLoader

import msvit
from msvit.data import ClutteredDigits
from msvit.data.native import (
    ResizeToPatches,
    TokenBudgetBatchSampler,
    collate_images,
    image_tokens,
    size_for_patches,
)


def test_the_patch_budget_size_is_timms_naflex_rule():
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(1, 4000), rng.randint(1, 4000)
        patch, budget = rng.choice([8, 14, 16, 32]), rng.choice([1, 3, 7, 64, 196, 256, 1024])
        assert size_for_patches(h, w, patch, budget) == tuple(get_image_size_for_seq((h, w), patch, budget)[1])


@pytest.mark.parametrize(("h", "w"), [(100, 100), (100, 300), (300, 100), (480, 640), (1, 1000)])
def test_the_patch_budget_size_keeps_the_aspect_and_fills_the_budget(h, w):
    H, W = size_for_patches(h, w, 16, 256)
    assert H % 16 == 0 and W % 16 == 0 and (H // 16) * (W // 16) <= 256
    # one more patch row would pass the budget or break the aspect ratio by more than a patch
    assert abs(H / W - h / w) <= 16 / min(H, W) + h / w * 16 / W
    assert (H // 16 + 1) * -(-(w * (H + 16)) // (h * 16)) > 256


@pytest.mark.parametrize(("args", "match"), [((0, 10, 16, 4), "height"), ((10, 10, 16, 0), "max_patches")])
def test_a_bad_size_request_is_refused(args, match):
    with pytest.raises(ValueError, match=match):
        size_for_patches(*args)


def test_resize_to_patches_takes_pil_images_and_tensors_alike():
    resize = ResizeToPatches(16, 64, "bilinear")
    pil = Image.new("RGB", (300, 100))  # PIL sizes are (W, H)
    assert resize(pil).size == (16 * 12, 16 * 4)  # 4 x 12 patches: 5 rows would need 15 columns
    out = resize(torch.rand(3, 100, 300))
    assert out.shape == (3, 64, 192)
    with pytest.raises(ValueError, match="float image tensor"):
        resize(torch.zeros(3, 10, 10, dtype=torch.uint8))


def test_the_native_eval_transform_keeps_the_aspect_and_normalises():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    model = msvit.from_timm(vit).eval()
    transform = msvit.eval_transform(model, max_patches=48)
    image = torch.rand(3, 90, 270)
    out = transform(image)
    assert out.shape == (3, 64, 192)  # 4 x 12 = 48 patches, 1:3 kept
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(3, 1, 1)
    mode = model.pretrained_cfg["interpolation"]
    resized = F.interpolate(image[None], size=(64, 192), mode=mode, antialias=True)[0]
    resized = resized.clamp(0, 1) if mode == "bicubic" else resized
    torch.testing.assert_close(out, (resized - mean) / std)
    grey = Image.new("L", (50, 200))
    assert transform(grey).shape == (3, 192, 48)  # greyscale converted to RGB, 4:1 portrait kept
    with pytest.raises(ValueError, match="patch="):
        msvit.eval_transform(dict(model.pretrained_cfg), max_patches=48)


def test_image_tokens_bound_the_packed_length():
    assert image_tokens([(32, 48), (16, 16)], 16, num_prefix=1) == [7, 2]
    with pytest.raises(ValueError, match="image 1: size 20x16"):
        image_tokens([(32, 48), (20, 16)], 16)


def _tokens(n=40, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 60) for _ in range(n)]


def test_token_budget_batches_hold_every_item_once_within_the_budget():
    tokens = _tokens()
    sampler = TokenBudgetBatchSampler(tokens, max_tokens=100, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(tokens)))
    assert all(sum(tokens[i] for i in b) <= 100 for b in batches)
    # greedy: each batch closed because the next item did not fit
    for b, nxt in zip(batches, batches[1:]):
        assert sum(tokens[i] for i in b) + tokens[nxt[0]] > 100
    assert len(sampler) == len(batches)


def test_token_budget_batches_follow_the_seed_and_the_epoch():
    tokens = _tokens()
    a, b = TokenBudgetBatchSampler(tokens, 100, seed=1), TokenBudgetBatchSampler(tokens, 100, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    ordered = TokenBudgetBatchSampler(tokens, 100, shuffle=False)
    assert [i for bt in ordered for i in bt] == list(range(len(tokens)))


def test_token_budget_batches_cap_the_image_count():
    batches = list(TokenBudgetBatchSampler([1] * 10, 100, max_images=3, shuffle=False))
    assert [len(b) for b in batches] == [3, 3, 3, 1]


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_take_disjoint_batches_of_one_epoch_and_equal_counts(drop_last):
    tokens = _tokens(37)
    ranks = [TokenBudgetBatchSampler(tokens, 90, seed=5, num_replicas=3, rank=r, drop_last=drop_last) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1
    epoch = ranks[0].epoch_batches()
    if drop_last:
        seen = [tuple(b) for batches in per_rank for b in batches]
        assert len(seen) == len(set(seen))  # nothing repeated
    else:
        assert {tuple(b) for batches in per_rank for b in batches} == {tuple(b) for b in epoch}


def test_an_item_over_the_budget_is_refused_by_index():
    with pytest.raises(ValueError, match="item 2 has 120 tokens"):
        TokenBudgetBatchSampler([10, 20, 120], 100)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        TokenBudgetBatchSampler([10], 100, num_replicas=2, rank=2)


def test_variable_size_digits_batch_as_lists_under_a_token_budget():
    sizes = [(32, 96), (64, 64), (96, 32), (48, 80)]
    data = ClutteredDigits(12, sizes=sizes, seed=1)
    assert {data.size_of(i) for i in range(12)} <= set(sizes) and len({data.size_of(i) for i in range(12)}) > 1
    assert all(tuple(data[i][0].shape[1:]) == data.size_of(i) for i in range(12))
    assert torch.equal(data[3][0], ClutteredDigits(12, sizes=sizes, seed=1)[3][0])  # deterministic
    tokens = image_tokens([data.size_of(i) for i in range(12)], 16, num_prefix=1)
    loader = DataLoader(data, batch_sampler=TokenBudgetBatchSampler(tokens, 60, seed=0), collate_fn=collate_images)
    seen = 0
    for images, labels in loader:
        assert isinstance(images, list) and labels.shape == (len(images),)
        assert sum(1 + (im.shape[1] // 16) * (im.shape[2] // 16) for im in images) <= 60
        seen += len(images)
    assert seen == 12
    with pytest.raises(ValueError, match="image_size must be"):
        ClutteredDigits(4, sizes=[(8, 8)])


def test_equal_epochs_keep_the_batch_count_of_the_first_epoch():
    tokens = _tokens(60, seed=2)
    sampler = TokenBudgetBatchSampler(tokens, 100, seed=0, equal_epochs=True)
    counts = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        counts.add(len(batches))
        assert all(sum(tokens[i] for i in b) <= 100 for b in batches)
        packed = sampler._pack(epoch)
        assert len(packed) != sampler.batches_per_epoch or batches == packed
    assert counts == {sampler.batches_per_epoch} and len(sampler) == sampler.batches_per_epoch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens": [], "max_tokens": 10}, "tokens is empty"),
        ({"tokens": [3], "max_tokens": 0}, "max_tokens must be a positive int"),
        ({"tokens": [3], "max_tokens": 10, "max_images": 0}, "max_images must be a positive int"),
        ({"tokens": [3, -1], "max_tokens": 10}, "item 1 has -1 tokens"),
    ],
)
def test_bad_sampler_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenBudgetBatchSampler(**kwargs)


def test_a_bad_patch_budget_in_the_transform_is_refused_by_name():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    with pytest.raises(ValueError, match="max_patches must be a positive int"):
        msvit.eval_transform(msvit.from_timm(vit), max_patches=0)
    with pytest.raises(ValueError, match="interpolation must be"):
        ResizeToPatches(16, 4, "lanczos")
