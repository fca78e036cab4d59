"""``msvit visualize``: valid PNGs for a batch of images, from classification and segmenter checkpoints."""

import json

import matplotlib.image
import numpy as np
import pytest
import skimage.io

import msvit.io.checkpoint
from msvit.cli import main as cli_main
from msvit.io.checkpoint import build_model, write_checkpoint
from msvit.models.segmentation import MSSegmenter, save_segmenter, segmenter_config

TINY = {"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "mlp_ratio": 2}


def config(num_classes):
    return {
        "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**TINY, "img_size": 32, "num_classes": num_classes}},
        "msvit": {"coarse_patch_size": 16, "hidden": 16},
        "data": {
            "name": "test",
            "image_size": [32, 32],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "classes": ["background", "digit", "clutter"],
        },
    }


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in [("rgb", (40, 60, 3)), ("grey", (30, 30)), ("rgba", (50, 20, 4))]:
        path = tmp_path / "in" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        skimage.io.imsave(path, rng.integers(0, 256, shape, dtype=np.uint8), check_contrast=False)
        paths.append(str(path))
    return paths


def check_png(path):
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and picture.shape[2] in (3, 4) and min(picture.shape[:2]) >= 100


def test_classification_checkpoint_writes_one_mask_overlay_per_image(tmp_path, images, capsys):
    write_checkpoint(tmp_path / "ckpt", build_model(config(3)), config(3))
    cli_main(
        [
            "visualize",
            *images,
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "out"),
            "--budget",
            "0.5",
        ]
    )
    for name in ("rgb", "grey", "rgba"):
        check_png(tmp_path / "out" / f"{name}_mask.png")
    check_png(tmp_path / "out" / "all_masks.png")
    assert capsys.readouterr().out.count("11 tokens, 50% fine") == 3  # cls + 2 fine regions * 4 + 2 coarse
    assert not list((tmp_path / "out").glob("*_segmentation.png"))


def test_segmenter_checkpoint_writes_the_predicted_map_too(tmp_path, images):
    segmenter = MSSegmenter(build_model(config(0)), 3, decoder="mask", decoder_kwargs={"depth": 1})
    save_segmenter(tmp_path / "seg", segmenter, segmenter_config(config(0), segmenter, {"depth": 1}))
    cli_main(
        ["visualize", *images, "--checkpoint", str(tmp_path / "seg"), "--out", str(tmp_path / "out"), "--segmentation"]
    )
    for name in ("rgb", "grey", "rgba"):
        check_png(tmp_path / "out" / f"{name}_mask.png")
        check_png(tmp_path / "out" / f"{name}_segmentation.png")
    assert json.loads((tmp_path / "seg" / "config.json").read_text())["task"] == "segmentation"


def test_clear_failures(tmp_path, images, monkeypatch):
    monkeypatch.setattr(msvit.io.checkpoint, "PRETRAINED", tmp_path / "nothing-shipped")
    with pytest.raises(SystemExit, match="no --checkpoint given and no pretrained model 'cluttered-digits'"):
        cli_main(["visualize", *images, "--out", str(tmp_path / "out")])
    write_checkpoint(tmp_path / "ckpt", build_model(config(3)), config(3))
    with pytest.raises(SystemExit, match="--segmentation needs a segmentation checkpoint"):
        cli_main(
            [
                "visualize",
                *images,
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--out",
                str(tmp_path / "o"),
                "--segmentation",
            ]
        )
    with pytest.raises(SystemExit, match="no such file"):
        cli_main(
            [
                "visualize",
                str(tmp_path / "missing.png"),
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
