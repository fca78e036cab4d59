"""The MSViT backbone of a run: its checkpoint config from the flags, and the model (fresh, or
from local or hub timm weights)."""

import json
from pathlib import Path

from msvit.io.checkpoint import build_model
from msvit.models.entropy_gate import APT_THREE_SCALE_THRESHOLDS, APT_THRESHOLD


def model_config(args, classes, bundle) -> dict:
    kwargs = {**json.loads(args.model_kwargs), "num_classes": len(classes), "img_size": args.image_size}
    return {
        "timm": {"name": args.model, "kwargs": kwargs},
        "msvit": {
            "coarse_patch_size": args.coarse_patch,
            **({"scales": list(args.scales)} if getattr(args, "scales", None) else {}),
            **gate_options(args, bundle),
        },
        "data": {
            "name": args.data,
            "image_size": list(bundle.image_size),
            "mean": list(bundle.mean),
            "std": list(bundle.std),
            "classes": [str(c) for c in classes],
            "digit_scale": args.digit_scale,
            "seed": args.seed,
        },
    }


def gate_options(args, bundle) -> dict:
    """``from_timm``'s gate keywords for ``--gate``. The entropy gate has no weights: these keywords
    are all a checkpoint keeps of it, with the data's normalisation, which it undoes to measure the
    entropy of the pixels themselves (``EntropyGate.from_timm_kwargs`` spells the same keys)."""
    if args.gate == "learned":
        return {"hidden": args.gate_hidden, "init_logit": args.gate_init_logit}
    return {
        "gate": "entropy",
        "entropy_thresholds": entropy_thresholds(args),
        "entropy_bins": args.entropy_bins,
        "entropy_binning": getattr(args, "entropy_binning", "apt"),
        "entropy_mean": list(bundle.mean),
        "entropy_std": list(bundle.std),
    }


def entropy_thresholds(args) -> list:
    """--entropy-threshold's values (a run recorded before it took several: one number), or APT's
    defaults for the run's number of scales."""
    given = args.entropy_threshold
    if given is None:
        scales = len(args.scales) if getattr(args, "scales", None) else 2
        return [APT_THRESHOLD] if scales == 2 else list(APT_THREE_SCALE_THRESHOLDS)
    return list(given) if isinstance(given, (list, tuple)) else [given]


def coarsest_patch(args) -> int:
    """The run's coarsest patch in pixels, before the model exists (native-resolution data is sized
    in whole coarsest patches): the last of --scales, --coarse-patch, or twice the timm model's
    patch, read from the model built on the meta device (no memory, no weights)."""
    if getattr(args, "scales", None):
        return int(args.scales[-1])
    if args.coarse_patch:
        return int(args.coarse_patch)
    import timm
    import torch

    with torch.device("meta"):
        vit = timm.create_model(args.model, pretrained=False, **json.loads(args.model_kwargs), img_size=args.image_size)
    return 2 * int(vit.patch_embed.patch_size[0])


def make_model(args, config):
    if getattr(args, "init_from", None):
        return init_from(build_model(config), args.init_from)
    if not (args.pretrained or args.hub_pretrained):
        return build_model(config)
    from msvit.models.timm_compat import from_timm

    kwargs = dict(config["timm"]["kwargs"], pretrained=True)
    if not args.pretrained:
        return from_timm(config["timm"]["name"], timm_kwargs=kwargs, **config["msvit"])
    kwargs["pretrained_cfg_overlay"] = {"file": str(args.pretrained)}
    try:
        return from_timm(config["timm"]["name"], timm_kwargs=kwargs, **config["msvit"])
    except Exception as error:  # timm and torch raise many types for an unreadable or foreign file
        raise SystemExit(
            f"msvit train: --pretrained {args.pretrained}: cannot load it as {config['timm']['name']} "
            f"weights ({type(error).__name__}: {str(error)[:300]})"
        ) from error


def init_from(model, source: str):
    """``--init-from``: ``model`` (built from this run's flags) with the weights of an MSViT
    checkpoint: a run or checkpoint folder, or a shipped name. Fine-tuning a saved model under other
    data options (native resolution, another gate loss) starts here. Every tensor must match by name
    and shape: a checkpoint of another architecture is refused naming the first difference."""
    from msvit.io import checkpoint

    try:
        if Path(source).is_dir():
            state = checkpoint.load_checkpoint(source).state_dict()
        else:
            state = checkpoint.load_pretrained(source).state_dict()
    except (ValueError, OSError) as error:
        raise SystemExit(f"msvit train: --init-from {source}: {error}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        first = (
            f"{wrong[0]} is {tuple(state[wrong[0]].shape)} there and {tuple(own[wrong[0]].shape)} here"
            if wrong
            else f"missing there: {missing[:3]}"
            if missing
            else f"not in this model: {unexpected[:3]}"
        )
        raise SystemExit(
            f"msvit train: --init-from {source}: its weights do not fit the model these flags build ({first}); "
            "pass the flags the checkpoint was trained with (--model, --model-kwargs, --coarse-patch, --scales, "
            "--gate-hidden, ...)"
        )
    model.load_state_dict(state)
    return model
