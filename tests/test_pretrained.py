"""The shipped cluttered-digits model loads without downloads, says what input it expects, and its
gate learned where digits are.

Its measured held-out figures (2000 images of unseen source digits, metrics.jsonl): top-1 95.2%,
28.7 tokens/image (65 all-fine), 51% of fine regions on the digit box against 17% of all regions
(3.0x). On these 500 images (the first of the demo's set): 95.0%, 28.2 tokens, 3.1x. The tests
pin them with margin for BLAS differences between machines.
"""

import pytest
import timm.data
import torch
from torch import nn

import msvit
from msvit.data import ClutteredDigits
from msvit.data.loaders import materialize
from msvit.train.evaluate import evaluate

from helpers import tiny_vit


@pytest.fixture(scope="module")
def model():
    return msvit.load_pretrained("cluttered-digits")


def accuracy(model, dataset) -> float:
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(dataset, batch_size=100):
            correct += (model(images).argmax(1) == labels).sum().item()
    return correct / len(dataset)


def test_shipped_digits_model_accuracy_and_gate_placement(model):
    data = model.pretrained_cfg["data"]
    digits = ClutteredDigits(
        500, tuple(data["image_size"]), seed=10_000, split="val", digit_scale=tuple(data["digit_scale"])
    )
    rendered = materialize(digits, "", False)
    loader = torch.utils.data.DataLoader(rendered, batch_size=100)
    metrics = evaluate(model, loader, data["mean"], data["std"], "cpu", boxes=rendered.boxes)
    assert metrics["top1"] >= 0.93
    assert metrics["fine_digit_ratio"] >= 2.5  # fine tokens go to the digit (the issue asks for >= 2x)
    assert metrics["tokens_per_image"] < 0.5 * 65  # and the model runs on far fewer tokens than all-fine


def test_pretrained_cfg_gives_the_input_the_model_expects(model):
    assert isinstance(model, nn.Module) and not model.training
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.5,) * 3
    assert cfg["num_classes"] == 10 and cfg["label_names"] == [str(i) for i in range(10)]
    assert cfg["data"]["digit_scale"] == [0.15, 0.3] and cfg["config"]["timm"]["kwargs"]["img_size"] == 64
    resolved = timm.data.resolve_data_config(model=model)  # timm reads it as it reads its own models'
    assert resolved["input_size"] == (3, 64, 64) and resolved["mean"] == (0.5,) * 3 and resolved["crop_pct"] == 1.0


def test_eval_transform_turns_digits_of_another_size_into_what_the_model_expects(model):
    """A user's digits at the data set's default 128 px, in [0, 1]: the raw images score 33%
    (measured), the transform (resize to 64 px, normalise with mean/std 0.5) restores the stated
    held-out accuracy (97.0% measured on these 300)."""
    options = dict(seed=10_000, split="val", digit_scale=tuple(model.pretrained_cfg["data"]["digit_scale"]))
    transformed = ClutteredDigits(300, 128, transform=msvit.eval_transform(model), **options)
    assert transformed[0][0].shape == (3, 64, 64)
    assert accuracy(model, transformed) >= 0.93
    assert accuracy(model, ClutteredDigits(300, 128, **options)) < 0.5


def test_eval_transform_refuses_a_model_that_does_not_say_its_input():
    with pytest.raises(ValueError, match="no pretrained_cfg input_size, mean, std"):
        msvit.eval_transform(msvit.from_timm(tiny_vit()))
    with pytest.raises(ValueError, match="no pretrained_cfg std"):
        msvit.eval_transform({"input_size": (3, 64, 64), "mean": (0.5,) * 3})


def test_from_timm_keeps_timms_pretrained_cfg_with_the_models_own_input_size():
    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs={"img_size": 64, "num_classes": 10})
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 64, 64) and cfg["num_classes"] == 10  # timm's own cfg says 224 and 1000
    assert cfg["mean"] == (0.5,) * 3 and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert msvit.eval_transform(model)(torch.rand(3, 100, 120)).shape == (3, 64, 64)


def test_eval_transform_reads_rgba_and_greyscale_pngs(model, tmp_path):
    """PNG files as users have them: RGBA (alpha dropped) and greyscale L / LA (grey repeated) are
    converted to the model's 3 channels, as ``msvit visualize`` reads files, and classify like RGB."""
    from PIL import Image

    image, label = ClutteredDigits(4, 64, seed=10_000, split="val")[0]
    rgb = Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy(), "RGB")
    transform = msvit.eval_transform(model)
    batch = {}
    for mode in ("RGB", "RGBA", "L", "LA"):
        rgb.convert(mode).save(tmp_path / f"{mode}.png")
        with Image.open(tmp_path / f"{mode}.png") as file:
            assert file.mode == mode
            batch[mode] = transform(file)
    assert torch.equal(batch["RGBA"], batch["RGB"]) and torch.equal(batch["LA"], batch["L"])
    with torch.no_grad():
        predicted = model(torch.stack(list(batch.values()))).argmax(1)
    assert predicted.tolist() == [label] * 4
