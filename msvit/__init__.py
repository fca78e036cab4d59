"""MSViT: dynamic mixed-scale tokenization for Vision Transformers, on packed varlen tokens.

    import msvit
    model = msvit.from_timm("vit_small_patch16_224")       # MSViT-S/16,32
    logits = model(images)                                  # packed mode, the gate decides
    mask = model.gate_mask(images)                          # bool [B, Nc], True = fine
"""
from .flops import count_macs
from .gate import GateDecision, MixedScaleGate, gumbel_sigmoid
from .model import GridFeatures, MSViT, MSViTOutput, PackedFeatures, unpack_to_grid
from .timm_compat import from_timm
from .tokenizer import MixedScaleTokenizer

__all__ = ["count_macs", "GateDecision", "MSViT", "MSViTOutput", "MixedScaleGate", "MixedScaleTokenizer", "PackedFeatures", "GridFeatures",
           "from_timm", "gumbel_sigmoid", "unpack_to_grid"]
