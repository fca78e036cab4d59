"""The ``config.json`` that rebuilds a model, derived from the model itself (docs/design.md section 16).

``msvit.save_checkpoint(model, folder)`` needs no config from the user: the timm name and keywords
come from ``model.build_recipe`` (``msvit.models.build_recipe``: what ``from_timm`` was asked, or
the config a loaded checkpoint was built from), the gate's options from the gate itself, the
preprocessing from ``model.pretrained_cfg`` (timm's: input size, interpolation, crop, mean, std,
label names). A segmenter records its decoder, a ``PrunedMSViT`` its pruning.

``check_rebuilds`` builds the config on the meta device (no memory, no download) the way
``load_checkpoint`` will and compares architectures and tensor shapes: a config that would not load
is refused when it is saved, naming what differs, never discovered when it is loaded.
"""

import copy
import json
from typing import Callable, Optional

import torch
from torch import nn

from msvit.io import architecture
from msvit.models.build_recipe import RECIPE

# The keys of timm's pretrained_cfg a checkpoint keeps: the preprocessing and what the outputs mean.
PRETRAINED_KEYS = (
    "architecture",
    "tag",
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "label_names",
)
# Keys of a loaded checkpoint's config that describe the saved weights, not how to rebuild them.
WRITTEN_KEYS = ("architecture", "weights_sha256")


def timm_pretrained_cfg(model: nn.Module) -> Optional[dict]:
    """The preprocessing keys of ``model.pretrained_cfg`` (None when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        return None
    return {k: cfg[k] for k in PRETRAINED_KEYS if cfg.get(k) is not None}


def gate_options(model: nn.Module) -> dict:
    """``from_timm``'s gate keywords from the gate itself (they win over what was asked)."""
    gate = model.gate
    if hasattr(gate, "from_timm_kwargs"):
        return gate.from_timm_kwargs()
    return {"gate": "learned", "hidden": gate.fc1.out_features, "temperature": gate.temperature}


def backbone_recipe(model: nn.Module) -> dict:
    """``{"timm", "msvit"}`` of an MSViT or a MixedScaleSwin."""
    stored = getattr(model, RECIPE, None) or {}
    timm_cfg = stored.get("timm") or {"name": None, "kwargs": None}
    options = {**stored.get("msvit", {}), **gate_options(model)}
    tok = model.tokenizer
    if "scales" not in options:
        options["coarse_patch_size"] = getattr(tok, "coarse_patch", None) or tok.fine_patch * tok.ratio
    if getattr(tok, "aggregate", "shared") != "shared":
        options["aggregate"] = tok.aggregate
    return {"timm": dict(timm_cfg), "msvit": options}


def recipe(model: nn.Module) -> dict:
    """The config that rebuilds ``model``: an MSViT, a MixedScaleSwin, an ``MSSegmenter`` or a
    ``PrunedMSViT``; a model loaded from a checkpoint gives back that checkpoint's config."""
    stored = getattr(model, RECIPE, None)
    if stored and set(stored) - {"timm", "msvit"}:  # the whole config of a loaded checkpoint (data, task, ...)
        config = {k: copy.deepcopy(v) for k, v in stored.items() if k not in WRITTEN_KEYS}
    elif hasattr(model, "backbone"):
        config = segmenter_config(recipe(model.backbone), model, model.decoder_kwargs)
    elif hasattr(model, "model") and hasattr(model, "config"):  # PrunedMSViT
        from msvit.models.pruning import prune_options

        config = {**recipe(model.model), "pruning": prune_options(model.config)}
    else:
        config = backbone_recipe(model)
    cfg = timm_pretrained_cfg(model)
    if cfg:
        config["pretrained_cfg"] = cfg
    return config


def segmenter_config(backbone_config: dict, segmenter: nn.Module, decoder_kwargs: Optional[dict] = None) -> dict:
    """Checkpoint config of an ``MSSegmenter``: the backbone's recipe (its timm head dropped) plus ours."""
    timm_cfg = backbone_config["timm"]
    return {
        **backbone_config,
        "task": "segmentation",
        # None: the keywords are inferred at save time (``complete``), the head's 0 classes included
        "timm": {
            **timm_cfg,
            "kwargs": None if timm_cfg.get("kwargs") is None else {**timm_cfg["kwargs"], "num_classes": 0},
        },
        "segmentation": {
            "num_classes": segmenter.num_classes,
            "decoder": segmenter.decoder_name,
            "decoder_kwargs": decoder_kwargs or {},
            "freeze_gate": segmenter.freeze_gate,
        },
    }


