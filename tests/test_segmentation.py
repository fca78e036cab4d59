"""Segmentation on packed mixed-scale tokens: decoders, gate freezing, gradients through the unpack,
mIoU, the dense digits, and ``msvit train --task segmentation`` end to end (digits and a folder)."""

import copy
import json

import numpy as np
import pytest
import torch

import msvit
from msvit.data import DenseClutteredDigits
from msvit.io.checkpoint import build_model, write_checkpoint
from msvit.models.segmentation import MSSegmenter, confusion_matrix, iou_metrics, load_segmenter
from msvit.train import main as train_main
from msvit.train import parse_args, train
from msvit_kernels import unpack_kernel as unpack

from helpers import TINY_MODEL, tiny_vit


def segmenter(decoder="linear", freeze_gate=True, **kwargs):
    backbone = msvit.from_timm(tiny_vit(img_size=(32, 64)), init_logit=0.0)
    return MSSegmenter(backbone, 5, decoder=decoder, freeze_gate=freeze_gate, **kwargs)


@pytest.mark.parametrize("decoder, kwargs", [("linear", {}), ("mask", {"decoder_kwargs": {"depth": 1, "heads": 2}})])
def test_decoders_give_logits_at_the_image_size(decoder, kwargs):
    model = segmenter(decoder, **kwargs).eval()
    images = torch.randn(3, 3, 32, 64)
    out = model(images, return_gate=True)
    assert type(out) is msvit.MSViTOutput  # one output type for every MSViT model
    assert out.logits.shape == (3, 5, 32, 64)
    assert torch.equal(out.gate.hard, model.backbone.gate_mask(images))
    assert torch.equal(out.tokens, model.backbone.tokens_per_image(out.gate.hard))
    assert model(images, mask=torch.ones(3, 8, dtype=torch.bool)).shape == (3, 5, 32, 64)


def test_frozen_gate_gets_no_gradient_and_keeps_eval_decisions_while_the_backbone_learns():
    model = segmenter(freeze_gate=True).train()
    images = torch.randn(2, 3, 32, 64)
    out = model(images, return_gate=True)
    out.logits.square().mean().backward()
    assert all(p.grad is None for p in model.backbone.gate.parameters())
    assert torch.equal(out.gate.hard, model.backbone.gate_mask(images))  # no Gumbel sampling
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the unpack
    assert model.backbone.tokenizer.embed.weight.grad.abs().sum() > 0
    assert isinstance(model.backbone.head, torch.nn.Identity)


def test_trainable_gate_gets_gradient_and_returns_soft_outputs():
    model = segmenter(freeze_gate=False).train()
    out = model(torch.randn(2, 3, 32, 64), return_gate=True)
    assert out.gate.soft is not None and out.gate.soft.requires_grad
    (out.logits.square().mean() + out.gate.soft.mean()).backward()
    assert model.backbone.gate.fc1.weight.grad.abs().sum() > 0


@pytest.mark.skipif(bool(unpack.triton_support(torch.empty(1, 1))), reason="triton kernel cannot run here")
def test_triton_unpack_gives_the_same_segmentation():
    model = segmenter().eval()
    images, mask = torch.randn(2, 3, 32, 64), torch.rand(2, 8) < 0.5
    model.unpack_backend = "reference"
    expected = model(images, mask=mask)
    model.unpack_backend = "triton"
    assert torch.equal(model(images, mask=mask), expected)


def test_bad_arguments_fail_clearly():
    backbone = msvit.from_timm(tiny_vit())
    with pytest.raises(ValueError, match="unknown decoder"):
        MSSegmenter(backbone, 3, decoder="fpn")
    with pytest.raises(ValueError, match="num_classes"):
        MSSegmenter(backbone, 0)
    with pytest.raises(TypeError, match="msvit.MSViT"):
        MSSegmenter(tiny_vit(), 3)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        MSSegmenter(backbone, 3)(torch.randn(1, 3, 42, 64))
    with torch.no_grad():  # 40 px is 5 fine cells: 2 regions and a row of border cells, segmented too
        assert MSSegmenter(backbone, 3).eval()(torch.randn(1, 3, 40, 64)).shape == (1, 3, 40, 64)


