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
    said = capsys.readouterr().out
    assert said.count("11 of 17 tokens, 50% fine") == 3  # cls + 2 fine regions * 4 + 2 coarse, of cls + 16 fine
    assert "rgb.png: 60x40 px centre-cropped to 40x40 and resized to 32x32 px" in said  # no silent crop
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


@pytest.mark.parametrize("kind", ["classification", "segmenter"])
def test_max_patches_keeps_each_images_size_in_one_list(tmp_path, images, capsys, kind):
    if kind == "segmenter":
        segmenter = MSSegmenter(build_model(config(0)), 3, decoder="mask", decoder_kwargs={"depth": 1})
        save_segmenter(tmp_path / "ckpt", segmenter, segmenter_config(config(0), segmenter, {"depth": 1}))
    else:
        write_checkpoint(tmp_path / "ckpt", build_model(config(3)), config(3))
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--max-patches", "64", "--budget", "0.5"]
    argv += ["--segmentation"] if kind == "segmenter" else []
    cli_main(["visualize", *images, "--out", str(tmp_path / "out"), *argv])
    said = capsys.readouterr().out
    # 16 px regions (4 patches of 8 px): at most 16 regions each, aspect kept, nothing cropped
    assert "rgb.png: 60x40 px resized to 80x48 px (aspect kept" in said
    assert "grey.png: 30x30 px resized to 64x64 px" in said and "rgba.png: 20x50 px resized to 32x80 px" in said
    assert "cropped to" not in said
    titles = [line for line in said.splitlines() if " tokens, " in line]
    assert [t.split(":")[0] for t in titles] == ["rgb", "grey", "rgba"]
    assert " of 61 tokens" in titles[0] and " of 65 tokens" in titles[1] and " of 41 tokens" in titles[2]
    for b, image in enumerate(images):  # each image visualized alone says what it says in the list
        cli_main(["visualize", image, "--out", str(tmp_path / f"alone{b}"), *argv])
        assert titles[b] in capsys.readouterr().out.splitlines()
    for name in ("rgb", "grey", "rgba"):
        check_png(tmp_path / "out" / f"{name}_mask.png")
        if kind == "segmenter":
            check_png(tmp_path / "out" / f"{name}_segmentation.png")
    check_png(tmp_path / "out" / "all_masks.png")


def test_clear_failures(tmp_path, images, monkeypatch):
    monkeypatch.setattr(msvit.io.checkpoint, "PRETRAINED", tmp_path / "nothing-shipped")
    with pytest.raises(SystemExit, match="no --checkpoint given and no pretrained model 'cluttered-digits'"):
        cli_main(["visualize", *images, "--out", str(tmp_path / "out")])
    write_checkpoint(tmp_path / "ckpt", build_model(config(3)), config(3))
    with_checkpoint = ["visualize", *images, "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--segmentation needs a segmentation checkpoint"):
        cli_main([*with_checkpoint, "--segmentation"])
    with pytest.raises(SystemExit, match="--max-patches 3 is below one 16 px region"):
        cli_main([*with_checkpoint, "--max-patches", "3"])
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


def test_timm_model_with_the_entropy_gate_keeps_each_photos_aspect_ratio(tmp_path, capsys):
    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.png"
    skimage.io.imsave(wide, rng.integers(0, 256, (30, 100, 3), dtype=np.uint8), check_contrast=False)
    square = tmp_path / "square.png"
    skimage.io.imsave(square, rng.integers(0, 256, (64, 64), dtype=np.uint8), check_contrast=False)
    argv = ["visualize", str(wide), str(square), "--model", "vit_tiny_patch16_224", "--out", str(tmp_path / "out")]
    cli_main([*argv, "--entropy-threshold", "4.5", "--threads", "1"])
    said = capsys.readouterr().out
    assert "random weights" in said and "entropy gate [4.5] bits" in said
    assert "wide.png: 100x30 px resized to 96x32 px (sides rounded to multiples of 32 px" in said
    assert "nothing cropped" in said
    assert "square.png: 64x64 px, used as it is" in said
    assert "wide: " in said and " of 13 tokens" in said  # cls + 2 x 6 cells of 16 px
    for name in ("wide_mask.png", "square_mask.png", "all_masks.png"):
        check_png(tmp_path / "out" / name)
    titles = [line.strip() for line in said.splitlines() if " tokens, " in line]
    assert len(titles) == 2
    for photo, title in zip((wide, square), titles):  # one list forward: each photo as it is alone
        cli_main(["visualize", str(photo), *argv[3:], "--entropy-threshold", "4.5", "--threads", "1"])
        assert title in capsys.readouterr().out


@pytest.mark.parametrize(
    "height, width, limits, expected",
    [
        (300, 1000, (1024, 4096), (288, 992)),  # aspect 3.44, the closest of 288 or 320 by 992 or 1024
        (300, 1000, (256, 4096), (64, 256)),  # 4.0 is closer to 3.33 than 96 x 256's 2.67
        (3000, 4000, (1024, 4096), (768, 1024)),  # a phone photo: the longest side limited
        (3000, 4000, (4096, 1200), (480, 640)),  # the token limit: (480/16) * (640/16) = 1200
        (10, 10, (1024, 4096), (32, 32)),  # at least one coarse region
    ],
)
def test_fitted_size(height, width, limits, expected):
    from msvit.visualize.timm_photos import fitted_size

    h, w = fitted_size(height, width, 32, *limits, 16)
    assert (h, w) == expected and h % 32 == 0 and w % 32 == 0
    assert max(h, w) <= limits[0] and (h // 16) * (w // 16) <= limits[1]


def test_timm_flags_without_model_and_bad_files_are_refused(tmp_path, images, capsys):
    with pytest.raises(SystemExit):
        cli_main(["visualize", *images, "--out", str(tmp_path), "--pretrained", "w.safetensors"])
    assert "--pretrained apply to --model TIMM_NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["visualize", *images, "--out", str(tmp_path), "--model", "vit_tiny_patch16_224", "--checkpoint", "x"])
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--pretrained .*missing.safetensors: no such file"):
        argv = ["--model", "vit_tiny_patch16_224", "--pretrained", str(tmp_path / "missing.safetensors")]
        cli_main(["visualize", *images, "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit):
        cli_main(
            ["visualize", *images, "--out", str(tmp_path), "--model", "vit_tiny_patch16_224", "--max-patches", "9"]
        )
    assert "--max-patches applies to checkpoint models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["visualize", *images, "--out", str(tmp_path), "--max-patches", "0"])
    assert "--max-patches must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--model vit_nonexistent_model: cannot build it"):
        cli_main(["visualize", *images, "--out", str(tmp_path), "--model", "vit_nonexistent_model"])
