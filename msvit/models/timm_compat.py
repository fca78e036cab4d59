"""Build an MSViT from a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, SigLIP's ``map``
pooling, with or without cls, LayerScale, register tokens, any image size), ``Eva`` (EVA02, DINOv3,
PE, RoPE-ViT: rotary embeddings, SwiGLU) or ``NaFlexVit``; a timm Swin v1 goes to
``msvit.models.swin``.

Every module is checked first (``msvit.models.timm_support``): a model with a module the packed code
does not reproduce exactly is refused, naming the module and the missing feature. The conv patch
embedding becomes the shared linear embedding (``weight.reshape(d, C*p*p)``, the (C, p, p)
flattening order of ``msvit_kernels.reference.patchify``); blocks, norms and head are copied, so
training the MSViT never changes the timm model it came from.
"""

import copy
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from msvit.data.sample_images import IMAGENET_MEAN, IMAGENET_STD
from msvit.models.aggregation import AGGREGATIONS, ZeroConvAggregation
from msvit.models.attention_pool import convert_attention_pool
from msvit.models.build_recipe import record_recipe
from msvit.models.checks import check_choice
from msvit.models.entropy_gate import APT_THREE_SCALE_THRESHOLDS, APT_THRESHOLD, EntropyGate
from msvit.models.gate import MixedScaleGate
from msvit.models.mixed_scale_vit import MSViT
from msvit.models.naflex import is_naflexvit, naflex_parts
from msvit.models.rope import packed_rope
from msvit.models.swin import is_timm_swin, swin_from_timm
from msvit.models.timm_names import check_model_name, is_vlm_tower
from msvit.models.timm_parts import EmbedParts, conv_as_linear
from msvit.models.timm_support import check_model
from msvit.models.tokenizer import COARSE_POS, MixedScaleTokenizer
from msvit.models.vlm_families import build_tower, tower_parts
from msvit_kernels.entropy_kernel import DEFAULT_BINS, check_entropy_args
from msvit_kernels.reference import COARSE_PIXELS


def _timm_model(model_or_name, timm_kwargs: Optional[dict]) -> nn.Module:
    import timm

    if isinstance(model_or_name, str):
        check_model_name(model_or_name)  # before timm sees ViT kwargs another family does not take
        model = timm.create_model(model_or_name, **(timm_kwargs or {}))
    else:
        if timm_kwargs:
            raise ValueError("timm_kwargs only apply when from_timm is given a model name")
        model = model_or_name
    check_model(model, model_or_name if isinstance(model_or_name, str) else None)
    return model


def _vit_parts(model: nn.Module) -> EmbedParts:
    """The embedding of a ``VisionTransformer`` or ``Eva`` (checked by ``check_model``)."""
    embed = conv_as_linear(model.patch_embed.proj)
    # timm's prefix order: cls, then a distilled DeiT's dist token, then registers
    prefix = [t for t in (model.cls_token, getattr(model, "dist_token", None), model.reg_token) if t is not None]
    return EmbedParts(
        embed,
        model.patch_embed.proj.kernel_size[0],
        tuple(model.patch_embed.grid_size),
        model.pos_embed.detach().clone() if model.pos_embed is not None else None,
        torch.cat(prefix, 1).detach().clone() if prefix else None,
        model.no_embed_class,
        copy.deepcopy(getattr(model.patch_embed, "norm", None)),
        nn.Sequential(copy.deepcopy(model.pos_drop), copy.deepcopy(model.norm_pre)),
    )


