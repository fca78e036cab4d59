"""What ``from_timm`` reproduces exactly, module by module, and why it refuses the rest.

``from_timm`` replaces a timm model's forward with packed-token code (``msvit.models.layers.run_block``,
``MSViT``'s pooling, ``msvit.models.rope``) that reuses the model's modules. That is exact only for the
modules this code knows; a module of another class, even one with the same attribute names (timm's
``DiffAttention`` has ``qkv``, ``q_norm``, ``proj`` like ``Attention``), would run through the wrong
code and give silently different logits. So every module is checked against the tables below, and
anything else is refused naming the model, the module's path and class, and the missing feature.

The tables are by class name; a family becomes supported by moving its entry from a ``REFUSED_*``
table to the supported set, once the code that reproduces it exists.
"""

from typing import Dict, Iterable, Optional

from torch import nn

MODELS = {"VisionTransformer", "VisionTransformerDistilled", "Eva", "NaFlexVit"}
EXPECTED = "a timm VisionTransformer, Eva or NaFlexVit (ViT, DeiT, EVA02, DINOv3, ...)"  # what MODELS are
REFUSED_MODELS = {
    "Beit": "relative position bias",
    "VisionTransformerRelPos": "relative position bias",
    "VisionTransformerSAM": "windowed attention with relative position embeddings",
}
# Blocks and attentions by module and class: BEiT's own ``Block`` shares the name of ViT's.
BLOCKS = {
    "timm.models.vision_transformer.Block",
    "timm.models.eva.EvaBlock",
    "timm.models.deepseek_vit.DeepseekVitBlock",  # pre-norm like Eva's; no LayerScale (msvit.models.deepseek_tower)
}
REFUSED_BLOCKS = {
    "ResPostBlock": "res-post norm (the norm after each residual branch)",
    "EvaBlockPostNorm": "res-post norm (the norm after each residual branch)",
    "ParallelScalingBlock": "parallel blocks (attention and MLP branches side by side)",
    "ParallelThingsBlock": "parallel blocks (attention and MLP branches side by side)",
    "DiffParallelScalingBlock": "differential attention in parallel blocks",
    "RelPosBlock": "relative position bias",
    "ResPostRelPosBlock": "relative position bias and res-post norm",
}
ATTENTION = {"timm.layers.attention.Attention", "timm.models.eva.EvaAttention", "timm.layers.attention.AttentionRope"}
REFUSED_ATTENTION = {
    "DiffAttention": "differential attention (DiffAttention: the difference of two softmax maps)",
    "RelPosAttention": "relative position bias",
}
# Modules that act on each token on its own: on packed [T, C] rows they compute what they compute on
# [B, N, C]. Containers among them (the MLPs) are checked down to their leaves. Only timm's and
# torch's classes of these names count.
TOKENWISE = {
    "Mlp", "GluMlp", "SwiGLU", "SwiGLUPacked",  # MLPs
    "LayerNorm", "RmsNorm", "SimpleNorm", "LayerNormFp32", "RmsNormFp32", "SimpleNormFp32",  # norms
    "Linear", "Identity", "Dropout", "DropPath", "LayerScale",
    "GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "ReLU", "Tanh", "Sigmoid", "Hardswish",  # activations
}  # fmt: skip
REFUSED_PATCH_EMBED = {"HybridEmbed": "a conv stem (a CNN backbone before the patch embedding)"}
PATCH_EMBED = {"PatchEmbed"}
ROPE = {"RotaryEmbeddingCat", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMixed"}
REFUSED_ROPE = {"RotaryEmbeddingMRope": "multimodal RoPE (MRoPE)"}
POOLS = {"token", "avg", "map"}
ATTENTION_POOLS = {"AttentionPoolLatent"}  # global_pool="map" (msvit.models.attention_pool)
REFUSED_POOLS = {
    "avgmax": "avg+max pooling (global_pool='avgmax')",
    "max": "max pooling (global_pool='max')",
    "": "no pooling (global_pool='')",
}


class Unsupported(NotImplementedError):
    """A timm model ``from_timm`` cannot reproduce exactly."""


def model_name(model: nn.Module, name: Optional[str] = None) -> str:
    """The registry name (given, or timm's ``pretrained_cfg['architecture']``), else the class."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return name or cfg.get("architecture") or type(model).__name__


def refuse(model: str, path: str, module, feature: str) -> Unsupported:
    where = f"{path} ({type(module).__name__})"
    return Unsupported(
        f"from_timm cannot convert {model}: {where} uses {feature}, which MSViT does not reproduce exactly"
    )


def check_model(model: nn.Module, name: Optional[str] = None) -> None:
    """Raise ``Unsupported`` (a NotImplementedError) naming the first module ``from_timm`` cannot
    reproduce; TypeError when the model is not a timm ViT at all."""
    label = model_name(model, name)
    cls = type(model).__name__
    if cls in REFUSED_MODELS:
        raise refuse(label, "model", model, REFUSED_MODELS[cls])
    if cls not in MODELS:
        raise TypeError(f"from_timm expects {EXPECTED}, got {cls}")
    if cls != "NaFlexVit":  # NaFlexVit's ``embeds`` are checked by msvit.models.naflex.naflex_parts
        _check_class(label, "patch_embed", model.patch_embed, PATCH_EMBED, REFUSED_PATCH_EMBED)
        _check_patch_embed(label, model.patch_embed)
    if model.global_pool not in POOLS:
        feature = REFUSED_POOLS.get(model.global_pool, f"global_pool={model.global_pool!r}")
        raise refuse(label, "global_pool", model, feature)
    attn_pool = getattr(model, "attn_pool", None)
    if (attn_pool is not None) != (model.global_pool == "map"):
        raise refuse(label, "attn_pool", attn_pool or model, "an attention pool without global_pool='map'")
    if attn_pool is not None:  # its own options are checked by msvit.models.attention_pool
        _check_class(label, "attn_pool", attn_pool, ATTENTION_POOLS, {})
    rope = getattr(model, "rope", None)
    if rope is not None:
        _check_class(label, "rope", rope, ROPE, REFUSED_ROPE)
    for path in ("norm_pre", "norm", "fc_norm", "head_drop", "pos_drop", "head", "head_dist"):
        if hasattr(model, path):  # NaFlexVit keeps pos_drop in its embeds; head_dist: distilled DeiT
            _check_tokenwise(label, path, getattr(model, path))
    for i, block in enumerate(model.blocks):
        _check_block(label, f"blocks.{i}", block)


def _known_name(module) -> str:
    """The class name of a timm or torch class; the qualified name of any other class."""
    cls = type(module)
    return cls.__name__ if cls.__module__.startswith(("timm.", "torch.nn.")) else f"{cls.__module__}.{cls.__name__}"


def _check_class(label: str, path: str, module, supported: Iterable[str], refused: Dict[str, str]) -> None:
    name = _known_name(module)
    if name in refused:
        raise refuse(label, path, module, refused[name])
    if name not in supported and f"{type(module).__module__}.{name}" not in supported:
        raise refuse(label, path, module, f"a module class from_timm does not know ({name})")


def _check_tokenwise(label: str, path: str, module: nn.Module) -> None:
    for sub_path, sub in module.named_modules(prefix=path):
        if _known_name(sub) not in TOKENWISE:
            raise refuse(label, sub_path, sub, "a module not known to act on each token independently")


def _check_patch_embed(label: str, embed: nn.Module, path: str = "patch_embed") -> None:
    proj = embed.proj
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.kernel_size[0] != proj.kernel_size[1]:
        raise refuse(label, f"{path}.proj", proj, "a patch embedding that is not a square, non-overlapping Conv2d")
    if getattr(embed, "dynamic_img_pad", False):
        feature = "dynamic_img_pad (MSViT images must be multiples of the patch size)"
        raise refuse(label, path, embed, feature)
    _check_tokenwise(label, f"{path}.norm", getattr(embed, "norm", nn.Identity()))


def _check_block(label: str, path: str, block: nn.Module) -> None:
    _check_class(label, path, block, BLOCKS, REFUSED_BLOCKS)
    attn = block.attn
    _check_class(label, f"{path}.attn", attn, ATTENTION, REFUSED_ATTENTION)
    if getattr(attn, "num_kv_groups", 1) > 1:
        raise refuse(label, f"{path}.attn", attn, "grouped-query attention (fewer key/value heads than query heads)")
    for name, sub in attn.named_children():
        if name in (
            "qkv",
            "q_proj",
            "k_proj",
            "v_proj",
        ):  # msvit.models.timm_blocks.qkv_heads reads them as Linear weights
            _check_class(label, f"{path}.attn.{name}", sub, {"Linear"}, {})
        else:
            _check_tokenwise(label, f"{path}.attn.{name}", sub)
    for name, sub in block.named_children():
        if name != "attn":
            _check_tokenwise(label, f"{path}.{name}", sub)
