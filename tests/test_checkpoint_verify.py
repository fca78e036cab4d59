"""Corrupted weights, configs that no longer match them, and malformed JSON are refused on load,
with errors that name the file (and the key)."""

import json

import pytest
import torch
from test_train import TINY_MODEL

from msvit.io.checkpoint import CONFIG, WEIGHTS, build_model, load_checkpoint, write_checkpoint
from msvit.io.config_file import ConfigError

CONFIG_DICT = {
    "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 32, "num_classes": 10}},
    "msvit": {"coarse_patch_size": 16, "hidden": 16},
}


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    write_checkpoint(tmp_path, build_model(CONFIG_DICT), CONFIG_DICT)
    return tmp_path


def edit_config(folder, change):
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))


def test_flipped_bytes_in_the_tensor_data_are_refused_naming_the_file(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    for i in range(len(data) - 16, len(data)):  # the end of the file: tensor data, not the header
        data[i] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{WEIGHTS} is corrupt: its sha256"):
        load_checkpoint(folder)
    load_checkpoint(folder, verify=False)  # still readable when the user asks not to verify


@pytest.mark.parametrize(
    "key,value,named",
    [("num_heads", 6, "num_heads"), ("global_pool", "avg", "global_pool"), ("qk_norm", True, "q_norm")],
)
def test_a_config_edited_with_the_same_tensor_shapes_is_refused(folder, key, value, named):
    """6 heads instead of 3 (or avg pooling, or qk-norm: new tensors) fit or nearly fit the weights, yet
    give other outputs."""
    edit_config(folder, lambda c: c["timm"]["kwargs"].update({key: value}))
    with pytest.raises(ValueError, match=f"{CONFIG}.*no longer matches the weights.*{named}"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "is not valid JSON .it is empty"),
        ("{nope", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object.*got a JSON list"),
        ('{"msvit": {}}', "missing key 'timm'"),
        ('{"timm": {"name": 3}}', "key 'timm.name' must be a string"),
        ('{"timm": []}', "key 'timm' must be an object"),
    ],
)
def test_malformed_configs_name_the_file_and_the_key(folder, text, match):
    (folder / CONFIG).write_text(text)
    with pytest.raises(ConfigError, match=f"{CONFIG}.*{match}|{match}") as error:
        load_checkpoint(folder)
    assert str(folder / CONFIG) in str(error.value)


def test_missing_checksum_or_architecture_is_refused(folder):
    edit_config(folder, lambda c: c.pop("weights_sha256"))
    with pytest.raises(ConfigError, match="missing key 'weights_sha256'"):
        load_checkpoint(folder)
    edit_config(folder, lambda c: c.pop("architecture"))
    with pytest.raises(ConfigError, match="older msvit.*verify=False"):
        load_checkpoint(folder)


def test_a_truncated_weight_file_is_refused(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{WEIGHTS} is corrupt"):
        load_checkpoint(folder)
    with pytest.raises(ValueError, match=f"{WEIGHTS} is corrupt: not a readable safetensors file"):
        load_checkpoint(folder, verify=False)


def test_a_manifest_naming_a_missing_folder_is_refused(folder):
    (folder / "checkpoint.json").write_text(json.dumps({"epoch": 1, "folder": "epoch-0009", "files": {}}))
    with pytest.raises(ConfigError, match="checkpoint.json: key 'folder' names 'epoch-0009'"):
        load_checkpoint(folder)


def test_a_quoted_number_in_the_timm_kwargs_is_refused_naming_key_and_type(folder):
    """ "embed_dim": "32" used to fail inside timm: "not all arguments converted during string formatting"."""
    edit_config(folder, lambda c: c["timm"]["kwargs"].update({"embed_dim": "32"}))
    with pytest.raises(ConfigError, match="key 'timm.kwargs.embed_dim' must be an integer for vit_tiny_patch16_224"):
        load_checkpoint(folder)


def test_load_checkpoint_on_a_segmentation_checkpoint_says_to_use_load_segmenter(tmp_path):
    """Its backbone built, then failed the architecture check with a message that read like damage."""
    from msvit.models.segmentation import MSSegmenter, load_segmenter, save_segmenter, segmenter_config

    segmenter = MSSegmenter(build_model(CONFIG_DICT), 3)
    save_segmenter(tmp_path, segmenter, segmenter_config(CONFIG_DICT, segmenter))
    with pytest.raises(ConfigError, match="this is a segmentation run: use msvit.load_segmenter") as error:
        load_checkpoint(tmp_path)
    assert "no longer matches" not in str(error.value)
    load_segmenter(tmp_path)
