"""Build a ``MixedScaleSwin`` from a timm ``SwinTransformer`` (Swin v1, any depths/widths/window).

The conv patch embedding becomes a linear layer in (C, p, p) order; stages, norm and head are
copied (training the mixed-scale model never changes the timm model). Swin v2 (cosine attention,
continuous position bias, post-norm) is not supported. docs/design.md section 8.
"""

import copy
from typing import Optional, Union

from torch import nn

from msvit.models.gate import MixedScaleGate
from msvit.models.swin.blocks import check_no_padding
from msvit.models.swin.model import MixedScaleSwin
from msvit.models.swin.tokenizer import SwinTokenizer


def is_timm_swin(model_or_name) -> bool:
    """True for a timm Swin model or model name (v1 or v2: v2 is then refused by name)."""
    if isinstance(model_or_name, str):
        from timm.models import is_model, model_entrypoint

        return is_model(model_or_name) and model_entrypoint(model_or_name).__module__.startswith(
            "timm.models.swin_transformer"
        )
    return type(model_or_name).__module__.startswith("timm.models.swin_transformer")


def _timm_swin(model_or_name, timm_kwargs: Optional[dict]):
    import timm
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model_or_name, str):
        model = timm.create_model(model_or_name, **(timm_kwargs or {}))
    else:
        if timm_kwargs:
            raise ValueError("timm_kwargs only apply when from_timm is given a model name")
        model = model_or_name
    if not isinstance(model, SwinTransformer):
        raise NotImplementedError(
            f"mixed-scale Swin supports timm's SwinTransformer (Swin v1), got {type(model).__name__}"
        )
    if model.global_pool != "avg":
        raise NotImplementedError(f"global_pool={model.global_pool!r} is not supported; use 'avg'")
    return model


def entry_stage(patch: int, coarse: int, stages: int) -> int:
    """The stage whose token scale p * 2**stage equals S_c (Appendix E.3: s_l = S_c)."""
    for stage in range(1, stages):
        if patch * 2**stage == coarse:
            return stage
    scales = ", ".join(str(patch * 2**s) for s in range(1, stages))
    raise ValueError(f"coarse_patch_size must equal the token scale of a later stage ({scales}), got {coarse}")


def swin_from_timm(
    model_or_name: Union[str, nn.Module],
    *,
    coarse_patch_size: Optional[int] = None,
    kernels: str = "auto",
    attention_backend: str = "auto",
    timm_kwargs: Optional[dict] = None,
    **gate_kwargs,
) -> MixedScaleSwin:
    """MixedScaleSwin with the weights of a timm Swin v1.

    coarse_patch_size: S_c, the token scale of one of the stages after the first (default: the
    last stage's, 32 for Swin-T/S/B/L at patch 4). attention_backend: "auto" or "reference"; the
    windows run a torch SDPA path (``msvit.models.swin.attention``). **gate_kwargs: ``MixedScaleGate``
    options.
    """
    if attention_backend not in ("auto", "reference"):
        raise ValueError(
            f"attention_backend {attention_backend!r}: mixed-scale Swin's window attention has one "
            "torch path (relative position bias + shift masks); use 'auto' or 'reference'"
        )
    model = _timm_swin(model_or_name, timm_kwargs)
    proj = model.patch_embed.proj
    patch = proj.kernel_size[0]
    if proj.kernel_size != proj.stride or proj.kernel_size[0] != proj.kernel_size[1]:
        raise NotImplementedError("the patch embedding must be a square, non-overlapping Conv2d")
    stages = len(model.layers)
    coarse = patch * 2 ** (stages - 1) if coarse_patch_size is None else int(coarse_patch_size)
    entry = entry_stage(patch, coarse, stages)
    img_size = tuple(model.patch_embed.img_size)
    if img_size[0] % coarse or img_size[1] % coarse:
        raise ValueError(f"image size {img_size} must be a multiple of the coarse patch size {coarse}")
    for s in range(entry):
        check_no_padding(model.layers[s].blocks, (img_size[0] // (patch * 2**s), img_size[1] // (patch * 2**s)), s)

    embed = nn.Linear(proj.in_channels * patch * patch, proj.out_channels, bias=proj.bias is not None)
    embed = embed.to(device=proj.weight.device, dtype=proj.weight.dtype)
    embed.weight.data.copy_(proj.weight.detach().reshape(proj.out_channels, -1))
    if proj.bias is not None:
        embed.bias.data.copy_(proj.bias.detach())
    width = model.layers[entry].downsample.reduction.out_features
    coarse_embed = nn.Linear(proj.in_channels * coarse * coarse, width).to(proj.weight.device, proj.weight.dtype)
    nn.init.trunc_normal_(coarse_embed.weight, std=0.02)  # timm's init of Swin's linear layers
    nn.init.zeros_(coarse_embed.bias)
    tokenizer = SwinTokenizer(embed, copy.deepcopy(model.patch_embed.norm), coarse_embed, patch, coarse)
    coarse_grid = (img_size[0] // coarse, img_size[1] // coarse)
    gate = MixedScaleGate(coarse, coarse_grid, in_chans=proj.in_channels, **gate_kwargs)
    gate = gate.to(device=proj.weight.device, dtype=proj.weight.dtype)
    swin = MixedScaleSwin(
        tokenizer,
        gate,
        copy.deepcopy(model.layers),
        copy.deepcopy(model.norm),
        copy.deepcopy(model.head),
        entry=entry,
        img_size=img_size,
        in_chans=proj.in_channels,
        kernels=kernels,
    )
    if getattr(model, "pretrained_cfg", None):
        swin.pretrained_cfg = {
            **model.pretrained_cfg,
            "input_size": (proj.in_channels, *img_size),
            "num_classes": model.num_classes,
        }
    return swin.train(model.training)
