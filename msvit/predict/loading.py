"""The model ``msvit predict`` and ``msvit export`` run: a checkpoint (a run folder, a checkpoint
folder or a name shipped in ``msvit/pretrained``) or a timm model built by name with local weights
or none (nothing is downloaded: ``pretrained=False`` unless ``--pretrained FILE``); and the options
both commands take to run it (--budget, --device)."""

import math
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from msvit.io import checkpoint
from msvit.models.mixed_scale_vit import MSViT


def add_model_options(parser, default_checkpoint: str = "cluttered-digits") -> None:
    g = parser.add_argument_group("model (one of --checkpoint and --model)")
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR|NAME",
        help=f"a checkpoint or run folder (msvit train --out DIR), or the name of a model shipped in the "
        f"package ({', '.join(checkpoint.shipped_names()) or 'none'}); "
        f"default: {default_checkpoint} when --model is not given",
    )
    g.add_argument(
        "--model",
        default=None,
        metavar="TIMM_NAME",
        help="a timm ViT built by name (random weights unless --pretrained; nothing is downloaded)",
    )
    g.add_argument("--pretrained", default=None, metavar="FILE", help="--model: local timm weights file")
    g.add_argument(
        "--gate",
        choices=("learned", "entropy"),
        default=None,
        help="--model: the scale gate; default entropy (APT's training-free gate: an untrained "
        "learned gate decides nothing useful)",
    )
    g.add_argument(
        "--entropy-threshold",
        type=float,
        nargs="+",
        default=None,
        metavar="BITS",
        help="--model --gate entropy: one threshold per scale boundary, the finest first "
        "(default: APT's for the number of scales)",
    )
    g.add_argument(
        "--scales",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="--model: every patch size, finest first ('16 32 64': APT's three scales; default "
        "the patch size and twice it)",
    )


def add_run_options(parser, budget_help: str, device_help: str) -> None:
    """--budget and --device, as both commands take them (checked by ``check_run_options``)."""
    parser.add_argument(
        "--budget", type=float, default=None, help=f"fraction of the regions kept fine in every image, {budget_help}"
    )
    parser.add_argument("--device", default="cpu", help=device_help)


def check_run_options(parser, args) -> None:
    """--budget in [0, 1]; --device a device torch has here (``args.device`` becomes a torch.device)."""
    if args.budget is not None and not (math.isfinite(args.budget) and 0 <= args.budget <= 1):
        parser.error(f"--budget is a fraction of the regions in [0, 1], got {args.budget}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device (cpu, cuda or cuda:N)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); use --device cpu"
        )


def check_model_options(parser, args) -> None:
    """Refuse, by flag, a combination that would silently be ignored."""
    timm_only = [
        flag
        for flag, value in (
            ("--gate", args.gate),
            ("--pretrained", args.pretrained),
            ("--entropy-threshold", args.entropy_threshold),
            ("--scales", args.scales),
        )
        if value is not None
    ]
    if args.model is None:  # (--gate's default is None so that a typed one is seen here)
        if timm_only:
            parser.error(f"{timm_only[0]} builds a model with --model TIMM_NAME; a checkpoint brings its own")
        return
    if args.checkpoint is not None:
        parser.error("pass one of --checkpoint and --model, not both")
    from msvit.train.flag_checks import check_model_flags, check_scale_flags

    check_model_flags(parser, args.model, {})
    args.gate = args.gate or "entropy"
    args.coarse_patch = None  # check_scale_flags compares --scales with train's --coarse-patch
    check_scale_flags(parser, args)
    if args.entropy_threshold is not None and args.gate != "entropy":
        parser.error("--entropy-threshold applies to --gate entropy")
    if args.pretrained is not None and not Path(args.pretrained).is_file():
        parser.error(f"--pretrained {args.pretrained}: no such file (a local timm weights file is expected)")


def load_model(args, prog: str, device) -> MSViT:
    """The MSViT in eval mode on ``device``, with a ``pretrained_cfg`` holding its input size."""
    if args.model is not None:
        return timm_model(args, prog).to(device).eval()
    source = args.checkpoint or "cluttered-digits"
    try:
        if Path(source).is_dir():
            return checkpoint.load_checkpoint(source, device)
        if source in checkpoint.shipped_names():
            return checkpoint.load_pretrained(source, device)
    except (ValueError, OSError) as error:
        raise SystemExit(f"{prog}: --checkpoint {source}: {error}") from None
    raise SystemExit(
        f"{prog}: --checkpoint {source}: no such folder, and no shipped model of that name "
        f"(shipped: {', '.join(checkpoint.shipped_names()) or 'none'})"
    )


def timm_model(args, prog: str) -> MSViT:
    from msvit.models.entropy_gate import APT_THREE_SCALE_THRESHOLDS, APT_THRESHOLD
    from msvit.models.timm_compat import from_timm

    kwargs = {"pretrained": args.pretrained is not None}
    if args.pretrained is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(args.pretrained)}
    options = {"scales": list(args.scales)} if args.scales else {}
    if args.gate == "entropy":
        n_scales = len(args.scales) if args.scales else 2
        default = [APT_THRESHOLD] if n_scales == 2 else list(APT_THREE_SCALE_THRESHOLDS)
        options.update(gate="entropy", entropy_thresholds=args.entropy_threshold or default)
    try:
        model = from_timm(args.model, timm_kwargs=kwargs, **options)
    except Exception as error:  # timm and torch raise many types for an unreadable or foreign file
        what = (
            f"--pretrained {args.pretrained}: cannot load it as {args.model} weights"
            if args.pretrained
            else (f"--model {args.model}: cannot build it")
        )
        raise SystemExit(f"{prog}: {what} ({type(error).__name__}: {str(error)[:300]})") from None
    names = imagenet_names(model.num_classes)
    if names is not None:  # timm's pretrained_cfg has no label names; its ImageNet heads' are in timm.data
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "label_names": names}
    return model


def imagenet_names(num_classes: int) -> Optional[List[str]]:
    """timm's class descriptions of the ImageNet subset with ``num_classes`` classes, or None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(num_classes)]


def label_names(model: nn.Module) -> Optional[List[str]]:
    """Class names from ``pretrained_cfg["label_names"]`` (a checkpoint's classes, timm's ImageNet
    names), or None: indices are written then."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return list(names) if names else None
