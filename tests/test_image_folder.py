"""ImageFolder training data: every image reaches --image-size whatever the augmentation flags,
and train/ and val/ must hold the same classes."""

import json

import numpy as np
import pytest
from PIL import Image
from test_train import TINY_MODEL

from msvit.data.loaders import build_data, loaders
from msvit.train import parse_args, train

SIZES = [(64, 96), (40, 41), (33, 70)]  # (height, width): non-square, odd, not multiples of 16


def image_folder(root, train_classes=("cat", "dog"), val_classes=("cat", "dog"), per_class=6):
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = SIZES[i % len(SIZES)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("crop,hflip", [("none", None), ("none", False), ("light", None), ("standard", True)])
def test_every_training_image_is_resized_to_the_image_size(tmp_path, crop, hflip):
    bundle = build_data(str(image_folder(tmp_path)), 32, crop, hflip, 0, 0, 0, False)
    for dataset in (bundle.train, bundle.val):
        assert {tuple(dataset[i][0].shape) for i in range(len(dataset))} == {(3, 32, 32)}
    train_loader, _, _ = loaders(bundle, 4, 0, False, 0)
    assert tuple(next(iter(train_loader))[0].shape) == (4, 3, 32, 32)


def test_default_flags_train_and_evaluate_at_the_image_size(tmp_path):
    """The reported crash: 64x96 images, --image-size 32, default crop/flip and the default GBaS loss."""
    data = image_folder(tmp_path / "data")
    metrics = train(
        parse_args(
            [
                "--data",
                str(data),
                *"--image-size 32 --batch-size 4 --epochs 1 --model-kwargs".split(),
                TINY_MODEL,
                *"--coarse-patch 16 --gate-hidden 8 --out".split(),
                str(tmp_path / "run"),
            ]
        )
    )
    assert metrics["train_tokens"] <= 1 + 16 and metrics["val_tokens_per_image"] <= 1 + 16  # a 32x32 grid of 8px
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_images"] == 12


@pytest.mark.parametrize(
    "val_classes,match",
    [(("cat",), r"missing from val/: \['dog'\]"), (("cat", "dog", "eel"), r"only in val/: \['eel'\]")],
)
def test_val_classes_must_match_train_classes(tmp_path, val_classes, match):
    data = image_folder(tmp_path, val_classes=val_classes)
    with pytest.raises(ValueError, match=match):
        build_data(str(data), 32, "none", None, 0, 0, 0, False)
