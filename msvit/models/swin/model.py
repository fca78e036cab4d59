"""MixedScaleSwin: timm's Swin v1 with a mixed-scale gate (Section 4.2.3, Appendix E.3).

Token flow for an entry stage e (the stage whose token scale p * 2**e equals S_c):
  fine regions:   patches (p px) -> timm embedding -> stages 0 .. e-1 on packed Z-ordered rows
                  (window attention over present tokens only) -> stage e's patch merging: one
                  row per fine region
  coarse regions: one linear embedding of the S_c x S_c pixels -> stage e's width
  both are placed on stage e's grid (= the coarse grid); stage e's blocks and every later stage
  are timm's, dense; then timm's norm and head.
Modes: ``packed`` (the saving) and ``masked`` (the dense baseline: every fine-grid token runs
through the early stages, absent ones are masked out of attention as keys). Same logits in the
forward pass. docs/design.md section 8.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from msvit.models.checks import check_choice, check_counted_mask, check_dtype, check_images, check_mask_or_budget
from msvit.models.gate import Budget, GateDecision, MixedScaleGate
from msvit.models.mixed_scale_vit import MSViTOutput
from msvit.models.swin.architecture import describe_swin
from msvit.models.swin.blocks import run_stage_blocks
from msvit.models.swin.flops import swin_macs
from msvit.models.swin.layout import TokenCoords, dense_coords, fine_token_coords
from msvit.models.swin.merging import merge_packed
from msvit.models.swin.tokenizer import SwinTokenizer
from msvit_kernels.dispatch import IMPLEMENTATIONS, normalize_choice

SWIN_MODES = ("packed", "masked")


def regions_of(coords: TokenCoords, coarse_grid: Tuple[int, int], r: int) -> Tensor:
    """Flat region index ``image * Nc + region`` of every row, with r x r tokens per region."""
    nc = coarse_grid[0] * coarse_grid[1]
    return coords.image * nc + (coords.y // r) * coarse_grid[1] + coords.x // r


class MixedScaleSwin(nn.Module):
    """Mixed-scale Swin over timm stages. Build it with ``msvit.from_timm(<SwinTransformer>)``.

    Args:
        tokenizer: ``SwinTokenizer`` (fine and coarse embeddings); gate: ``MixedScaleGate`` over
            S_c regions; layers: timm's ``SwinTransformerStage`` list; norm, head: timm's.
        entry: index of the stage whose token scale equals S_c (where coarse tokens join).
        img_size: (H, W) the timm model was built for (its shifted-window masks are fixed).
    """

    def __init__(
        self,
        tokenizer: SwinTokenizer,
        gate: MixedScaleGate,
        layers: nn.Sequential,
        norm: nn.Module,
        head: nn.Module,
        *,
        entry: int,
        img_size: Tuple[int, int],
        in_chans: int = 3,
        kernels: str = "auto",
    ):
        super().__init__()
        if not 1 <= entry < len(layers):
            raise ValueError(f"entry stage must be in 1 .. {len(layers) - 1}, got {entry}")
        self.tokenizer = tokenizer
        self.gate = gate
        self.layers = layers
        self.norm = norm
        self.head = head
        self.entry = entry
        self.img_size = tuple(img_size)
        self.in_chans = in_chans
        self.kernels = kernels

    @property
    def kernels(self) -> str:
        return self.gate.kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        # only the gate has a fused kernel; the Swin path itself is torch
        self.gate.kernels = normalize_choice("kernels", value, IMPLEMENTATIONS, {"torch": "reference"})

    @property
    def num_classes(self) -> int:
        return getattr(getattr(self.head, "fc", None), "out_features", 0)

    def coarse_grid(self, images: Tensor) -> Tuple[int, int]:
        return self.tokenizer.grids(images)[1]

    def stage_grid(self, stage: int) -> Tuple[int, int]:
        scale = self.tokenizer.fine_patch * 2**stage
        return self.img_size[0] // scale, self.img_size[1] // scale

    def check_images(self, images: Tensor) -> None:
        check_images(images, self.in_chans, self.tokenizer.coarse_patch, self.tokenizer.coarse_patch)
        check_dtype(images, self.tokenizer.embed.weight.dtype)
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(
                f"this Swin was built for {self.img_size[0]}x{self.img_size[1]} images (its window sizes "
                f"and shifted-window masks depend on it), got {images.shape[-2]}x{images.shape[-1]}"
            )

    def decide(self, images: Tensor, *, mask: Optional[Tensor] = None, budget: Budget = None) -> GateDecision:
        """The batch's scale decisions: the caller's mask, or the gate's (sampled when training)."""
        check_mask_or_budget(mask, budget)
        self.check_images(images)
        return self.gate.decision(images, mask, sample=self.training, budget=budget)

    @torch.no_grad()
    def gate_mask(self, images: Tensor, *, budget: Budget = None) -> Tensor:
        """Hard decisions with eval semantics: bool ``[B, Nc]``, True = fine."""
        self.check_images(images)
        return self.gate.decide(images, sample=False, budget=budget).hard

    def tokens_per_image(self, mask: Tensor, *, images: Optional[Tensor] = None) -> Tensor:
        """int64 ``[B]`` tokens embedded per image in packed mode: (S_c / p)^2 per fine region, one
        per coarse region. ``mask``: bool ``[B, Nc]`` over the model's coarse grid (``images``, of
        the one size it takes, only set B); as ``MSViT.tokens_per_image``."""
        check_counted_mask(mask, self.gate.grid, images)
        return mask.shape[1] + (self.tokenizer.ratio**2 - 1) * mask.sum(1)

    def mac_parts(self, mask: Tensor, include_gate: bool = True) -> Dict[str, Tensor]:
        """MACs per image ``[B]`` (float64) in packed mode, by part (``msvit.models.swin.flops``)."""
        return swin_macs(self, mask, include_gate)

    def describe_architecture(self) -> dict:
        """What ``config.json`` records of this architecture (``msvit.io.architecture.describe``)."""
        return describe_swin(self)

    def forward(
        self,
        images: Tensor,
        *,
        mask: Optional[Tensor] = None,
        mode: str = "packed",
        budget: Budget = None,
        return_gate: bool = False,
    ):
        """Classify ``images [B, C, H, W]``: logits ``[B, num_classes]`` (or an ``MSViTOutput``
        with ``return_gate``; its ``tokens`` are the tokens embedded per image)."""
        check_choice("mode", mode, SWIN_MODES)
        decision = self.decide(images, mask=mask, budget=budget)
        if mode == "packed":
            x = self._packed_entry(images, decision)
            tokens = self.tokens_per_image(decision.hard)
        else:
            x = self._masked_entry(images, decision)
            fine_cells = self.stage_grid(0)[0] * self.stage_grid(0)[1]
            tokens = torch.full((images.shape[0],), fine_cells, device=images.device)
        x = self.layers[self.entry].blocks(x)
        for stage in self.layers[self.entry + 1 :]:
            x = stage(x)
        logits = self.head(self.norm(x))
        return MSViTOutput(logits, decision, tokens) if return_gate else logits

    def _packed_entry(self, images: Tensor, decision: GateDecision) -> Tensor:
        """Stage ``entry``'s input grid ``[B, h, w, C]``: fine regions through the early stages on
        packed rows, coarse regions embedded, both at their grid positions."""
        batch, coarse_grid = images.shape[0], self.coarse_grid(images)
        hard, st = decision.hard.flatten(), decision.st.flatten()
        fine_regions = hard.nonzero().squeeze(1)  # one host sync per forward
        r = self.tokenizer.ratio
        coords = fine_token_coords(fine_regions, coarse_grid, r)
        # straight-through: the value is 1, the gradient reaches the gate (docs/design.md section 2)
        x = self.tokenizer.fine(images, *coords) * st[fine_regions].repeat_interleave(r * r)[:, None]
        for s in range(self.entry):
            if s > 0:
                x, r = merge_packed(self.layers[s].downsample, x), r // 2
                coords = fine_token_coords(fine_regions, coarse_grid, r)
            x = run_stage_blocks(self.layers[s].blocks, x, coords, self.stage_grid(s), batch)
        fine = merge_packed(self.layers[self.entry].downsample, x)  # one row per fine region
        coarse_regions = (~hard).nonzero().squeeze(1)
        coarse = self.tokenizer.coarse(images, coarse_regions) * (1 - st[coarse_regions])[:, None]
        grid = fine.new_zeros(hard.numel(), fine.shape[-1])
        grid = grid.index_copy(0, fine_regions, fine).index_copy(0, coarse_regions, coarse)
        return grid.view(batch, *coarse_grid, -1)

    def _masked_entry(self, images: Tensor, decision: GateDecision) -> Tensor:
        """The dense-masked baseline of ``_packed_entry``: every fine-grid token runs through the
        early stages; tokens of coarse regions are computed but are never keys, and are replaced by
        the coarse embedding at stage ``entry``."""
        batch, coarse_grid = images.shape[0], self.coarse_grid(images)
        hard, st = decision.hard.flatten(), decision.st.flatten()
        r = self.tokenizer.ratio
        coords = dense_coords(batch, self.stage_grid(0), images.device)
        x = self.tokenizer.fine(images, *coords) * st[regions_of(coords, coarse_grid, r)][:, None]
        for s in range(self.entry):
            grid = self.stage_grid(s)
            if s > 0:
                previous = self.stage_grid(s - 1)
                x = self.layers[s].downsample(x.view(batch, *previous, -1)).flatten(0, 2)
                r //= 2
                coords = dense_coords(batch, grid, images.device)
            key_active = hard[regions_of(coords, coarse_grid, r)]
            x = run_stage_blocks(self.layers[s].blocks, x, coords, grid, batch, key_active)
        fine = self.layers[self.entry].downsample(x.view(batch, *self.stage_grid(self.entry - 1), -1))
        coarse = self.tokenizer.coarse(images).view_as(fine) * (1 - decision.st)[..., None].view(batch, *coarse_grid, 1)
        return torch.where(decision.hard.view(batch, *coarse_grid, 1), fine, coarse)
