"""``from_timm``'s VLM towers: the timm model is read by its family's adapter
(``msvit.models.qwen3_tower``, ``deepseek_tower``, ``gemma4_tower``: one file per family, as timm
keeps them) and built into a ``msvit.models.vlm_tower.VLMTower`` (docs/design.md section 17)."""

import importlib
from typing import Optional, Tuple

from torch import nn

from msvit.models.timm_names import check_model_name
from msvit.models.tokenizer import MixedScaleTokenizer
from msvit.models.vlm_tower import TowerParts, VLMTower

ADAPTERS = {
    "qwen3_vit": "msvit.models.qwen3_tower",
    "deepseek_vit": "msvit.models.deepseek_tower",
    "gemma4_vit": "msvit.models.gemma4_tower",
}


def tower_parts(model_or_name, timm_kwargs: Optional[dict], img_size) -> Tuple[nn.Module, TowerParts]:
    """(the timm tower, its ``TowerParts``): built from a name with ``timm_kwargs``, read by its
    family's adapter. ``img_size``: Gemma 4 only (its nominal image size; default the pretrained_cfg's)."""
    import timm

    from msvit.models.timm_support import model_name

    if isinstance(model_or_name, str):
        check_model_name(model_or_name)
        model = timm.create_model(model_or_name, **(timm_kwargs or {}))
    else:
        if timm_kwargs:
            raise ValueError("timm_kwargs only apply when from_timm is given a model name")
        model = model_or_name
    adapter = importlib.import_module(ADAPTERS[type(model).__module__.rpartition(".")[2]])
    label = model_name(model, model_or_name if isinstance(model_or_name, str) else None)
    return model, adapter.tower_parts(model, label, img_size)


def build_tower(
    parts: TowerParts,
    gate: nn.Module,
    ratio: int,
    scales: int,
    aggregation,
    kernels: str,
    attention_backend: str,
    coarse_pos: str = "bilinear",
    coarse_pixels: str = "area",
) -> VLMTower:
    """The ``VLMTower`` of ``parts`` with ``gate`` (``from_timm`` builds it as for a ViT); the
    default coarse patch, ``parts.ratio``, is the projector's window (Qwen: 2 x 16 = 32 px,
    DeepSeek: 3 x 14 = 42 px, Gemma 4: 3 x 16 = 48 px), so a coarse token fills one window."""
    tokenizer = MixedScaleTokenizer(
        parts.embed,
        parts.fine,
        ratio,
        parts.grid,
        pos_embed=None,
        prefix_tokens=None,
        no_embed_class=True,
        aggregation=aggregation,
        scales=scales,
        grid_positions=parts.grid_positions,
        coarse_pos=coarse_pos,
        coarse_pixels=coarse_pixels,
    )
    return VLMTower(
        tokenizer,
        gate,
        parts.blocks,
        parts.norm,
        parts.head,
        fc_norm=parts.fc_norm,
        head_drop=parts.head_drop,
        global_pool="avg",
        in_chans=parts.embed.weight.shape[1] // parts.fine**2,
        kernels=kernels,
        attention_backend=attention_backend,
        rope=parts.rope(ratio, scales),
        projector=parts.projector,
        encoder=parts.encoder,
    )


def classifier_parts(model: nn.Module) -> dict:
    """The head of a tower's classifier (``fc_norm``, ``head_drop``, ``head``: copies), or
    Identities for an encoder; the checks are the family adapter's."""
    import copy

    if not hasattr(model, "encoder"):
        return dict(fc_norm=nn.Identity(), head_drop=nn.Identity(), head=nn.Identity())
    return dict(
        fc_norm=copy.deepcopy(model.norm), head_drop=copy.deepcopy(model.head_drop), head=copy.deepcopy(model.head)
    )
