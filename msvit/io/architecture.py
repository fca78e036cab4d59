"""The architecture a checkpoint's weights belong to, described from the built model.

Tensor shapes do not pin an architecture down: the number of heads, the norms' epsilon, LayerScale,
the pooling or the gate temperature change the outputs of the same tensors. ``describe`` records
those choices (as JSON values) for ``config.json``; ``differences`` names what a rebuilt model no
longer shares with the record, so an edited or mismatched config is refused instead of loading
weights into the wrong network. Dropout rates are left out: they do not change evaluation outputs.
"""

import json
from typing import List, Optional

from torch import nn


def layer(module: Optional[nn.Module]):
    """A norm or activation as a short string (None for Identity or absent): type and options."""
    if module is None or isinstance(module, (nn.Identity, nn.Dropout)):
        return None
    if isinstance(module, nn.Sequential):
        parts = [layer(m) for m in module]
        parts = [p for p in parts if p is not None]
        return parts or None
    options = [f"{k}={getattr(module, k)}" for k in ("eps", "approximate", "elementwise_affine") if hasattr(module, k)]
    return f"{type(module).__name__}({', '.join(options)})"


def block(b: nn.Module) -> dict:
    """The output-relevant choices of one timm pre-norm Block (None where this timm has no such part)."""
    attn, mlp = b.attn, b.mlp
    qkv = getattr(attn, "qkv", None)
    return {
        "num_heads": getattr(attn, "num_heads", None),
        "head_dim": getattr(attn, "head_dim", None),
        "scale": getattr(attn, "scale", None),
        # EvaAttention keeps its q / v biases outside the (bias-free) qkv Linear
        "qkv_bias": None if qkv is None else qkv.bias is not None or getattr(attn, "q_bias", None) is not None,
        "q_norm": layer(getattr(attn, "q_norm", None)),
        "k_norm": layer(getattr(attn, "k_norm", None)),
        "attn_norm": layer(getattr(attn, "norm", None)),
        "norm1": layer(b.norm1),
        "norm2": layer(b.norm2),
        "layer_scale": type(b.ls1).__name__ != "Identity"
        if hasattr(b, "ls1")
        else getattr(b, "gamma_1", None) is not None,
        "mlp": type(mlp).__name__,
        "mlp_hidden": getattr(getattr(mlp, "fc1", None), "out_features", None),
        "act": layer(getattr(mlp, "act", None)),
        "mlp_norm": layer(getattr(mlp, "norm", None)),
    }


def blocks(modules) -> dict:
    """Per-field summary of a block stack: one value where all blocks agree, else the list."""
    described = [block(b) for b in modules]
    if not described:
        return {}
    return {
        k: described[0][k] if all(d[k] == described[0][k] for d in described) else [d[k] for d in described]
        for k in described[0]
    }


def msvit(model) -> dict:
    tok, gate = model.tokenizer, model.gate
    head = model.head
    return {
        "embed_dim": tok.embed.out_features,
        "in_chans": model.in_chans,
        "patch_size": tok.fine_patch,
        "coarse_patch_size": tok.fine_patch * tok.ratio,
        "grid": list(tok.grid),
        "num_prefix_tokens": tok.num_prefix,
        "no_embed_class": tok.no_embed_class,
        "pos_embed": tok.pos_embed is not None,
        "embed_norm": layer(tok.embed_norm),
        # only models with APT's aggregation record it, so the configs of earlier checkpoints still verify
        **({"aggregate": tok.aggregate} if tok.aggregate != "shared" else {}),
        # only models of more than two scales record them, for the same reason
        **({"scales": list(tok.patch_sizes)} if tok.scales > 2 else {}),
        # only models with APT's coarse position resampling record it, for the same reason
        **({"coarse_pos": tok.coarse_pos} if getattr(tok, "coarse_pos", "bilinear") != "bilinear" else {}),
        # only models with APT's coarse pixels record them, for the same reason
        **({"coarse_pixels": tok.coarse_pixels} if getattr(tok, "coarse_pixels", "area") != "area" else {}),
        "depth": len(model.blocks),
        "blocks": blocks(model.blocks),
        "norm_pre": layer(model.norm_pre),
        "norm": layer(model.norm),
        "fc_norm": layer(model.fc_norm),
        "global_pool": model.global_pool,
        "pool_include_prefix": model.pool_include_prefix,
        "num_classes": head.out_features if isinstance(head, nn.Linear) else 0,
        "gate": gate_description(gate),
        # only RoPE models record it, so the configs of earlier checkpoints still verify
        **({"rope": rope(model.rope)} if getattr(model, "rope", None) is not None else {}),
    }


