"""MSViT: dynamic mixed-scale tokenization for Vision Transformers, on packed varlen tokens.

import msvit
model = msvit.from_timm("vit_small_patch16_224")       # MSViT-S/16,32
logits = model(images)                                  # packed mode, the gate decides
mask = model.gate_mask(images)                          # bool [B, Nc], True = fine
pruned = msvit.PrunedMSViT(model, keep_ratio=0.7)       # EViT pruning on the packed tokens
seg = msvit.MSSegmenter(msvit.from_timm("vit_small_patch16_224"), num_classes=150)  # [B, 150, H, W]
digits = msvit.load_pretrained("cluttered-digits")    # the model shipped in the package, eval mode
transform = msvit.eval_transform(digits)               # its input size, mean, std (digits.pretrained_cfg)
"""

from .checkpoint import load_checkpoint, load_pretrained
from .flops import count_macs
from .gate import GateDecision, MixedScaleGate, gumbel_sigmoid
from .model import GridFeatures, MSViT, MSViTOutput, PackedFeatures, unpack_to_grid
from .pruning import PruneConfig, PrunedMSViT, PrunedOutput
from .segmentation import MSSegmenter, SegmenterOutput, load_segmenter
from .timm_compat import from_timm
from .tokenizer import MixedScaleTokenizer
from .transforms import eval_transform

__all__ = [
    "count_macs",
    "load_checkpoint",
    "load_pretrained",
    "GateDecision",
    "MSViT",
    "MSViTOutput",
    "MixedScaleGate",
    "MixedScaleTokenizer",
    "PackedFeatures",
    "GridFeatures",
    "from_timm",
    "gumbel_sigmoid",
    "unpack_to_grid",
    "MSSegmenter",
    "SegmenterOutput",
    "load_segmenter",
    "PruneConfig",
    "PrunedMSViT",
    "PrunedOutput",
    "eval_transform",
]
