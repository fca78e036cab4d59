"""The MSViT backbone of a run: its checkpoint config from the flags, and the model (fresh, or
from local or hub timm weights)."""

import json

from msvit.io.checkpoint import build_model


def model_config(args, classes, bundle) -> dict:
    kwargs = {**json.loads(args.model_kwargs), "num_classes": len(classes), "img_size": args.image_size}
    msvit_kwargs = {
        "coarse_patch_size": args.coarse_patch,
        "hidden": args.gate_hidden,
        "init_logit": args.gate_init_logit,
    }
    return {
        "timm": {"name": args.model, "kwargs": kwargs},
        "msvit": msvit_kwargs,
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


def make_model(args, config):
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
