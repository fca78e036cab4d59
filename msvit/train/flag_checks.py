"""Parse-time checks of ``msvit train``'s flags: every number in its range, every file readable.

A negative learning rate, a zero-width gate or ``--epochs 0`` used to run (or exit 0 with an empty
folder) and a bad file surfaced as a raw error deep in timm; argparse's ``error`` names the flag
and stops before any data is generated.
"""

import json
import math
from pathlib import Path
from typing import NamedTuple, Optional


class Range(NamedTuple):
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # True: low itself is excluded
    high_open: bool = False

    def holds(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return "finite" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, FRACTION = Range(1), Range(0), Range(0, 1, high_open=True)
TRAIN_RANGES = {
    "image_size": POSITIVE,
    "train_size": POSITIVE,
    "val_size": POSITIVE,
    "digit_scale": Range(0, 1, low_open=True),
    "shift": NON_NEGATIVE,
    "coarse_patch": POSITIVE,
    "scales": POSITIVE,
    "gate_hidden": POSITIVE,
    "gate_init_logit": Range(),
    "gate_mode_epochs": NON_NEGATIVE,
    "gate_lambda": NON_NEGATIVE,
    "gate_target": Range(0, 1, True, True),
    "gbas_sigma": Range(0, low_open=True),
    "gate_start_epoch": NON_NEGATIVE,
    "lr": NON_NEGATIVE,
    "gate_lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "momentum": FRACTION,
    "clip_grad": NON_NEGATIVE,
    "smoothing": FRACTION,
    "epochs": POSITIVE,
    "warmup_epochs": NON_NEGATIVE,
    "gate_warmup_epochs": NON_NEGATIVE,
    "batch_size": POSITIVE,
    "workers": NON_NEGATIVE,
    "max_steps": NON_NEGATIVE,
    "seed": NON_NEGATIVE,
    "entropy_threshold": Range(),
    "max_tokens_per_batch": NON_NEGATIVE,
    "aspect_ratios": Range(0, low_open=True),
}
# The flags that act only while the learned gate trains, and those that also build it: the entropy
# gate (--gate entropy) has no weights and no gate loss, so none of them means anything for it.
GATE_TRAINING = (
    "gate_loss",
    "gate_loss_input",
    "gate_lambda",
    "gate_target",
    "gbas_sigma",
    "gbas_ctr_init",
    "gate_start_epoch",
    "gate_lr",
    "gate_warmup_epochs",
)
LEARNED_GATE = ("gate_hidden", "gate_init_logit", "gate_mode", "gate_mode_epochs", *GATE_TRAINING)
ENTROPY_GATE = ("entropy_threshold", "entropy_bins", "entropy_binning")


def check_ranges(parser, args, ranges: dict) -> None:
    """``parser.error`` (exit 2, the flag named) for the first value outside its range."""
    for dest, allowed in ranges.items():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not allowed.holds(v):
                parser.error(f"--{dest.replace('_', '-')} must be {allowed}, got {v}")


def check_train_flags(parser, args) -> None:
    check_ranges(parser, args, TRAIN_RANGES)
    if args.digit_scale is not None and args.digit_scale[0] > args.digit_scale[1]:
        parser.error(f"--digit-scale LO HI needs LO <= HI, got {args.digit_scale[0]} {args.digit_scale[1]}")
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--model-kwargs is not valid JSON ({error.msg} at column {error.colno}): {args.model_kwargs}")
    if not isinstance(kwargs, dict):
        parser.error(f"--model-kwargs must be a JSON object of timm.create_model kwargs, got {args.model_kwargs}")
    check_model_flags(parser, args.model, kwargs)
    check_native_flags(parser, args)
    if args.pretrained is not None and not Path(args.pretrained).is_file():
        parser.error(f"--pretrained {args.pretrained}: no such file (a local timm weights file is expected)")
    check_init_from(parser, args)


def check_init_from(parser, args) -> None:
    """--init-from names a checkpoint folder or a shipped model, alone among the starting weights,
    for classification (segmentation's --init takes a classifier's whole backbone)."""
    source = getattr(args, "init_from", None)
    if source is None:
        return
    from msvit.io.checkpoint import shipped_names

    if args.task == "segmentation":
        parser.error("--init-from starts a classification run; segmentation starts from a classifier with --init")
    if args.pretrained is not None or args.hub_pretrained:
        parser.error("--init-from brings every weight: pass it or --pretrained / --hub-pretrained, not both")
    if not Path(source).is_dir() and source not in shipped_names():
        parser.error(
            f"--init-from {source}: no such folder, and no shipped model of that name "
            f"(shipped: {', '.join(shipped_names()) or 'none'})"
        )


def check_native_flags(parser, args) -> None:
    """--max-tokens-per-batch (native resolution, docs/design.md section 11) with what it can take:
    the gate loss sees every region of a batch as one row, so GBaS's per-position priors (one grid)
    have no meaning; images keep their own size, so no square crop; two scales, a ViT."""
    if not getattr(args, "max_tokens_per_batch", 0):
        if getattr(args, "aspect_ratios", None) is not None:
            parser.error("--aspect-ratios applies to native-resolution batches: add --max-tokens-per-batch T")
        return
    from msvit.models.swin import is_timm_swin

    refusals = [
        (getattr(args, "task", "classification") != "classification", "--task segmentation"),
        (
            args.gate_loss == "gbas" and args.gate == "learned",
            "--gate-loss gbas, the default (its per-position priors need one grid of regions): "
            "pass --gate-loss l0, l0-two-sided or bas",
        ),
        (args.crop != "none", f"--crop {args.crop} (images keep their own size and aspect ratio)"),
        (args.scales is not None and len(args.scales) > 2, "--scales with more than two sizes"),
        (is_timm_swin(args.model), f"--model {args.model} (a Swin takes one image size)"),
    ]
    for refused, what in refusals:
        if refused:
            parser.error(f"--max-tokens-per-batch (native resolution) does not take {what}")
    if args.aspect_ratios is not None and args.data != "cluttered-digits":
        parser.error("--aspect-ratios applies to the cluttered digits; folder images keep their own aspect ratio")


def check_model_flags(parser, name: str, kwargs: dict) -> None:
    """--model names a timm model of a family from_timm takes (another family would fail inside
    timm on the ViT kwargs the run passes, ``patch_size``, ``img_size``), and --model-kwargs has no
    quoted number. Names with a source (``hf-hub:...``) are left to timm."""
    from msvit.models.timm_names import check_model_name, misquoted_kwarg, timm_module

    if ":" not in name and timm_module(name) is None:
        parser.error(f"--model {name}: timm has no model of that name (timm.list_models('vit_*') lists its ViTs)")
    try:
        check_model_name(name)
    except TypeError as error:
        parser.error(f"--model {name}: {error}")
    misquoted = misquoted_kwarg(name, kwargs)
    if misquoted is not None:
        parser.error(f"--model-kwargs: {misquoted[0]!r} must be {misquoted[1]} for {name}, got a string")


def check_scale_flags(parser, args) -> None:
    """--scales: two or more patch sizes growing by one ratio, not both it and --coarse-patch, and
    one entropy threshold per scale boundary."""
    scales = args.scales
    if scales is not None:
        ratio = scales[1] // scales[0] if len(scales) > 1 else 0
        if len(scales) < 2 or ratio < 2 or any(v != scales[0] * ratio**s for s, v in enumerate(scales)):
            parser.error(
                f"--scales must list two or more patch sizes growing by one ratio >= 2 (e.g. 16 32 64), got {scales}"
            )
        if args.coarse_patch is not None:
            parser.error("--scales names every patch size, --coarse-patch the second: pass one of them")
    n_scales = 2 if scales is None else len(scales)
    thresholds = getattr(args, "entropy_threshold", None)
    if isinstance(thresholds, list) and len(thresholds) != n_scales - 1:
        parser.error(
            f"--entropy-threshold takes one value per scale boundary: {n_scales - 1} for {n_scales} scales, "
            f"got {len(thresholds)}"
        )
    if thresholds is None and n_scales > 3 and getattr(args, "gate", "learned") == "entropy":
        parser.error(f"--gate entropy with {n_scales} scales needs --entropy-threshold ({n_scales - 1} values)")
    from msvit.models.swin import is_timm_swin

    if n_scales > 2 and is_timm_swin(args.model):
        parser.error(f"--scales with more than two sizes is implemented for ViTs; --model {args.model} is a Swin")


def check_gate_flags(parser, args) -> None:
    """Refuse, by name, a typed flag of the other gate than ``--gate``'s: ignoring it would leave the
    user believing that it acted (a gate loss with the entropy gate, a threshold with the learned one)."""
    typed = set(getattr(args, "typed", ()))
    if args.gate == "learned":
        given = [k for k in ENTROPY_GATE if k in typed]
        if given:
            parser.error(
                f"--{given[0].replace('_', '-')} applies to --gate entropy; the learned gate has no entropy "
                "threshold or histogram"
            )
        return
    given = [k for k in LEARNED_GATE if k in typed]
    if given:
        parser.error(
            f"--{given[0].replace('_', '-')} acts on the learned gate; with --gate entropy nothing of the gate "
            "trains (it has no weights and no gate loss): leave it off"
        )
    from msvit.models.swin import is_timm_swin

    if is_timm_swin(args.model):
        parser.error(f"--gate entropy is implemented for ViTs; --model {args.model} (a Swin) takes --gate learned")
