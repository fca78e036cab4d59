"""Checkpoints: weights in safetensors, the recipe to rebuild the model in JSON.

``config.json`` holds ``{"timm": {"name": ..., "kwargs": {...}}, "msvit": {...from_timm kwargs},
"data": {...}}``; ``model.safetensors`` the MSViT state dict. ``build_model(config)`` rebuilds the
architecture without downloading anything, and ``load_checkpoint`` refuses weights that do not fit
it with a message naming the mismatched tensors.
"""
import json
from pathlib import Path
from typing import Tuple

import torch
from safetensors.torch import load_file, save_file

from .model import MSViT
from .timm_compat import from_timm

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PRETRAINED = Path(__file__).parent / "pretrained"


def build_model(config: dict) -> MSViT:
    """An MSViT with random weights in the architecture ``config`` describes (nothing downloaded)."""
    timm_cfg = config["timm"]
    kwargs = {**timm_cfg.get("kwargs", {}), "pretrained": False}
    return from_timm(timm_cfg["name"], timm_kwargs=kwargs, **config.get("msvit", {}))


def save_checkpoint(folder, model: MSViT, config: dict) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_weights(model: MSViT, path) -> None:
    """Load a safetensors state dict, failing clearly on missing, unexpected or mis-shaped tensors."""
    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append("shape mismatches: " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
        if missing:
            problems.append("missing from checkpoint: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append("not in model: " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
        raise ValueError(f"checkpoint {path} does not match this model's configuration ({'; '.join(problems)}); "
                         "build the model from the checkpoint's config.json (msvit.load_checkpoint)")
    model.load_state_dict(state)


def load_checkpoint(folder, map_location="cpu") -> Tuple[MSViT, dict]:
    """(model in eval mode, config) from a folder written by ``save_checkpoint``."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: expected {CONFIG} and {WEIGHTS} in it")
    config = json.loads((folder / CONFIG).read_text())
    model = build_model(config)
    load_weights(model, folder / WEIGHTS)
    return model.to(map_location).eval(), config


def load_pretrained(name: str = "cluttered-digits", map_location="cpu") -> Tuple[MSViT, dict]:
    """A model shipped inside the package: (model, config). ``name``: a folder of ``msvit/pretrained``."""
    folder = PRETRAINED / name
    if not folder.is_dir():
        shipped = sorted(p.name for p in PRETRAINED.iterdir() if p.is_dir()) if PRETRAINED.is_dir() else []
        raise ValueError(f"no pretrained model {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return load_checkpoint(folder, map_location)