def from_timm(
    model_or_name: Union[str, nn.Module],
    *,
    coarse_patch_size: Optional[int] = None,
    kernels: str = "auto",
    attention_backend: str = "auto",
    timm_kwargs: Optional[dict] = None,
    img_size=None,
    gate: str = "learned",
    aggregate: str = "shared",
    scales: Optional[Sequence[int]] = None,
    coarse_pos: str = "bilinear",
    coarse_pixels: str = "area",
    **gate_kwargs,
) -> MSViT:
    """MSViT with the weights of a timm ViT.

    Args:
        model_or_name: a timm ``VisionTransformer``, ``Eva``, ``NaFlexVit`` or Swin v1, or its name (built with
            ``timm.create_model(name, **timm_kwargs)``; nothing is downloaded unless you pass
            ``pretrained=True`` in ``timm_kwargs``); or a VLM tower (``qwen3_vit_*``, ``deepseek_vit_*``,
            ``gemma4_vit_*``), which gives a ``msvit.models.vlm_tower.VLMTower`` whose default coarse
            patch is its projector's window (docs/design.md section 17).
        img_size: NaFlexVit only: the image size (int or (h, w)) the model is built for (the gate's
            grid; every image size takes timm's own position resampling, ``msvit.models.naflex``). Default:
            ``timm_kwargs["img_size"]``, else the model's default or pretrained_cfg input size.
            Gemma 4: its nominal image size (default: the pretrained_cfg's).
        coarse_patch_size: S_c, an integer multiple of the model's patch size (default 2x).
        scales: every patch size, finest first, the finest being the model's patch size and each
            the previous times one integer ratio r >= 2: ``(16, 32)`` is the default two-scale
            model, ``(16, 32, 64)`` APT's three (a quadtree: docs/design.md section 10).
        kernels, attention_backend: see ``MSViT``.
        gate: ``"learned"`` (the paper's ``MixedScaleGate``, to be trained) or ``"entropy"`` (APT's
            training-free ``EntropyGate``: fine where a region's grey-level entropy exceeds a threshold).
            With more than two scales, one such gate per splittable scale (``msvit.models.tree_gate``).
        aggregate: how a coarse token is embedded: ``"shared"`` (the shared embedding of its
            area-downsampled patch, Eq. 4-5) or ``"zero_conv"`` (APT's: plus a zero-initialised
            linear layer over an r x r stride-r conv of its sub-patch embeddings; equal to "shared"
            until trained; the tokenizer then takes the torch path, ``msvit.models.aggregation``).
            With more scales, APT's way: the same conv once per scale step.
        coarse_pos: the position table of every coarser scale, from the fine one: ``"bilinear"``
            (default: ``align_corners=False``, no antialias; the all-coarse model then equals timm
            on the pooled image) or ``"apt"`` (APT's code: timm's ``resample_abs_pos_embed``,
            bicubic and antialiased). A model with no absolute position table (RoPE only) is refused.
        coarse_pixels: how a coarser patch comes down to the fine patch size before the shared
            embedding: ``"area"`` (default, Eq. 4-5: the mean of every r**s x r**s block; the fused
            pack kernel computes it) or ``"apt"`` (APT's ``construct_patch_groups``: bilinear
            ``F.interpolate`` by 1 / r**s, no antialias: for 32 px tokens the 2x2 mean up to rounding,
            for 64 px ones the mean of each 4x4 block's centre 2x2; the tokenizer then takes the
            torch path, docs/design.md section 15).
        **gate_kwargs: the learned gate's options (hidden, init_logit, temperature), or the entropy
            gate's: ``entropy_thresholds`` (one per scale boundary, the finest boundary first as APT
            orders them; default ``(5.5,)`` for two scales and APT's ``(6.0, 4.0)`` for three: 6.0
            bits for the 2p px nodes, 4.0 for the 4p px ones),
            ``entropy_bins`` (512), ``entropy_binning`` (``"apt"``: APT's 8-bit levels, histc bins
            and ``H >= tau``; ``"continuous"``: the rule before, ``msvit_kernels.entropy_kernel``),
            ``entropy_mean`` / ``entropy_std`` (the images' normalisation, std > 0; default: the
            timm model's ``pretrained_cfg``, else ImageNet's; a 1-channel model takes a default
            of equal values, else is told to pass them).

    The MSViT gets the timm model's ``pretrained_cfg`` (see ``input_cfg``), when it has one.
    RoPE models (``Eva`` with a ``rope``): fine tokens are rotated at timm's own grid positions,
    coarse tokens at the centre of the fine cells they cover (``msvit.models.rope``, whose docstring
    says where the all-coarse model equals timm on the pooled image).
    """
    check_choice("gate", gate, GATES)
    check_choice("aggregate", aggregate, AGGREGATIONS)
    check_choice("coarse_pos", coarse_pos, COARSE_POS)
    check_choice("coarse_pixels", coarse_pixels, COARSE_PIXELS)
    options = dict(
        coarse_patch_size=coarse_patch_size,
        img_size=img_size,
        gate=gate,
        aggregate=aggregate,
        scales=scales,
        coarse_pos=coarse_pos,
        coarse_pixels=coarse_pixels,
    )
    built = _from_timm(model_or_name, kernels, attention_backend, timm_kwargs, options, gate_kwargs)
    record_recipe(built, model_or_name, timm_kwargs, {**options, **gate_kwargs})
    return built


def check_coarse_pos(tokenizer: MixedScaleTokenizer, coarse_pos: str, name: str) -> None:
    """A coarse_pos other than the default resamples an absolute position table: refused, not
    ignored, for a model that has none (RoPE only)."""
    if coarse_pos != "bilinear" and tokenizer.pos_embed is None and tokenizer.grid_positions is None:
        raise ValueError(
            f"coarse_pos={coarse_pos!r} resamples the absolute position table, and {name} has none "
            "(its positions are RoPE only); leave coarse_pos at 'bilinear'"
        )


