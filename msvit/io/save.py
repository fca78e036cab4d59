"""``msvit.save_checkpoint(model, folder)``: any model from ``msvit.from_timm`` saved so that
``msvit.load_checkpoint`` (``load_segmenter``) rebuilds it (docs/design.md section 16)."""

from pathlib import Path
from typing import Optional

from torch import nn

from msvit.io import recipe
from msvit.io.checkpoint import build_classifier, write_checkpoint
from msvit.models.segmentation import build_segmenter


def save_checkpoint(model: nn.Module, folder, config: Optional[dict] = None) -> Path:
    """Save ``model`` (an MSViT, MixedScaleSwin, MSSegmenter or PrunedMSViT from ``msvit.from_timm``
    or ``msvit.load_checkpoint``) so that ``msvit.load_checkpoint(folder)`` (``load_segmenter``
    for a segmenter) rebuilds it with the same outputs and ``msvit.eval_transform`` gives the same
    preprocessing: ``model.safetensors`` and a ``config.json`` derived from the model
    (``msvit.io.recipe``: the timm name and keywords, the MSViT options, timm's pretrained_cfg).

    ``config``: optional top-level keys that replace the derived ones (``"timm": {"name": ...,
    "kwargs": {...}}`` for a model whose timm keywords cannot be recovered; ``"data"``: what it
    was trained on). A config that would not rebuild the model is refused here, naming what differs,
    before anything is written. Returns the folder."""
    if isinstance(model, (str, Path)) and isinstance(folder, nn.Module):
        raise TypeError("save_checkpoint(model, folder, config=None): the model comes first")
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    config = {**recipe.recipe(model), **(config or {})}
    build = build_segmenter if config.get("task") == "segmentation" else build_classifier
    return write_checkpoint(folder, model, recipe.complete(model, config), build=build)
