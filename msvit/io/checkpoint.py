"""Checkpoints: weights in safetensors, the recipe to rebuild the model in JSON.

``config.json`` holds ``{"timm": {"name": ..., "kwargs": {...}}, "msvit": {...from_timm kwargs},
"pretrained_cfg": {...}, "data": {...}, "architecture": {...}, "weights_sha256": ...}``;
``model.safetensors`` the state dict. ``write_checkpoint`` writes a given config (msvit train);
``msvit.save_checkpoint`` (``msvit.io.save``) derives it from the model (``msvit.io.recipe``).
``build_model(config)`` rebuilds the architecture without downloading anything. ``load_checkpoint``
verifies before it loads: the weights' sha256 against the config (flipped bytes are refused, not
silently loaded), the rebuilt model's ``architecture`` against the recorded one (an edited
``num_heads`` keeps every tensor shape but changes the outputs), and every tensor name and shape.

A training run folder (``msvit.train.run_folder``) holds one complete checkpoint per epoch folder and a
manifest, ``checkpoint.json``, naming the latest; ``load_checkpoint(run_folder)`` follows it.
"""

import hashlib
import json
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from msvit.data.transforms import pretrained_cfg
from msvit.io import architecture, recipe
from msvit.io.atomic import write_bytes, write_text
from msvit.io.config_file import ConfigError, read_json_object, require
from msvit.models.build_recipe import RECIPE
from msvit.models.mixed_scale_vit import MSViT
from msvit.models.pruning import PruneConfig, PrunedMSViT
from msvit.models.timm_compat import from_timm
from msvit.models.timm_names import misquoted_kwarg

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "checkpoint.json"
PRETRAINED = Path(__file__).parents[1] / "pretrained"  # msvit/pretrained


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_model(config: dict) -> MSViT:
    """An MSViT with random weights in the architecture ``config`` describes (nothing downloaded):
    ``config["msvit"]``'s keywords, and the aggregation its recorded architecture names."""
    timm_cfg = config["timm"]
    kwargs = {**timm_cfg.get("kwargs", {}), "pretrained": False}
    options = {**architecture.from_timm_options(config.get("architecture")), **config.get("msvit", {})}
    return from_timm(timm_cfg["name"], timm_kwargs=kwargs, **options)


def write_checkpoint(
    folder, model: nn.Module, config: dict, point: str = "", build: Optional[Callable[[dict], nn.Module]] = None
) -> Path:
    """Write ``model.safetensors``, then ``config.json`` (``config`` plus the weights' sha256 and the
    model's architecture), each crash-safe (``msvit.io.atomic``), after checking that ``config``
    rebuilds the model (``msvit.io.recipe.check_rebuilds``). A kill between the two files leaves new
    weights beside the old config, which loading then refuses as corrupt: a folder that must stay
    loadable at every instant is written fresh and switched by a manifest (``msvit.train.run_folder``).
    ``point``: the fault tests' crash-point prefix. ``build``: what loads it (default
    ``build_classifier``, ``load_checkpoint``'s; ``save_segmenter`` passes ``build_segmenter``)."""
    if isinstance(folder, nn.Module):
        raise TypeError(
            "write_checkpoint(folder, model, config): the folder comes first; msvit.save_checkpoint(model, folder)"
        )
    check_gate_recipe(model, config)
    config = recipe.json_ready({**config, "architecture": architecture.describe(model)})
    recipe.check_rebuilds(model, config, build or build_classifier)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save_safetensors(state)
    config = {**config, "weights_sha256": sha256(data)}
    write_bytes(folder / WEIGHTS, data, point and f"{point}:weights")
    write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n", point and f"{point}:config")
    return folder


def save_checkpoint(folder, model: nn.Module, config: dict, point: str = "") -> Path:
    """The old name of ``write_checkpoint`` (same arguments, folder first), kept for callers written
    before the public ``msvit.save_checkpoint(model, folder)`` (``msvit.io.save``), which takes the
    model first and derives the config; new code calls one of those two."""
    return write_checkpoint(folder, model, config, point)