def model_name_of(model_or_name, model: nn.Module) -> str:
    return model_or_name if isinstance(model_or_name, str) else type(model).__name__


def _from_timm(model_or_name, kernels, attention_backend, timm_kwargs, options, gate_kwargs) -> nn.Module:
    """``from_timm`` after its choices are checked."""
    coarse_patch_size, img_size, gate = options["coarse_patch_size"], options["img_size"], options["gate"]
    aggregate, scales, coarse_pos = options["aggregate"], options["scales"], options["coarse_pos"]
    if is_timm_swin(model_or_name):  # Swin v1: coarse tokens skip the early stages (docs/design.md section 8)
        if scales is not None and len(scales) != 2:
            raise NotImplementedError("a mixed-scale Swin has two scales; more are implemented for ViT models")
        if aggregate != "shared":
            raise NotImplementedError(
                "aggregate='zero_conv' is implemented for ViT models; a Swin embeds coarse regions itself"
            )
        if gate != "learned":
            raise NotImplementedError(f"gate={gate!r} is implemented for ViT models; a Swin takes gate='learned'")
        if coarse_pos != "bilinear":
            raise NotImplementedError("coarse_pos applies to ViT models; a Swin has no absolute position table")
        if options["coarse_pixels"] != "area":
            raise NotImplementedError("coarse_pixels applies to ViT models; a Swin embeds coarse regions itself")
        if img_size is not None:
            raise ValueError("img_size applies to a NaFlexVit only; a Swin's image size is the one it was built for")
        return swin_from_timm(
            model_or_name,
            coarse_patch_size=coarse_patch_size,
            kernels=kernels,
            attention_backend=attention_backend,
            timm_kwargs=timm_kwargs,
            **gate_kwargs,
        )
    if is_vlm_tower(model_or_name):  # Qwen3-VL, DeepSeek, Gemma 4 towers (docs/design.md section 17)
        model, parts = tower_parts(model_or_name, timm_kwargs, img_size)
        n_scales, ratio = scale_layout(parts.fine, coarse_patch_size, scales, parts.ratio)
        cfg = getattr(model, "pretrained_cfg", None)
        scale_gate = build_gate(gate, parts.embed, parts.fine, ratio, n_scales, parts.grid, cfg, gate_kwargs)
        aggregation = None if aggregate == "shared" else _aggregation(parts.embed.weight, ratio)
        positions = (coarse_pos, options["coarse_pixels"])
        tower = build_tower(parts, scale_gate, ratio, n_scales, aggregation, kernels, attention_backend, *positions)
        check_coarse_pos(tower.tokenizer, coarse_pos, model_name_of(model_or_name, model))
        if cfg:
            tower.pretrained_cfg = input_cfg(model, parts.fine, parts.grid)
        return tower.train(model.training)
    model = _timm_model(model_or_name, timm_kwargs)
    if is_naflexvit(model):
        parts = naflex_parts(model, img_size if img_size is not None else (timm_kwargs or {}).get("img_size"))
    elif img_size is not None:
        raise ValueError("img_size applies to a NaFlexVit only; a ViT's image size is its patch_embed.img_size")
    else:
        parts = _vit_parts(model)
    fine = parts.fine
    n_scales, ratio = scale_layout(fine, coarse_patch_size, scales)
    grid = parts.grid
    _warn_unsupported_regularisers(model)

    weight = parts.embed.weight
    in_chans = weight.shape[1] // (fine * fine)
    cfg = getattr(model, "pretrained_cfg", None)
    scale_gate = build_gate(gate, parts.embed, fine, ratio, n_scales, grid, cfg, gate_kwargs)
    # the aggregation's random conv init comes after the gate's: both options draw the same gate
    tokenizer = MixedScaleTokenizer(
        parts.embed,
        fine,
        ratio,
        grid,
        pos_embed=nn.Parameter(parts.pos_embed) if parts.pos_embed is not None else None,
        prefix_tokens=nn.Parameter(parts.prefix) if parts.prefix is not None else None,
        no_embed_class=parts.no_embed_class,
        embed_norm=parts.embed_norm,
        aggregation=None if aggregate == "shared" else _aggregation(weight, ratio),
        scales=n_scales,
        coarse_pos=coarse_pos,
        grid_positions=parts.grid_positions,
        coarse_pixels=options["coarse_pixels"],
    )
    check_coarse_pos(tokenizer, coarse_pos, model_name_of(model_or_name, model))
    msvit = MSViT(
        tokenizer,
        scale_gate,
        nn.ModuleList(copy.deepcopy(list(model.blocks))),
        copy.deepcopy(model.norm),
        copy.deepcopy(model.head),
        fc_norm=copy.deepcopy(model.fc_norm),
        head_drop=copy.deepcopy(model.head_drop),
        norm_pre=parts.norm_pre,
        global_pool=model.global_pool,
        pool_include_prefix=getattr(
            model, "pool_include_prefix", model.global_pool == "map"
        ),  # Eva: map pools all tokens
        attn_pool=convert_attention_pool(getattr(model, "attn_pool", None)),
        head_dist=copy.deepcopy(getattr(model, "head_dist", None)),
        in_chans=in_chans,
        kernels=kernels,
        attention_backend=attention_backend,
        rope=packed_rope(model, ratio, n_scales),
    )
    msvit.distilled_training = getattr(model, "distilled_training", False)
    if getattr(model, "pretrained_cfg", None):
        msvit.pretrained_cfg = input_cfg(model, fine, grid)
    return msvit.train(model.training)