def gate_description(gate: nn.Module) -> dict:
    """The learned gate's width, temperature and grid (the record of every checkpoint so far), or
    what a gate of another kind records of itself (``msvit.models.entropy_gate``)."""
    if hasattr(gate, "describe_architecture"):
        return gate.describe_architecture()
    return {"hidden": gate.fc1.out_features, "temperature": gate.temperature, "grid": list(gate.grid)}


ROPE_SETTINGS = ("grid_type", "temperature", "ref_feat_shape", "grid_offset", "grid_indexing", "normalize_coords")


def rope(packed) -> dict:
    """The settings that place a RoPE model's rotations (``msvit.models.rope.PackedRope``)."""
    settings = {k: getattr(packed.rope, k) for k in ROPE_SETTINGS if hasattr(packed.rope, k)}
    return {"type": type(packed.rope).__name__, "rotate_half": packed.rotate_half, **settings}


def describe(model: nn.Module) -> dict:
    """JSON-ready description of an MSViT, or of a model with an MSViT ``backbone`` and a ``decoder``."""
    if hasattr(model, "backbone"):
        decoder = model.decoder
        found = {"type": type(decoder).__name__, "blocks": blocks(getattr(decoder, "blocks", []))}
        found.update(
            {"num_classes": getattr(model, "num_classes", None), "freeze_gate": getattr(model, "freeze_gate", None)}
        )
        description = {"backbone": msvit(model.backbone), "decoder": found}
    elif hasattr(model, "describe_architecture"):  # a mixed-scale Swin records its own (msvit.models.swin)
        description = model.describe_architecture()
    else:
        description = msvit(model)
    return json.loads(json.dumps(description))  # tuples become lists: equal to what config.json reads back


def from_timm_options(recorded) -> dict:
    """The ``msvit.from_timm`` keywords a recorded architecture (``describe``'s) implies beyond a
    checkpoint's ``config["msvit"]``: the coarse-token aggregation and the patch sizes of more than
    two scales, so ``load_checkpoint`` rebuilds them even from a recipe (a training run's flags)
    that never named them. An entropy gate recorded without a binning was saved before APT's
    binning became the default: it is rebuilt with the one it was saved with, ``"continuous"``."""
    backbone = recorded.get("backbone", recorded) if isinstance(recorded, dict) else None
    if not isinstance(backbone, dict):
        return {}
    options = {key: backbone[key] for key in ("aggregate", "scales", "coarse_pos", "coarse_pixels") if key in backbone}
    gate = backbone.get("gate")
    if isinstance(gate, dict) and "entropy" in (gate.get("type"), gate.get("kind")) and "binning" not in gate:
        options["entropy_binning"] = "continuous"
    return options


def differences(recorded, built, prefix: str = "") -> List[str]:
    """``key: recorded X, rebuilt Y`` for every (nested) key where the two descriptions differ."""
    if isinstance(recorded, dict) and isinstance(built, dict):
        found = []
        for key in sorted(set(recorded) | set(built)):
            found += differences(recorded.get(key, "<absent>"), built.get(key, "<absent>"), f"{prefix}{key}.")
        return found
    return [] if recorded == built else [f"{prefix.rstrip('.')}: recorded {recorded!r}, rebuilt {built!r}"]
