"""The timm model families ``from_timm`` is tested on, and what it does with each.

tests/test_model_families.py builds every case (pretrained=False, depth reduced, small images) and
checks it: "exact" cases give all-fine logits equal to timm's on re-drawn parameters, "refused"
cases raise an error naming the model and the feature. The model table of docs/models.md is generated from
this list: ``python tests/model_families.py`` prints it (a test checks docs/models.md holds it).
"""

from typing import Dict, List, NamedTuple, Tuple


class Family(NamedTuple):
    family: str
    cases: List[Tuple[str, Dict]]  # (registry name, extra timm kwargs)
    refused: str = ""  # the missing feature the error names; "" = supported exactly


def _p16(*names: str, **kwargs) -> List[Tuple[str, Dict]]:
    return [(n, dict(img_size=64, **kwargs)) for n in names]


def _p14(*names: str, **kwargs) -> List[Tuple[str, Dict]]:
    return [(n, dict(img_size=56, **kwargs)) for n in names]


def _vlm(base: str, size: int, *suffixes: str) -> List[Tuple[str, Dict]]:
    """A VLM tower's variants, narrow (the towers are 88M to 570M parameters at full width)."""
    narrow = dict(img_size=size, embed_dim=64, num_heads=4)
    if base.startswith("gemma4"):
        narrow.update(head_dim=16, intermediate_size=96, position_embedding_size=32)
    projected = {} if base.startswith("gemma4") else dict(out_features=48)  # the projector's LLM width
    return [(base + s, dict(narrow, **(projected if s else {}))) for s in suffixes]


# The features the refusals name (msvit.models.timm_support words them; the test checks the messages).
DIFF = "differential attention (DiffAttention: the difference of two softmax maps)"
CONV_STEM = "a conv stem (a CNN backbone before the patch embedding)"
PARALLEL = "parallel blocks (attention and MLP branches side by side)"
RES_POST = "res-post norm (the norm after each residual branch)"
GQA = "grouped-query attention (fewer key/value heads than query heads)"
REL_POS = "relative position bias"
WINDOWED = "windowed attention with relative position embeddings"

FAMILIES = [
    Family("ViT (AugReg, original)", _p16("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch32_224")),
    Family("ViT with registers / GAP", _p16("vit_medium_patch16_reg4_gap_256")),
    Family("DeiT", _p16("deit_tiny_patch16_224", "deit_small_patch16_224")),
    Family("DeiT-III", _p16("deit3_small_patch16_224")),
    Family("CLIP ViT", _p16("vit_base_patch16_clip_224")),
    Family("DINOv2", _p14("vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2")),
    Family("AIMv2", _p14("aimv2_large_patch14_224")),
    Family("SigLIP with GAP", _p16("vit_base_patch16_siglip_gap_224")),
    Family("FlexiViT", _p16("flexivit_small")),
    Family("EVA02", _p14("eva02_tiny_patch14_224", "eva02_small_patch14_224")),
    Family("EVA (v1)", _p14("eva_giant_patch14_224")),
    Family(
        "DINOv3", _p16("vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3")
    ),
    Family("Perception Encoder (spatial)", _p16("vit_pe_spatial_tiny_patch16_512")),
    Family(
        "RoPE-ViT (axial, mixed)",
        _p16(
            "vit_small_patch16_rope_224",
            "vit_small_patch16_rope_mixed_224",
            "vit_base_patch16_rope_mixed_ape_224",
            "vit_small_patch16_rope_ape_224",
            "vit_medium_patch16_rope_reg1_gap_256",
        ),
    ),
    Family("SigLIP / SigLIP2 (attention pooling)", _p16("vit_base_patch16_siglip_224")),
    Family("Perception Encoder (core)", _p16("vit_pe_core_small_patch16_384")),
    Family("Distilled DeiT", _p16("deit_tiny_distilled_patch16_224")),
    Family("NaFlexViT", [("naflexvit_base_patch16_gap", {})]),  # at 256 px, its position grid
    # VLM towers (docs/design.md section 17): the _enc / _merge / _align outputs are the projected LLM tokens
    Family("Qwen3-VL / Qwen3.5 vision tower", _vlm("qwen3_vit_88m", 64, "", "_merge", "_enc")),
    Family("DeepSeek-V4 vision tower", _vlm("deepseek_vit_412m", 84, "", "_align", "_enc")),
    Family("Gemma 4 vision tower", _vlm("gemma4_vit_167m", 96, "", "_enc")),
    Family(
        "Differential attention ViT",
        _p16("vit_dwee_patch16_reg1_gap_256") + _p16("vit_small_patch16_224", attn_layer="diff"),
        DIFF,
    ),
    Family("Hybrid ResNet ViT", [("vit_small_r26_s32_224", {}), ("vit_base_r50_s16_224", {})], CONV_STEM),
    Family("Parallel-block ViT", _p16("vit_small_patch16_18x2_224", "vit_base_patch16_xp_224"), PARALLEL),
    Family("Res-post-norm ViT", _p16("vit_base_patch16_rpn_224"), RES_POST),
    Family("EVA02 CLIP enormous (post-norm)", _p14("eva02_enormous_patch14_clip_224"), RES_POST),
    Family("Sapiens2 (grouped-query attention)", _p16("vit_base_patch16_sapiens2", num_kv_heads=6), GQA),
    Family("BEiT", _p16("beit_base_patch16_224"), REL_POS),
    Family("ViT with relative position", _p16("vit_relpos_small_patch16_224"), REL_POS),
    Family("SAM ViT", _p16("samvit_base_patch16"), WINDOWED),
]


def cases(refused: bool):
    """``(family, name, kwargs, feature)`` for every case of the supported or the refused families."""
    return [(f.family, n, kw, f.refused) for f in FAMILIES if bool(f.refused) == refused for n, kw in f.cases]


def readme_table() -> str:
    rows = ["| Family | Examples (timm names) | from_timm |", "|---|---|---|"]
    for f in FAMILIES:
        names = ", ".join(f"`{n}`" + (" (`attn_layer='diff'`)" if kw.get("attn_layer") else "") for n, kw in f.cases)
        output = "logits and projected LLM tokens" if any(n.endswith("_enc") for n, _ in f.cases) else "logits"
        status = f"refused: {f.refused}" if f.refused else f"exact (all-fine {output} = timm)"
        rows.append(f"| {f.family} | {names} | {status} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(readme_table())