def core(model: nn.Module) -> nn.Module:
    """The MSViT (or MixedScaleSwin) inside a segmenter or a ``PrunedMSViT``, else the model."""
    if hasattr(model, "backbone"):
        return model.backbone
    return model.model if hasattr(model, "model") and hasattr(model, "config") else model


def infer_timm_kwargs(model: nn.Module, config: dict) -> dict:
    """For a timm model that was passed to ``from_timm`` as a module (its keywords unknown): the
    keywords its description shows differ from the registry default (classes, depth, image size,
    width, heads), against a meta-device ``from_timm`` of the bare name with the same options."""
    from msvit.models.timm_compat import from_timm

    described = architecture.describe(core(model))
    with torch.device("meta"):
        bare = from_timm(config["timm"]["name"], timm_kwargs={"pretrained": False}, **config.get("msvit", {}))
    default = architecture.describe(bare)
    found = {}
    for key in ("num_classes", "depth", "embed_dim", "img_size"):
        if key in described and described[key] != default.get(key):
            found[key] = described[key]
    if "grid" in described and described["grid"] != default.get("grid"):
        found["img_size"] = [g * described["patch_size"] for g in described["grid"]]
    heads = described.get("blocks", {}).get("num_heads")
    if heads != default.get("blocks", {}).get("num_heads") and isinstance(heads, int):
        found["num_heads"] = heads
    return found


def complete(model: nn.Module, config: dict) -> dict:
    """``config`` with the timm keywords filled in where the model did not record them."""
    timm_cfg = config.get("timm") or {}
    if not timm_cfg.get("name"):
        raise ValueError(
            "cannot save: this model's timm architecture has no registry name (a timm model built from "
            "its class, not timm.create_model), so load_checkpoint could not rebuild it; pass "
            "config={'timm': {'name': 'vit_small_patch16_224', 'kwargs': {...}}} naming a registered "
            "architecture and the keywords that give this model's shapes"
        )
    if timm_cfg.get("kwargs") is None:
        config = {**config, "timm": {**timm_cfg, "kwargs": infer_timm_kwargs(model, config)}}
    return config


def json_ready(config: dict) -> dict:
    """``config`` as ``load_checkpoint`` will read it back (tuples become lists); a value JSON
    cannot hold (a class, a module) is refused, naming its key."""
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as error:
        where = ", ".join(bad_keys(config)) or "?"
        raise ValueError(
            f"cannot save: config key {where} holds a value JSON cannot store ({error}); a checkpoint "
            "records architecture keywords as numbers, strings and lists"
        ) from None


def bad_keys(value, prefix: str = "") -> list:
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in bad_keys(v, f"{prefix}{key}.")]
    if isinstance(value, (list, tuple)):
        return [k for v in value for k in bad_keys(v, prefix)]
    try:
        json.dumps(value)
        return []
    except (TypeError, ValueError):
        return [prefix.rstrip(".")]


def check_rebuilds(model: nn.Module, config: dict, build: Callable[[dict], nn.Module]) -> None:
    """Refuse (ValueError naming what differs) a ``config`` (with its ``architecture``) from
    which ``build`` would not rebuild ``model``'s architecture and tensor shapes."""
    try:
        with torch.device("meta"):
            rebuilt = build(config)
    except Exception as error:  # timm and from_timm raise many types for a config they cannot build
        raise ValueError(
            f"cannot save: load_checkpoint could not rebuild this model from its config "
            f"({type(error).__name__}: {str(error)[:300]}); timm: {config.get('timm')}"
        ) from error
    found = architecture.differences(config["architecture"], architecture.describe(rebuilt))
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    other = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    found += [
        f"tensor {k}: {own.get(k, '<absent>')} here, {other.get(k, '<absent>')} rebuilt"
        for k in own.keys() ^ other.keys()
    ]
    found += [f"tensor {k}: {own[k]} here, {other[k]} rebuilt" for k in own.keys() & other.keys() if own[k] != other[k]]
    if found:
        raise ValueError(
            f"cannot save: config.json would rebuild a different model ({'; '.join(found[:5])}"
            f"{' ...' if len(found) > 5 else ''}); timm: {config.get('timm')}. Build the model with "
            "msvit.from_timm(name, timm_kwargs={...}) or pass save_checkpoint(model, folder, "
            "config={'timm': {'name': ..., 'kwargs': {...}}})"
        )
