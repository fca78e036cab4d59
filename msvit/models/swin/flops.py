"""MAC counts of a mixed-scale Swin in packed mode, from the windows each image actually fills.

Counted as ``msvit.models.flops`` counts MSViT (and as FlopCounterMode does): linear layers per token row,
the two N x N attention products per laid-out window (padded to the full window, as computed),
patch merging per merged row, the gate per region, the head. Not counted: norms, activations,
softmax, the bias and mask adds. docs/design.md section 8.
"""

from typing import Dict

import torch
from torch import Tensor, nn

from msvit.models.flops import _linear_macs
from msvit.models.swin.layout import fine_token_coords
from msvit.models.swin.windows import window_layout, windows_per_image


def _block_macs(block: nn.Module, rows, windows):
    n = block.window_size[0] * block.window_size[1]
    return rows * _linear_macs(block) + 2 * windows * n * n * (block.attn.qkv.out_features // 3)


def _merge_macs(stage: nn.Module) -> int:
    return _linear_macs(stage.downsample)


def swin_macs(model: nn.Module, mask: Tensor, include_gate: bool = True) -> Dict[str, Tensor]:
    """MACs per image (float64 ``[B]``) of a ``MixedScaleSwin`` by part: embed, gate, fine_stages
    (the stages before the entry stage and its patch merging, on present tokens), dense_stages,
    head, total."""
    batch, n_regions = mask.shape
    tok = model.tokenizer
    coarse_grid = (model.img_size[0] // tok.coarse_patch, model.img_size[1] // tok.coarse_patch)
    fine = mask.sum(1).to(torch.float64)
    coarse = n_regions - fine
    parts = {"embed": fine * tok.ratio**2 * _linear_macs(tok.embed) + coarse * _linear_macs(tok.coarse_embed)}
    parts["gate"] = torch.full_like(fine, float(model.gate.macs_per_region() * n_regions if include_gate else 0))
    fine_regions = mask.flatten().nonzero().squeeze(1)
    early = torch.zeros_like(fine)
    r = tok.ratio
    for s in range(model.entry):
        stage = model.layers[s]
        rows = fine * r * r
        if s > 0:
            early += rows * _merge_macs(stage)
        coords = fine_token_coords(fine_regions, coarse_grid, r)
        for block in stage.blocks:
            layout = window_layout(coords, model.stage_grid(s), block.window_size, block.shift_size)
            windows = torch.bincount(layout.window_image, minlength=batch).to(torch.float64)
            early += _block_macs(block, rows, windows)
        r //= 2
    parts["fine_stages"] = early + fine * _merge_macs(model.layers[model.entry])
    dense = 0
    for s in range(model.entry, len(model.layers)):
        stage, (h, w) = model.layers[s], model.stage_grid(s)
        if s > model.entry:
            dense += h * w * _merge_macs(stage)
        for block in stage.blocks:
            dense += _block_macs(block, h * w, windows_per_image((h, w), block.window_size))
    parts["dense_stages"] = torch.full_like(fine, float(dense))
    parts["head"] = torch.full_like(fine, float(_linear_macs(model.head)))
    parts["total"] = sum(parts.values())
    return parts