def scale_layout(fine: int, coarse_patch_size, scales, default_ratio: int = 2) -> Tuple[int, int]:
    """(number of scales, ratio between scales) from ``from_timm``'s ``coarse_patch_size`` and ``scales``."""
    n_scales, coarse_patch_size = _scales(scales, fine, coarse_patch_size)
    coarse = default_ratio * fine if coarse_patch_size is None else int(coarse_patch_size)
    if coarse < fine or coarse % fine:
        raise ValueError(
            f"coarse_patch_size must be an integer multiple of the patch size {fine}, got {coarse_patch_size}"
        )
    return n_scales, coarse // fine


def build_gate(kind, embed: nn.Linear, fine, ratio, n_scales, grid, pretrained_cfg, options) -> nn.Module:
    """The scale gate ``from_timm(gate=kind, **options)`` builds, on the embedding's device and dtype."""
    weight = embed.weight
    in_chans = weight.shape[1] // (fine * fine)
    if n_scales > 2:
        scale_gate = _tree_gate(kind, fine, ratio, n_scales, grid, in_chans, pretrained_cfg, options)
    else:
        coarse_grid = (max(1, grid[0] // ratio), max(1, grid[1] // ratio))
        scale_gate = _gate(kind, fine * ratio, coarse_grid, in_chans, pretrained_cfg, options)
    return scale_gate.to(device=weight.device, dtype=weight.dtype)


def _aggregation(weight: torch.Tensor, ratio: int) -> ZeroConvAggregation:
    """APT's aggregation for an embedding of ``weight [d, C*p*p]``, on its device and dtype."""
    return ZeroConvAggregation(weight.shape[0], ratio).to(device=weight.device, dtype=weight.dtype)


GATES = ("learned", "entropy")
ENTROPY_OPTIONS = {"entropy_thresholds", "entropy_bins", "entropy_binning", "entropy_mean", "entropy_std"}


def _gate(kind: str, coarse: int, grid, in_chans: int, pretrained_cfg: Optional[dict], options: dict) -> nn.Module:
    """The scale gate ``from_timm(gate=kind, **options)`` asks for; options of the other gate are refused."""
    _check_gate_options(kind, options)
    if kind == "learned":
        return MixedScaleGate(coarse, grid, in_chans=in_chans, **options)
    return EntropyGate(
        coarse,
        grid,
        options.get("entropy_thresholds", (APT_THRESHOLD,)),
        in_chans=in_chans,
        **_entropy_options(options, pretrained_cfg, in_chans),
    )


def _entropy_options(options: dict, pretrained_cfg: Optional[dict], in_chans: int) -> dict:
    """The entropy gate's mean, std, bins and binning from ``from_timm``'s ``entropy_*`` keywords,
    checked under those names. Default normalisation: the timm model's ``pretrained_cfg``, else
    ImageNet's; a 1-channel model whose default lists 3 equal values (timm's (0.5, 0.5, 0.5))
    takes that value, and 3 different ones are refused with what to pass (no channel of an RGB
    normalisation is the grey one's)."""
    cfg = pretrained_cfg or {}
    found = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        given = options.get(f"entropy_{key}")
        if given is not None:
            found[key] = given
            continue
        values = tuple(cfg.get(key) or default)
        if in_chans == 1 and len(values) == 3:
            if len(set(values)) != 1:
                raise ValueError(
                    f"a 1-channel model's entropy gate needs entropy_mean and entropy_std with one value each, "
                    f"the normalisation of its grey images (e.g. entropy_mean=(0.5,), entropy_std=(0.5,)); "
                    f"the default {key} {values} is an RGB one"
                )
            values = values[:1]
        found[key] = values
    bins, binning = options.get("entropy_bins", DEFAULT_BINS), options.get("entropy_binning", "apt")
    names = ("entropy_mean", "entropy_std", "entropy_bins", "entropy_binning")
    probe = torch.empty(0, in_chans, 1, 1) if in_chans in (1, 3) else None
    if probe is not None:
        check_entropy_args(probe, 1, found["mean"], found["std"], bins, binning, names)
    return {**found, "bins": bins, "binning": binning}


def _scales(scales, fine: int, coarse_patch_size) -> Tuple[int, Optional[int]]:
    """(number of scales, S_c) from ``from_timm``'s ``scales`` and ``coarse_patch_size``."""
    if scales is None:
        return 2, coarse_patch_size
    sizes = tuple(scales) if isinstance(scales, (tuple, list)) else None
    if not sizes or len(sizes) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        raise ValueError(f"scales must list two or more patch sizes, finest first, e.g. (16, 32, 64); got {scales!r}")
    ratio = sizes[1] // sizes[0] if sizes[0] > 0 else 0
    if sizes[0] != fine or ratio < 2 or any(v != fine * ratio**s for s, v in enumerate(sizes)):
        raise ValueError(
            f"scales must start at the model's patch size {fine} and grow by one integer ratio >= 2 "
            f"(e.g. {(fine, 2 * fine, 4 * fine)}), got {sizes}"
        )
    if coarse_patch_size is not None and coarse_patch_size != sizes[1]:
        raise ValueError(f"coarse_patch_size={coarse_patch_size} contradicts scales={sizes}: pass one of them")
    return len(sizes), sizes[1]


def _tree_gate(kind, fine, ratio, scales, grid, in_chans, pretrained_cfg, options) -> nn.Module:
    """``_gate`` for more than two scales: one gate per splittable scale (``msvit.models.tree_gate``)."""
    from msvit.models.tree_gate import TreeGate

    _check_gate_options(kind, options)
    if kind == "learned":
        return TreeGate.learned(fine, ratio, scales, grid, in_chans=in_chans, **options)
    thresholds = options.get("entropy_thresholds")
    if thresholds is None:
        if scales != 3:
            raise ValueError(f"gate='entropy' with {scales} scales needs entropy_thresholds: {scales - 1} values")
        thresholds = APT_THREE_SCALE_THRESHOLDS
    return TreeGate.entropy(
        fine, ratio, scales, grid, thresholds, in_chans=in_chans, **_entropy_options(options, pretrained_cfg, in_chans)
    )


def _check_gate_options(kind: str, options: dict) -> None:
    """Refuse the options of the other gate kind, by name."""
    entropy = set(options) & ENTROPY_OPTIONS
    if kind == "learned" and entropy:
        raise TypeError(f"{', '.join(sorted(entropy))} apply to gate='entropy', not to the learned gate")
    learned = sorted(set(options) - ENTROPY_OPTIONS)
    if kind == "entropy" and learned:
        raise TypeError(
            f"gate='entropy' takes {', '.join(sorted(ENTROPY_OPTIONS))}; {', '.join(learned)} are not its options"
        )


def input_cfg(model, patch: int, grid: Optional[Tuple[int, int]] = None) -> dict:
    """The timm model's ``pretrained_cfg`` (mean, std, crop, ...) with the input size and class
    count of the model itself: timm keeps those of the architecture's name when ``img_size`` or
    ``num_classes`` are overridden, and ``msvit.eval_transform`` would then resize to the wrong size."""
    h, w = model.patch_embed.grid_size if grid is None else grid
    return {
        **model.pretrained_cfg,
        "input_size": (getattr(model, "in_chans", 3), h * patch, w * patch),
        "num_classes": model.num_classes,
    }


def _warn_unsupported_regularisers(model) -> None:
    attn_drop = max((b.attn.attn_drop.p for b in model.blocks), default=0.0)
    if attn_drop > 0:
        warnings.warn(
            f"attention dropout ({attn_drop}) is not applied by packed attention; it is ignored", stacklevel=3
        )
    patch_drop = getattr(model.patch_drop, "prob", 0.0)
    if patch_drop > 0:
        warnings.warn(
            f"patch dropout ({patch_drop}) is not supported on mixed-scale tokens; it is ignored", stacklevel=3
        )
