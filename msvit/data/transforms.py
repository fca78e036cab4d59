"""What a loaded model expects of its input, in timm's terms: ``model.pretrained_cfg`` and the
evaluation transform built from it.

A checkpoint's ``config.json`` records the data the model was trained on (image size, mean, std,
classes and the data options), and a model saved with ``msvit.save_checkpoint`` also timm's own
``pretrained_cfg`` (interpolation, crop, ...: it wins over the data's); the loaders attach it as
``model.pretrained_cfg`` with timm's keys (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
``crop_mode``, ``num_classes``, ``label_names``), so ``timm.data.resolve_data_config(model=model)`` reads it as it
reads a timm model's. ``data`` holds the training data options and ``config`` the whole checkpoint
config (the recipe ``msvit.io.checkpoint.build_model`` rebuilds the model from).
"""

from typing import Callable, Optional, Union

from torch import nn

DIGITS = "cluttered-digits"
# The evaluation view of an ImageFolder run: shorter side resized to size / 0.875, centre crop.
# The built-in digits are rendered at the model's size and used as they are (crop_pct 1).
FOLDER_CROP_PCT = 0.875
INPUT_KEYS = ("input_size", "mean", "std")


def pretrained_cfg(config: dict, model: nn.Module) -> dict:
    """timm-style ``pretrained_cfg`` of ``model`` (an MSViT, or a model with an MSViT ``backbone``)
    loaded from a checkpoint with ``config``. Input keys are left out when the config records no
    data (``eval_transform`` then refuses the model)."""
    data = config.get("data") or {}
    in_chans = getattr(model, "backbone", model).in_chans
    cfg = {
        "num_classes": model.num_classes,
        "interpolation": "bilinear",
        "crop_mode": "center",
        "crop_pct": 1.0 if data.get("name") == DIGITS else FOLDER_CROP_PCT,
        "data": data,
        "config": config,
    }
    if data.get("image_size"):
        cfg["input_size"] = (in_chans, *(int(s) for s in data["image_size"]))
    for key in ("mean", "std"):
        if data.get(key):
            cfg[key] = tuple(float(v) for v in data[key])
    if data.get("classes"):
        cfg["label_names"] = list(data["classes"])
    cfg.update(recorded_cfg(config.get("pretrained_cfg") or {}))
    return cfg


def recorded_cfg(recorded: dict) -> dict:
    """timm's pretrained_cfg as ``msvit.save_checkpoint`` recorded it (``msvit.io.recipe``), with
    the tuples timm uses where JSON gave lists."""
    return {k: tuple(v) if isinstance(v, list) and k != "label_names" else v for k, v in recorded.items()}


def eval_transform(
    model_or_cfg: Union[nn.Module, dict], *, max_patches: Optional[int] = None, patch: Optional[int] = None
) -> Callable:
    """The evaluation preprocessing a model expects, from its ``pretrained_cfg`` (or that dict):
    timm's ``create_transform`` of ``resolve_data_config``: resize, centre crop, normalise.

    It takes a PIL image or a float tensor ``[C, H, W]`` (or ``[B, C, H, W]``) with values in
    [0, 1], as ``msvit.data.ClutteredDigits`` gives, and returns the normalised float tensor at
    the model's input size. A PIL image of another mode (RGBA, greyscale L or LA, palette) is
    converted to the model's channels first, as ``msvit visualize`` reads files: alpha dropped,
    grey repeated. Pass it as a dataset's ``transform``.

    ``max_patches=N``: native resolution instead (docs/design.md section 11): no crop and no fixed
    size; each image keeps its aspect ratio, resized to the largest size with at most N fine
    patches, each side a multiple of the patch (``msvit.data.native.size_for_patches``, timm's
    NaFlex rule), with the config's interpolation, then normalised. The patch is the model's fine
    patch (``patch=`` for a dict). Images then differ in size: batch them as a list
    (``msvit.data.native.collate_images``).
    """
    cfg = model_or_cfg if isinstance(model_or_cfg, dict) else getattr(model_or_cfg, "pretrained_cfg", None)
    missing = [k for k in INPUT_KEYS if not (cfg or {}).get(k)]
    if missing:
        name = "this dict" if isinstance(model_or_cfg, dict) else f"this {type(model_or_cfg).__name__}"
        raise ValueError(
            f"{name} has no pretrained_cfg {', '.join(missing)}: models from msvit.load_checkpoint, "
            "load_pretrained and load_segmenter have them; for others set model.pretrained_cfg = "
            "{'input_size': (3, H, W), 'mean': (...), 'std': (...)}"
        )
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms import Compose

    mode = PIL_MODES.get(cfg["input_size"][0])
    if max_patches is not None:
        return native_transform(model_or_cfg, cfg, mode, max_patches, patch)
    timm_transform = create_transform(**resolve_data_config(pretrained_cfg=cfg))
    return timm_transform if mode is None else Compose([ConvertMode(mode), timm_transform])


def native_transform(model_or_cfg, cfg: dict, mode: Optional[str], max_patches: int, patch: Optional[int]):
    """``eval_transform(..., max_patches=N)``: convert, resize to the patch budget, normalise."""
    from timm.data.transforms import MaybeToTensor
    from torchvision.transforms import Compose, Normalize

    from msvit.data.native import ResizeToPatches

    if patch is None:
        tokenizer = getattr(getattr(model_or_cfg, "backbone", model_or_cfg), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("eval_transform(cfg, max_patches=...) of a dict needs patch= (the fine patch size)")
        patch = tokenizer.fine_patch
    steps = [ResizeToPatches(patch, max_patches, cfg.get("interpolation", "bicubic"))]
    steps += [MaybeToTensor(), Normalize(cfg["mean"], cfg["std"])]
    return Compose(([ConvertMode(mode)] if mode else []) + steps)


# The PIL mode of a model's channel count: an RGBA or greyscale file would otherwise reach
# Normalize with 4 or 1 channels and fail with a raw broadcast error.
PIL_MODES = {3: "RGB", 1: "L"}


class ConvertMode:
    """PIL images converted to ``mode``; tensors and images already in it pass unchanged. A class,
    not a lambda: data loader workers pickle the transform."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        if hasattr(image, "convert") and getattr(image, "mode", self.mode) != self.mode:
            return image.convert(self.mode)
        return image

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"