def check_gate_recipe(model: nn.Module, config: dict) -> None:
    """A gate without weights (the entropy gate) comes back only through ``config["msvit"]``:
    refuse, before writing anything, a config that would rebuild the learned gate instead."""
    gate = getattr(getattr(model, "backbone", model), "gate", None)
    weightless = hasattr(gate, "from_timm_kwargs") and gate.from_timm_kwargs().get("gate") == "entropy"
    if weightless and config.get("msvit", {}).get("gate") != "entropy":
        raise ValueError(
            "this model has the entropy gate, which has no weights: config['msvit'] must rebuild it; "
            f"add model.gate.from_timm_kwargs() to it ({gate.from_timm_kwargs()})"
        )


def check_state(model: nn.Module, state: dict, path) -> None:
    """Fail clearly on missing, unexpected or mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append("shape mismatches: " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
        if missing:
            problems.append("missing from checkpoint: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append("not in model: " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
        raise ValueError(
            f"checkpoint {path} does not match this model's configuration ({'; '.join(problems)}); "
            "build the model from the checkpoint's config.json (msvit.load_checkpoint)"
        )


def parse_weights(data: bytes, path) -> dict:
    try:
        return load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types for a bad header or size
        raise ValueError(f"{path} is corrupt: not a readable safetensors file ({error})") from None


def load_weights(model: nn.Module, path) -> None:
    """Load a safetensors state dict (no checksum: see ``load_checkpoint`` for verified loading)."""
    state = parse_weights(Path(path).read_bytes(), path)
    check_state(model, state, path)
    model.load_state_dict(state)


def resolve(folder) -> Path:
    """The folder holding the checkpoint files: ``folder`` itself, or the epoch folder its
    ``checkpoint.json`` names (a training run)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        manifest = read_json_object(folder / MANIFEST, "training run's checkpoint manifest")
        name = require(manifest, "folder", str, folder / MANIFEST)
        if Path(name).name != name or not (folder / name).is_dir():
            raise ConfigError(f"{folder / MANIFEST}: key 'folder' names {name!r}, which is not a folder in {folder}")
        folder = folder / name
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{folder} is not a checkpoint folder: expected {CONFIG} and {WEIGHTS} in it "
            f"(or a training run's {MANIFEST})"
        )
    return folder


def read_config(path: Path, verify: bool = True) -> dict:
    """``config.json`` with every key msvit relies on checked; errors name the file and the key."""
    config = read_json_object(path, "checkpoint config written by msvit")
    timm_cfg = require(config, "timm", dict, path)
    name = require(timm_cfg, "name", str, path, where="timm.")
    kwargs = require(timm_cfg, "kwargs", dict, path, optional=True, where="timm.") or {}
    misquoted = misquoted_kwarg(name, kwargs)
    if misquoted is not None:  # timm would fail with "not all arguments converted during string formatting"
        key, expected = misquoted
        raise ConfigError(f"{path}: key 'timm.kwargs.{key}' must be {expected} for {name}, got str {kwargs[key]!r:.60}")
    require(config, "msvit", dict, path, optional=True)
    require(config, "data", dict, path, optional=True)
    if require(config, "task", str, path, optional=True) == "segmentation":
        require(config, "segmentation", dict, path)
    if verify:
        if "architecture" not in config and "weights_sha256" not in config:
            raise ConfigError(
                f"{path} has no 'architecture' and no 'weights_sha256' (a checkpoint of an older msvit): "
                "load it with msvit.load_checkpoint(folder, verify=False) and msvit.save_checkpoint it again"
            )
        require(config, "architecture", dict, path)
        digest = require(config, "weights_sha256", str, path)
        if len(digest) != 64:
            raise ConfigError(f"{path}: key 'weights_sha256' must be 64 hex digits, got {digest!r:.80}")
    return config


