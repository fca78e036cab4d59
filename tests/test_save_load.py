"""msvit.save_checkpoint(model, folder) / msvit.load_checkpoint(folder): any model from_timm builds
comes back with equal logits (parameters re-drawn first) and timm's preprocessing; a model that
config.json would not rebuild is refused when it is saved, naming what differs."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import msvit
from msvit.io.checkpoint import CONFIG, WEIGHTS

from helpers import redraw_parameters, tiny_vit
from model_families import FAMILIES

# One registry name per supported family (tests/model_families.py), depth 1, small images.
FIRST_CASES = [(f.family, *f.cases[0]) for f in FAMILIES if not f.refused]
PHOTO = Image.fromarray((torch.rand(50, 90, 3) * 255).to(torch.uint8).numpy())  # not the model's size


def round_trip(model, folder, images, load=msvit.load_checkpoint, **forward):
    model = redraw_parameters(model).eval()
    msvit.save_checkpoint(model, folder)
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(loaded(images, **forward), model(images, **forward))
    return model, loaded


def same_transform(a, b):
    assert torch.equal(msvit.eval_transform(a)(PHOTO), msvit.eval_transform(b)(PHOTO))


def random_mask(model, images, seed=0):
    h, w = model.coarse_grid(images)
    return torch.rand(images.shape[0], h * w, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("family, name, kwargs", FIRST_CASES, ids=[c[0] for c in FIRST_CASES])
def test_every_family_round_trips_from_a_timm_module(tmp_path, family, name, kwargs):
    """The timm model is passed as a module: its keywords (depth 1, the small image) are not
    recorded anywhere and must be recovered from the model at save time."""
    torch.manual_seed(0)
    if name.startswith("gemma4_vit"):  # its head and MLP widths are not recovered from a module
        module = timm.create_model(name, pretrained=False, depth=1, **kwargs)
        refused = msvit.from_timm(module)
        with pytest.raises(ValueError, match="cannot save: config.json would rebuild a different model"):
            msvit.save_checkpoint(refused, tmp_path / "refused")  # at save time, naming it
        assert not (tmp_path / "refused" / "checkpoint.json").exists()
        size = 240  # 15 x 15 patches of 16 px: within its 32-per-axis position table, 5 x 5 regions of 48 px
        model = msvit.from_timm(name, timm_kwargs=dict(depth=1, **kwargs))  # by name: its keywords recorded
    else:
        model = msvit.from_timm(timm.create_model(name, pretrained=False, depth=1, **kwargs))
        size = model.pretrained_cfg["input_size"][-1]
    images = torch.randn(2, 3, size, size)
    model, loaded = round_trip(model, tmp_path, images, mask=random_mask(model, images))
    same_transform(model, loaded)
    assert loaded.pretrained_cfg["interpolation"] == model.pretrained_cfg["interpolation"]


def test_depth_and_classes_from_timm_kwargs_and_timms_preprocessing(tmp_path):
    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(img_size=64, depth=2, num_classes=7))
    images = torch.randn(2, 3, 64, 64)
    model, loaded = round_trip(model, tmp_path, images)
    assert loaded.num_classes == 7 and len(loaded.blocks) == 2
    cfg = loaded.pretrained_cfg
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["input_size"]) == ("bicubic", 0.9, (3, 64, 64))
    assert (cfg["mean"], cfg["std"]) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    same_transform(model, loaded)
    assert json.loads((tmp_path / CONFIG).read_text())["timm"]["kwargs"] == dict(img_size=64, depth=2, num_classes=7)


def test_a_loaded_model_saves_the_same_recipe_again(tmp_path):
    model = msvit.from_timm("deit_tiny_patch16_224", timm_kwargs=dict(img_size=64, depth=1), gate="entropy")
    msvit.save_checkpoint(model, tmp_path / "a")
    msvit.save_checkpoint(msvit.load_checkpoint(tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "a" / CONFIG).read_text() == (tmp_path / "b" / CONFIG).read_text()


@pytest.mark.parametrize("gate", ["learned", "entropy"])
def test_three_scales(tmp_path, gate):
    options = dict(entropy_thresholds=(3.0, 2.0)) if gate == "entropy" else {}
    model = msvit.from_timm(
        "vit_tiny_patch16_224", timm_kwargs=dict(img_size=128, depth=1), scales=(16, 32, 64), gate=gate, **options
    )
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    images[0, :, :64] = 0.0  # flat regions: the entropy gate keeps them coarse, the rest fine
    model, loaded = round_trip(model, tmp_path, images)
    assert loaded.gate.from_timm_kwargs() == model.gate.from_timm_kwargs()


def test_entropy_gate_keeps_its_thresholds_and_normalisation(tmp_path):
    model = msvit.from_timm(
        "vit_small_patch16_224", timm_kwargs=dict(img_size=64, depth=1), gate="entropy", entropy_thresholds=(4.25,)
    )
    images = torch.randn(2, 3, 64, 64)
    model, loaded = round_trip(model, tmp_path, images)
    assert loaded.gate.thresholds == (4.25,)
    assert torch.equal(loaded.gate_mask(images), model.gate_mask(images))


def test_aggregation_and_coarse_patch(tmp_path):
    model = msvit.from_timm(
        "vit_tiny_patch16_224", timm_kwargs=dict(img_size=128, depth=1), aggregate="zero_conv", coarse_patch_size=64
    )
    images = torch.randn(1, 3, 128, 128)
    model, loaded = round_trip(model, tmp_path, images, mask=random_mask(model, images))
    assert loaded.tokenizer.aggregate == "zero_conv" and loaded.tokenizer.ratio == 4


def test_swin(tmp_path):
    model = msvit.from_timm(
        "swin_tiny_patch4_window7_224", timm_kwargs=dict(depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1))
    )
    images = torch.randn(1, 3, 224, 224)
    model, loaded = round_trip(model, tmp_path, images)
    assert isinstance(loaded, msvit.MixedScaleSwin)
    same_transform(model, loaded)


def test_segmenter_of_a_timm_module(tmp_path):
    backbone = msvit.from_timm(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1))
    segmenter = msvit.MSSegmenter(backbone, 5, decoder="mask", decoder_kwargs={"depth": 1})
    images = torch.randn(1, 3, 64, 64)
    _, loaded = round_trip(segmenter, tmp_path, images, load=msvit.load_segmenter)
    assert loaded.decoder_kwargs == {"depth": 1}
    with pytest.raises(ValueError, match="load_segmenter"):
        msvit.load_checkpoint(tmp_path)


@pytest.mark.parametrize("built_from", ["name", "module"])
def test_pruned_model(tmp_path, built_from):
    kwargs = dict(img_size=64, depth=3)
    name = "deit_tiny_patch16_224"
    model = (
        msvit.from_timm(name, timm_kwargs=kwargs)
        if built_from == "name"
        else msvit.from_timm(timm.create_model(name, **kwargs))
    )
    pruned = msvit.PrunedMSViT(model, keep_ratio=0.5, layers=(0, 1), fuse=False)
    images = torch.randn(2, 3, 64, 64)
    _, loaded = round_trip(pruned, tmp_path, images)
    assert isinstance(loaded, msvit.PrunedMSViT) and loaded.config == pruned.config


def test_a_model_without_a_registry_name_is_refused_before_writing(tmp_path):
    model = msvit.from_timm(tiny_vit())  # built from timm's class: no name to rebuild it from
    with pytest.raises(ValueError, match="no registry name"):
        msvit.save_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    msvit.save_checkpoint(  # naming an architecture with the same shapes makes it loadable
        model,
        tmp_path / "named",
        config={
            "timm": {
                "name": "vit_small_patch16_224",
                "kwargs": dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7),
            }
        },
    )
    msvit.load_checkpoint(tmp_path / "named")


def test_a_config_that_rebuilds_another_model_is_refused_naming_what_differs(tmp_path):
    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(img_size=64, depth=2, num_classes=7))
    config = {"timm": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 64}}}
    with pytest.raises(ValueError, match=r"depth: recorded 2, rebuilt 12.*num_classes: recorded 7, rebuilt 1000"):
        msvit.save_checkpoint(model, tmp_path, config=config)
    assert not (tmp_path / WEIGHTS).exists() and not (tmp_path / CONFIG).exists()


def test_a_keyword_json_cannot_hold_is_refused_naming_it(tmp_path):
    model = msvit.from_timm(
        "vit_tiny_patch16_224", timm_kwargs=dict(img_size=64, depth=1, norm_layer=torch.nn.LayerNorm)
    )
    with pytest.raises(ValueError, match="timm.kwargs.norm_layer"):
        msvit.save_checkpoint(model, tmp_path)


def test_arguments_in_the_internal_order_are_refused(tmp_path):
    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(img_size=64, depth=1))
    with pytest.raises(TypeError, match="the model comes first"):
        msvit.save_checkpoint(tmp_path, model)


DOCS = (Path(__file__).resolve().parents[1] / "docs" / "save_load.md").read_text()


@pytest.mark.parametrize("code", re.findall(r"^```python\n(.*?)^```", DOCS, flags=re.M | re.S))
def test_the_docs_page_runs_as_written(code):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/save_load.md", "exec"), {"__name__": "docs"})
    assert printed.getvalue().strip()


def test_the_internal_writer_keeps_its_old_name_and_refuses_the_public_order(tmp_path):
    from msvit.io.checkpoint import save_checkpoint as old_name
    from msvit.io.recipe import recipe

    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(img_size=64, depth=1))
    old_name(tmp_path, model, recipe(model))  # callers written before msvit.save_checkpoint
    msvit.load_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="the folder comes first"):
        old_name(model, tmp_path, {})
