"""``from_timm`` for the VLM towers: the timm model is read by its family's adapter
(``msvit.models.qwen3_tower``, ``deepseek_tower``, ``gemma4_tower``: one file per family, as timm
keeps them) and built into a ``msvit.models.vlm_tower.VLMTower`` (docs/design.md section 17)."""

import importlib
from typing import Optional

from torch import nn

from msvit.models.aggregation import AGGREGATIONS
from msvit.models.checks import check_choice
from msvit.models.timm_names import check_model_name
from msvit.models.tokenizer import MixedScaleTokenizer
from msvit.models.vlm_tower import TowerParts, VLMTower

ADAPTERS = {
    "qwen3_vit": "msvit.models.qwen3_tower",
    "deepseek_vit": "msvit.models.deepseek_tower",
    "gemma4_vit": "msvit.models.gemma4_tower",
}


def vlm_from_timm(
    model_or_name,
    *,
    coarse_patch_size: Optional[int] = None,
    scales=None,
    kernels: str = "auto",
    attention_backend: str = "auto",
    timm_kwargs: Optional[dict] = None,
    img_size=None,
    gate: str = "learned",
    aggregate: str = "shared",
    **gate_kwargs,
) -> VLMTower:
    """``msvit.from_timm`` of a ``qwen3_vit_*``, ``deepseek_vit_*`` or ``gemma4_vit_*`` name or model.

    The default coarse patch is the projector's window times the patch (Qwen: 2 x 16 = 32 px,
    DeepSeek: 3 x 14 = 42 px, Gemma 4: 3 x 16 = 48 px), so a coarse token fills one window.
    ``img_size``: Gemma 4 only (its nominal image size; default the pretrained_cfg's).
    """
    import timm

    from msvit.models.timm_compat import _aggregation, build_gate, input_cfg, scale_layout
    from msvit.models.timm_support import model_name

    check_choice("aggregate", aggregate, AGGREGATIONS)
    if isinstance(model_or_name, str):
        check_model_name(model_or_name)
        model = timm.create_model(model_or_name, **(timm_kwargs or {}))
    else:
        if timm_kwargs:
            raise ValueError("timm_kwargs only apply when from_timm is given a model name")
        model = model_or_name
    family = type(model).__module__.rpartition(".")[2]
    adapter = importlib.import_module(ADAPTERS[family])
    label = model_name(model, model_or_name if isinstance(model_or_name, str) else None)
    parts: TowerParts = adapter.tower_parts(model, label, img_size)
    n_scales, ratio = scale_layout(parts.fine, coarse_patch_size, scales, parts.ratio)
    cfg = getattr(model, "pretrained_cfg", None)
    scale_gate = build_gate(gate, parts.embed, parts.fine, ratio, n_scales, parts.grid, cfg, gate_kwargs)
    tokenizer = MixedScaleTokenizer(
        parts.embed,
        parts.fine,
        ratio,
        parts.grid,
        pos_embed=None,
        prefix_tokens=None,
        no_embed_class=True,
        aggregation=None if aggregate == "shared" else _aggregation(parts.embed.weight, ratio),
        scales=n_scales,
        grid_positions=parts.grid_positions,
    )
    tower = VLMTower(
        tokenizer,
        scale_gate,
        parts.blocks,
        parts.norm,
        parts.head,
        fc_norm=parts.fc_norm,
        head_drop=parts.head_drop,
        global_pool="avg",
        in_chans=parts.embed.weight.shape[1] // parts.fine**2,
        kernels=kernels,
        attention_backend=attention_backend,
        rope=parts.rope(ratio, n_scales),
        projector=parts.projector,
        encoder=parts.encoder,
    )
    if cfg:
        tower.pretrained_cfg = input_cfg(model, parts.fine, parts.grid)
    return tower.train(model.training)


def classifier_parts(model: nn.Module) -> dict:
    """The head of a tower's classifier (``fc_norm``, ``head_drop``, ``head``: copies), or
    Identities for an encoder; the checks are the family adapter's."""
    import copy

    if not hasattr(model, "encoder"):
        return dict(fc_norm=nn.Identity(), head_drop=nn.Identity(), head=nn.Identity())
    return dict(
        fc_norm=copy.deepcopy(model.norm), head_drop=copy.deepcopy(model.head_drop), head=copy.deepcopy(model.head)
    )
