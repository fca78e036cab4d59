"""timm's NaFlexViT as MSViT's peer: the same trunk shape, fed MSViT's per-image token counts.

NaFlexViT is the variable-token ViT a user would pick today (padding + attention masks); bench_peers
and the latency-vs-tokens sweep of bench_inference time it on the same work as MSViT.
"""

import torch
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

import msvit

PATCH = 16


def naflex_like(model: msvit.MSViT) -> NaFlexVit:
    """A NaFlexViT with the MSViT trunk's width, depth and heads, class-token pooled like ViT-S."""
    block = model.blocks[0]
    cfg = NaFlexVitCfg(
        embed_dim=block.attn.qkv.in_features,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        class_token=True,
        global_pool="token",
        pos_embed_grid_size=(224 // PATCH, 224 // PATCH),
    )
    return NaFlexVit(cfg, num_classes=model.num_classes, img_size=224)


def naflex_batch(images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """NaFlexViT's input for ``tokens[i] - 1`` patches of image i: the first patches of its 16px
    grid (row-major), padded to the longest image with ``patch_valid`` False."""
    b, c, h, w = images.shape
    gh, gw = h // PATCH, w // PATCH
    patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [B, C, gh, gw, P, P]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(b, gh * gw, PATCH * PATCH * c)  # (ph, pw, C) layout
    counts = tokens.long().cpu() - 1
    n = int(counts.max())
    if n > gh * gw:
        raise ValueError(f"{n} patches per image do not fit a {gh}x{gw} grid")
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coord = torch.stack([ys.flatten(), xs.flatten()], -1)[:n].expand(b, n, 2).to(images.device)
    valid = (torch.arange(n)[None] < counts[:, None]).to(images.device)
    return {"patches": patches[:, :n].contiguous(), "patch_coord": coord, "patch_valid": valid}
