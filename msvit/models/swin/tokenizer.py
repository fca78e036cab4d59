"""The two embeddings of a mixed-scale Swin: timm's small patches for fine regions, and one linear
embedding per coarse region straight to the width of the stage where coarse tokens join.

Unlike MSViT's shared embedding (docs/design.md section 2), Swin's coarse tokens skip the early
stages, so they need their own projection to that stage's width (Appendix E.3: "a simple linear
embedding"); the fine patch embedding is timm's conv written as a linear layer in (C, p, p) order.
"""

from typing import Optional, Tuple

from torch import Tensor, nn

from msvit_kernels.reference import patchify


class SwinTokenizer(nn.Module):
    """Args:
    embed: ``nn.Linear(C * p * p, C0)``, timm's patch embedding; embed_norm: timm's
        ``patch_embed.norm`` (LayerNorm in Swin) or None.
    coarse_embed: ``nn.Linear(C * S_c * S_c, C_entry)``, the coarse tokens' own embedding.
    fine_patch: p; coarse_patch: S_c = p * 2**entry_stage.
    """

    def __init__(
        self,
        embed: nn.Linear,
        embed_norm: Optional[nn.Module],
        coarse_embed: nn.Linear,
        fine_patch: int,
        coarse_patch: int,
    ):
        super().__init__()
        self.embed = embed
        self.embed_norm = embed_norm if embed_norm is not None else nn.Identity()
        self.coarse_embed = coarse_embed
        self.fine_patch = fine_patch
        self.coarse_patch = coarse_patch
        self.ratio = coarse_patch // fine_patch
        self.kernels = "reference"  # one torch path: the Swin tokenizer has no fused kernel

    def grids(self, images: Tensor) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(fine grid, coarse grid) of a batch."""
        h, w = images.shape[-2:]
        return (h // self.fine_patch, w // self.fine_patch), (h // self.coarse_patch, w // self.coarse_patch)

    def fine(self, images: Tensor, image: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """Embeddings ``[T, C0]`` of the fine patches at (image, y, x) rows of the fine grid."""
        (gh, gw), _ = self.grids(images)
        patches = patchify(images, self.fine_patch).flatten(0, 1)  # [B * gh * gw, C*p*p], raster order
        return self.embed_norm(self.embed(patches[(image * gh + y) * gw + x]))

    def coarse(self, images: Tensor, regions: Optional[Tensor] = None) -> Tensor:
        """Embeddings ``[R, C_entry]`` of the coarse regions with flat indices ``image * Nc + region``
        (``regions`` int64 ``[R]``), or of every region of the batch ``[B * Nc, C_entry]``."""
        patches = patchify(images, self.coarse_patch).flatten(0, 1)
        return self.coarse_embed(patches if regions is None else patches[regions])