def test_confusion_matrix_and_miou():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    confusion = confusion_matrix(pred, target, 4)
    assert confusion.sum() == 7 and confusion[0, 0] == 1 and confusion[1, 1] == 3 and confusion[2, 0] == 1
    metrics = iou_metrics(confusion)
    assert metrics["iou"] == [pytest.approx(1 / 3), pytest.approx(3 / 4), pytest.approx(1 / 2), None]
    assert metrics["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert metrics["pixel_acc"] == pytest.approx(5 / 7)


def test_dense_digits_label_digit_pixels_with_one_plus_the_class():
    ds = DenseClutteredDigits(3, 48, seed=2)
    for i in range(3):
        image, label_map = ds[i]
        sample = ds.sample(i)
        assert image.shape == (3, 48, 48) and label_map.dtype == torch.int64 and label_map.shape == (48, 48)
        assert torch.equal(label_map, torch.where(sample.mask, sample.label + 1, 0))
    assert len(DenseClutteredDigits.classes) == 11


BACKBONE_FLAGS = ["--model-kwargs", TINY_MODEL, "--coarse-patch", "16", "--gate-hidden", "16"]


DIGITS_FLAGS = ["--train-size", "256", "--val-size", "64"]


def tiny_args(out, *extra, backbone=BACKBONE_FLAGS, data=DIGITS_FLAGS):
    return [
        "--task",
        "segmentation",
        *data,
        *"--batch-size 32 --image-size 32".split(),
        *backbone,
        "--out",
        str(out),
        *extra,
    ]


def test_short_run_on_dense_digits_lowers_the_loss_and_round_trips(tmp_path, monkeypatch):
    from msvit.train import run_folder

    saved_models = []  # the live model each epoch writes, to compare the loaded copy against
    save_epoch = run_folder.save_epoch
    monkeypatch.setattr(
        run_folder,
        "save_epoch",
        lambda out, epoch, save, model, *rest: (
            saved_models.append(copy.deepcopy(model).eval()),
            save_epoch(out, epoch, save, model, *rest),
        )[1],
    )
    train_main(tiny_args(tmp_path, "--epochs", "3", "--lr", "2e-3", "--warmup-epochs", "0.5", "--budget", "0.5"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["train_task"] < 0.5 * rows[0]["train_task"]
    assert 0 < rows[-1]["val_miou"] <= 1 and "val_iou_background" in rows[-1]
    assert rows[-1]["val_fine_rate"] == 0.5  # the budget: 2 of 4 regions fine
    model = load_segmenter(tmp_path)
    config = model.pretrained_cfg["config"]
    assert config["task"] == "segmentation" and config["segmentation"]["num_classes"] == 11
    assert model.pretrained_cfg["num_classes"] == 11 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    images = torch.randn(2, 3, 32, 32)
    assert len(saved_models) == 3
    with torch.no_grad():  # the loaded segmenter is the one the last epoch saved, not a fresh build
        assert torch.equal(model(images), saved_models[-1](images))
        assert not torch.equal(model(images), saved_models[0](images))


def test_mask_decoder_with_a_trainable_gate_trains(tmp_path):
    args = parse_args(
        tiny_args(
            tmp_path,
            *"--decoder mask --decoder-depth 1 --no-freeze-gate --gate-loss l0 --epochs 1 --max-steps 3".split(),
        )
    )
    metrics = train(args)
    assert metrics["step"] == 3 and metrics["train_gate"] > 0


def test_init_from_a_classification_checkpoint_keeps_its_backbone(tmp_path):
    config = {
        "timm": {
            "name": "vit_tiny_patch16_224",
            "kwargs": {**json.loads(TINY_MODEL), "img_size": 32, "num_classes": 10},
        },
        "msvit": {"coarse_patch_size": 16, "hidden": 16},
    }
    classifier = build_model(config)
    write_checkpoint(tmp_path / "cls", classifier, config)
    with pytest.raises(SystemExit):  # the backbone comes from --init: its flags would be ignored
        parse_args(tiny_args(tmp_path / "seg", "--init", str(tmp_path / "cls")))
    train_main(
        tiny_args(
            tmp_path / "seg",
            "--init",
            str(tmp_path / "cls"),
            *"--epochs 1 --max-steps 1 --lr 0".split(),
            backbone=[],
        )
    )
    model = load_segmenter(tmp_path / "seg")
    saved = model.pretrained_cfg["config"]
    assert saved["timm"]["kwargs"]["num_classes"] == 0 and saved["msvit"] == config["msvit"]
    assert torch.equal(model.backbone.blocks[0].mlp.fc1.weight, classifier.blocks[0].mlp.fc1.weight)
    assert torch.equal(model.backbone.gate.fc1.weight, classifier.gate.fc1.weight)  # frozen


def write_pair(folder, name, size, values):
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / "images" / f"{name}.png")
    Image.fromarray(rng.choice(values, size).astype(np.uint8)).save(folder / "labels" / f"{name}.png")


def test_folder_of_image_label_pairs_trains(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for i in range(4):
            write_pair(root / split, f"{split}{i}", (40, 50), [0, 1, 2, 255])
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    train_main(tiny_args(tmp_path / "run", "--data", str(root), "--epochs", "1", "--batch-size", "2", data=[]))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["step"] == 2 and {"val_iou_sky", "val_iou_road", "val_iou_car"} <= set(row)
    write_pair(root / "train", "bad", (40, 50), [0, 7])
    with pytest.raises(ValueError, match="label 7 is not a class id below 3"):
        train_main(tiny_args(tmp_path / "run2", "--data", str(root), "--epochs", "1", "--batch-size", "5", data=[]))


def test_task_is_an_argparse_choice_parsed_with_the_other_flags(capsys):
    assert parse_args(["--lr", "1", "--task", "segmentation"]).task == "segmentation"
    assert parse_args(["--task=classification", "--epochs", "2"]).task == "classification"
    assert parse_args([]).task == "classification"
    with pytest.raises(SystemExit):
        parse_args(["--task", "detection"])
    assert "invalid choice: 'detection'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--task", "segmentation", "--mode", "masked"])
    assert "segmentation runs packed" in capsys.readouterr().err


def test_segmentation_defaults_differ_only_where_the_task_sets_them():
    segmentation, classification = parse_args(["--task", "segmentation"]), parse_args([])
    assert segmentation.smoothing == 0 and classification.smoothing == 0.1
    assert parse_args(["--task", "segmentation", "--smoothing", "0.2"]).smoothing == 0.2  # the user's value wins
    assert segmentation.freeze_gate and segmentation.budget is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "0.5"], "--budget is an option of --task segmentation, not of --task classification"),
        (["--decoder=mask"], "--decoder is an option of --task segmentation"),
        (["--task", "segmentation", "--gate-loss-input", "probs"], "--gate-loss-input acts on a training gate"),
        (["--task", "segmentation", "--gate-lambda", "2"], "--gate-lambda acts on a training gate"),
        (["--task", "segmentation", "--gate-mode-epochs", "2"], "segmentation runs packed"),
        (["--task", "segmentation", "--crop", "light"], "without crop augmentation"),
        (["--task", "segmentation", "--shift", "4", "--data", "/some/folder"], "--shift needs --data cluttered-digits"),
        (["--train-size", "100", "--data", "/some/folder"], "--train-size needs --data cluttered-digits: folder data"),
        (["--task", "segmentation", "--digit-scale", "0.2", "0.4", "--data", "/f"], "--digit-scale needs --data"),
        (["--task", "segmentation", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["--task", "segmentation", "--init", ".", "--gate-hidden", "8"],
            "--gate-hidden builds a backbone, but --init",
        ),
    ],
)
def test_flags_without_meaning_for_the_task_are_refused_naming_them(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_segmentation_help_lists_the_segmentation_options(capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(["--task", "segmentation", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--decoder" in text and "--budget" in text and "--freeze-gate" in text and "--lr" in text
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "--decoder" not in capsys.readouterr().out


def test_shift_moves_image_and_label_map_together_keeping_the_digit_inside():
    from msvit.train.segment_data import materialize_dense

    data = materialize_dense(DenseClutteredDigits(8, 32, seed=3), "", False)
    plain = [data[i] for i in range(8)]
    data.shift = 6
    torch.manual_seed(0)
    moved = [data[i] for i in range(8)]
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(plain, moved))  # some maps did move
    for (image, label_map), (plain_image, plain_map) in zip(moved, plain):
        assert (label_map > 0).sum() == (plain_map > 0).sum()  # the whole digit stays in frame
        digit = label_map > 0
        # the image moved with the map: the digit's pixels are those of the unmoved render
        assert torch.allclose(image[:, digit].sum(), plain_image[:, plain_map > 0].sum(), atol=1e-3)


def test_resume_continues_a_segmentation_run_from_its_last_epoch(tmp_path, capsys):
    """``--resume --out DIR --epochs 2``: the task and its flags are the recorded ones."""
    flags = ["--no-freeze-gate", "--gate-loss-input", "probs", "--gate-loss", "l0", "--shift", "4", "--device", "cpu"]
    train_main(tiny_args(tmp_path, *flags, "--epochs", "1"))
    train_main(["--resume", "--out", str(tmp_path), "--epochs", "2"])
    assert "epoch 2/2: mode=packed train_loss=" in capsys.readouterr().out  # the classifier's progress format
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["step"] == 2 * rows[0]["step"]
    straight = tmp_path / "straight"
    train_main(tiny_args(straight, *flags, "--epochs", "2"))
    resumed = load_segmenter(tmp_path)
    fresh = load_segmenter(straight)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), fresh.state_dict().values()))
