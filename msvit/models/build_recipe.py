"""What ``msvit.from_timm`` was asked for, kept on the model it built as ``model.build_recipe``.

``msvit.save_checkpoint(model, folder)`` writes it into ``config.json`` so ``load_checkpoint``
can call ``from_timm`` again (docs/design.md section 16): the timm registry name and the keywords
``timm.create_model`` took, and ``from_timm``'s own options. A timm model passed in as a module
keeps no record of its keywords; ``name`` is then its ``pretrained_cfg``'s architecture (with the
tag) and ``kwargs`` is None, which ``msvit.io.recipe`` fills in from the model at save time.
"""

from typing import Optional

from torch import nn

RECIPE = "build_recipe"
# timm.create_model keywords that say where weights come from, not what the architecture is:
# the saved weights replace them, and a rebuild must not download anything.
LOADING_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path")


def registry_name(model: nn.Module) -> Optional[str]:
    """``architecture.tag`` from a timm model's ``pretrained_cfg`` (None for a model built from its class)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        return None
    return f"{name}.{cfg['tag']}" if cfg.get("tag") else name


def record_recipe(built: nn.Module, model_or_name, timm_kwargs: Optional[dict], options: dict) -> None:
    """Attach ``{"timm": {"name", "kwargs"}, "msvit": options}`` to ``built`` (None options dropped)."""
    if isinstance(model_or_name, str):
        name = model_or_name
        kwargs = {k: v for k, v in (timm_kwargs or {}).items() if k not in LOADING_KWARGS}
    else:
        name, kwargs = registry_name(model_or_name), None
    options = {k: v for k, v in options.items() if v is not None}
    setattr(built, RECIPE, {"timm": {"name": name, "kwargs": kwargs}, "msvit": options})
