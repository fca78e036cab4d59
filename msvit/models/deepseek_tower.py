"""timm's DeepSeek-V4 vision tower (``deepseek_vit_*``: classifier, ``_align``, ``_enc``) as an MSViT.

A pre-norm ViT with RMSNorm, fused qkv with bias, a bias-free SwiGLU MLP (timm's ``GluMlp``) and
axial 2D RoPE (``RotaryEmbeddingCat``, 'half' layout) as its only position encoding: fine tokens
rotate at timm's grid coordinates, coarse tokens at the mean of their cells'
(``msvit.models.rope``); there is no table to resample. The encoder ends with an RMSNorm. The
projector ('aligner', ``_enc`` and ``_align``: 3x3 channel-major pixel-unshuffle, zero-padded at
the bottom and right, then an MLP to the LLM width) runs on the fine grid
(``msvit.models.vlm_tower``); the default coarse patch is its 3x3 window (42 px at patch 14).
"""

import copy

from torch import nn

from msvit.models.qwen3_tower import check_tower
from msvit.models.rope import packed_rope
from msvit.models.timm_parts import conv_as_linear
from msvit.models.timm_support import _check_tokenwise
from msvit.models.vlm_families import classifier_parts
from msvit.models.vlm_tower import GridProjector, TowerParts


def tower_parts(model: nn.Module, label: str, img_size=None) -> TowerParts:
    """The ``TowerParts`` of a ``DeepseekVitClassifier`` or ``DeepseekVitEncoder``."""
    from timm.models.deepseek_vit import DeepseekVitClassifier, DeepseekVitEncoder

    if not isinstance(model, (DeepseekVitClassifier, DeepseekVitEncoder)):
        raise TypeError(f"expected a timm DeepseekVitClassifier or DeepseekVitEncoder, got {type(model).__name__}")
    if img_size is not None:
        raise ValueError(
            "img_size applies to NaFlexVit and Gemma 4; a DeepSeek tower takes timm_kwargs={'img_size': ...}"
        )
    encoder = model.encoder if isinstance(model, DeepseekVitClassifier) else model
    prefix = "encoder." if encoder is not model else ""
    check_tower(label, model, encoder, prefix)
    _check_tokenwise(label, f"{prefix}norm", encoder.norm)
    projector = None
    if encoder.aligner is not None:
        for name in ("fc1", "act", "fc2"):
            _check_tokenwise(label, f"{prefix}aligner.{name}", getattr(encoder.aligner, name))
        window = encoder.aligner.downsample_ratio
        projector = GridProjector(copy.deepcopy(encoder.aligner), window, True, "DeepSeek's aligner")
    return TowerParts(
        conv_as_linear(encoder.patch_embed.proj),
        encoder.patch_embed.proj.kernel_size[0],
        tuple(encoder.patch_embed.grid_size),
        None,  # RoPE only: no absolute position table
        nn.ModuleList(copy.deepcopy(list(encoder.blocks))),
        copy.deepcopy(encoder.norm),
        lambda ratio, scales: packed_rope(encoder, ratio, scales),
        projector,
        encoder is model,
        ratio=encoder.downsample_ratio,
        **classifier_parts(model),
    )
