"""MSViT: dynamic mixed-scale tokenization for Vision Transformers, on packed varlen tokens.

import msvit
model = msvit.from_timm("vit_small_patch16_224")       # MSViT-S/16,32
logits = model(images)                                  # packed mode, the gate decides
mask = model.gate_mask(images)                          # bool [B, Nc], True = fine
free = msvit.from_timm("vit_small_patch16_224", gate="entropy")  # APT's training-free entropy gate
pruned = msvit.PrunedMSViT(model, keep_ratio=0.7)       # EViT pruning on the packed tokens
swin = msvit.from_timm("swin_tiny_patch4_window7_224")  # msvit.MixedScaleSwin: coarse regions skip early stages
seg = msvit.MSSegmenter(msvit.from_timm("vit_small_patch16_224"), num_classes=150)  # [B, 150, H, W]
msvit.save_checkpoint(model, "my_model")              # weights + the recipe from_timm needs to rebuild it
model = msvit.load_checkpoint("my_model")              # equal logits; msvit.eval_transform(model) = timm's
digits = msvit.load_pretrained("cluttered-digits")    # the model shipped in the package, eval mode
transform = msvit.eval_transform(digits)               # its input size, mean, std (digits.pretrained_cfg)
runner = msvit.compile_packed(model.eval(), 256, 224)   # captured packed inference: runner(images) -> logits
msvit.export(model.eval(), "model.pt2", 8, 224, budget=0.5)  # AOTInductor package: runs without msvit
"""

from msvit.data.transforms import eval_transform
from msvit.io.checkpoint import load_checkpoint, load_pretrained
from msvit.io.save import save_checkpoint
from msvit.models.capture import compile_packed
from msvit.models.entropy_gate import EntropyGate
from msvit.models.export import export
from msvit.models.flops import count_macs
from msvit.models.gate import GateDecision, MixedScaleGate, gumbel_sigmoid
from msvit.models.list_runner import ListRunner
from msvit.models.mixed_scale_vit import GridFeatures, MSViT, MSViTOutput, PackedFeatures, unpack_to_grid
from msvit.models.packed_runner import PackedRunner
from msvit.models.pruning import PruneConfig, PrunedMSViT, PrunedOutput
from msvit.models.segmentation import MSSegmenter, SegmenterOutput, load_segmenter
from msvit.models.swin import MixedScaleSwin
from msvit.models.timm_compat import from_timm
from msvit.models.tokenizer import MixedScaleTokenizer

__all__ = [
    "count_macs",
    "compile_packed",
    "PackedRunner",
    "ListRunner",
    "load_checkpoint",
    "save_checkpoint",
    "load_pretrained",
    "EntropyGate",
    "GateDecision",
    "MSViT",
    "MixedScaleSwin",
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
    "export",
]
