"""from_timm over registry names of every family (tests/model_families.py): the supported ones give
all-fine logits equal to timm's on re-drawn parameters, the others are refused naming the model, the
module and the missing feature. Models are built with pretrained=False, depth 2 and small images."""

import re
from pathlib import Path

import pytest
import timm
import torch

import msvit

from helpers import redraw_parameters, rel_err
from model_families import cases, readme_table


def build(name, kwargs):
    torch.manual_seed(0)
    return redraw_parameters(timm.create_model(name, pretrained=False, depth=2, **kwargs).eval())


@pytest.mark.parametrize(
    "family, name, kwargs, feature", cases(refused=False), ids=lambda v: v if isinstance(v, str) else ""
)
def test_supported_family_all_fine_equals_timm(family, name, kwargs, feature):
    vit = build(name, kwargs)
    model = msvit.from_timm(vit).eval()
    size = kwargs.get("img_size", model.pretrained_cfg["input_size"][-1])  # NaFlexViT: its position grid
    images = torch.randn(2, 3, size, size)
    h, w = model.coarse_grid(images)
    with torch.no_grad():
        expected = vit(images)
        got = model(images, mask=torch.ones(2, h * w, dtype=torch.bool))
    assert expected.std() > 0.05, "the re-drawn model's logits must depend on the image"
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize(
    "family, name, kwargs, feature", cases(refused=True), ids=lambda v: v if isinstance(v, str) else ""
)
def test_refused_family_names_model_module_and_feature(family, name, kwargs, feature):
    depth = {} if name.startswith("naflexvit") else dict(depth=2)
    with pytest.raises(NotImplementedError, match=re.escape(feature)) as error:
        msvit.from_timm(name, timm_kwargs=dict(pretrained=False, **depth, **kwargs))
    message = str(error.value)
    assert name in message
    assert re.search(r": [\w.]+ \(\w+\) uses ", message), "the message names the module's path and class"


def test_not_a_vit_is_a_type_error():
    with pytest.raises(TypeError, match="timm VisionTransformer, Eva or NaFlexVit"):
        msvit.from_timm("levit_128s", timm_kwargs=dict(pretrained=False))


def test_a_module_of_an_unknown_class_is_refused_by_path():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64)
    vit.blocks[1].mlp.act = torch.nn.Softmax(-1)  # not known to act on each token independently
    with pytest.raises(NotImplementedError, match=re.escape("blocks.1.mlp.act (Softmax)")):
        msvit.from_timm(vit)


def test_the_models_page_holds_the_generated_model_table():
    page = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert readme_table() in page, "regenerate the table in docs/models.md with: python tests/model_families.py"