def read_checkpoint(folder, verify: bool = True) -> Tuple[dict, dict, Path]:
    """(config, state dict, checkpoint folder) of a checkpoint; with ``verify`` the weights' bytes
    must hash to the config's ``weights_sha256``."""
    folder = resolve(folder)
    config = read_config(folder / CONFIG, verify)
    data = (folder / WEIGHTS).read_bytes()  # hashed and parsed from the same bytes
    if verify and sha256(data) != config["weights_sha256"]:
        raise ValueError(
            f"{folder / WEIGHTS} is corrupt: its sha256 {sha256(data)[:16]}... differs from the "
            f"weights_sha256 {config['weights_sha256'][:16]}... recorded in {folder / CONFIG} "
            "(damaged or replaced after it was saved)"
        )
    return config, parse_weights(data, folder / WEIGHTS), folder


def load_verified(folder, build: Callable[[dict], nn.Module], verify: bool = True) -> nn.Module:
    """``build(config)`` filled with the checkpoint's weights after every check, its config attached
    as ``model.pretrained_cfg`` (``msvit.data.transforms.pretrained_cfg``)."""
    config, state, folder = read_checkpoint(folder, verify)
    try:
        model = build(config)
    except (TypeError, ValueError, KeyError, AssertionError, NotImplementedError, RuntimeError) as error:
        raise ConfigError(
            f"{folder / CONFIG}: cannot build the model it describes ({type(error).__name__}: {error})"
        ) from error
    if verify:
        found = architecture.differences(config["architecture"], architecture.describe(model))
        if found:
            raise ConfigError(
                f"{folder / CONFIG} no longer matches the weights in {folder / WEIGHTS}: the model it "
                f"builds differs from the recorded architecture ({'; '.join(found[:5])})"
            )
    check_state(model, state, folder / WEIGHTS)
    model.load_state_dict(state)
    model.pretrained_cfg = pretrained_cfg(config, model)
    setattr(model, RECIPE, config)  # saving it again writes the same recipe (msvit.io.recipe)
    return model


def load_checkpoint(folder, map_location="cpu", verify: bool = True) -> nn.Module:
    """The model in eval mode from a folder written by ``save_checkpoint`` or a training run, with
    ``model.pretrained_cfg`` (input size, mean, std, classes, data options, and ``"config"``: the
    checkpoint's config.json). ``verify=False`` skips the checksum and architecture checks
    (checkpoints of older versions)."""
    return load_verified(folder, build_classifier, verify).to(map_location).eval()


def build_classifier(config: dict) -> nn.Module:
    """``build_model`` for ``load_checkpoint``, wrapped in ``PrunedMSViT`` when the config records
    pruning. A segmenter's config would build its backbone, which then fails the architecture check
    with a long message that reads like a damaged config."""
    if config.get("task") == "segmentation":
        raise ValueError("this is a segmentation run: use msvit.load_segmenter")
    model = build_model(config)
    if "pruning" in config:
        return PrunedMSViT(model, config=PruneConfig(**config["pruning"]))
    return model


def shipped_names() -> List[str]:
    """The models shipped inside the package (folders of ``msvit/pretrained``)."""
    return sorted(p.name for p in PRETRAINED.iterdir() if p.is_dir()) if PRETRAINED.is_dir() else []


def load_pretrained(name: str = "cluttered-digits", map_location="cpu") -> MSViT:
    """A model shipped inside the package, in eval mode, with ``model.pretrained_cfg`` (its input
    size, mean and std: ``msvit.eval_transform(model)`` preprocesses images for it). ``name``: a
    folder of ``msvit/pretrained``."""
    folder = PRETRAINED / name
    if not folder.is_dir():
        raise ValueError(f"no pretrained model {name!r}; shipped: {', '.join(shipped_names()) or 'none'}")
    return load_checkpoint(folder, map_location)
