"""APT's zero-initialised aggregation of sub-patch embeddings into a coarse token
(``msvit.from_timm(..., aggregate="zero_conv")``; Choudhury et al., *Accelerating Vision
Transformers with Adaptive Patch Sizes*, ICLR 2026).

A coarse token is the shared embedding of its area-downsampled patch (Eq. 4-5, ``aggregate="shared"``)
plus ``Linear_0(Conv_rxr(E))``, where E ``[d, r, r]`` holds the embeddings of the region's r x r
fine sub-patches on their grid, the conv has kernel r and stride r (one output per region; for
r = 2 APT's 2x2 stride-2 conv; one r x r conv here covers every integer ratio), and the linear
layer starts at zero: a pretrained ViT starts exactly where it was.

More than two scales, as APT's ``TokenizedZeroConvPatchAttn.forward`` does it for its 64 px tokens
("Apply twice for 64s"): a token of scale s takes the embeddings of its ``r**s x r**s`` finest
sub-patches and applies the same conv s times (``r**s`` -> ``r**(s-1)`` -> ... -> 1), then the
same zero-initialised linear layer; one conv and one linear layer for every scale, so a
checkpoint's parameters do not depend on the number of scales. Since the conv's stride is its
kernel, applying it s times to a node's block is applying it s times to the whole finest
embedding grid and reading the node's cell: ``tree_terms`` computes every node of every scale
that way, without a host read (docs/design.md section 15).

Where it enters: after the patch embedding and its ``embed_norm`` (timm's ``patch_embed.norm``),
before the position embedding and the straight-through scaling. The sub-patch embeddings are the
fine tokens' embeddings before their position (``embed_norm(embed(pixels))``). As in APT's
``TokenizedZeroConvPatchAttn.forward`` (src/models/patch_embed.py): ``embed_scale =
zero_conv(patch_attn(full_patches)) + embed_scale + pos_embed``, where ``full_patches`` are the
sub-patches through ``patch_embed.forward_patch`` (its projection and its norm), ``patch_attn`` a
2x2 stride-2 ``nn.Conv2d`` and ``zero_conv`` an ``nn.Linear`` with zeroed weight and bias.

Initialisation: the conv keeps PyTorch's default (Kaiming-uniform weights and bias); the linear
layer's weight and bias are zero, so its output, and the change to every coarse token, is exactly
0 until training moves it. The conv's gradient is 0 while the linear weight is 0; the linear
layer learns first.
"""

import torch
from torch import Tensor, nn

from msvit_kernels.reference import patchify
from msvit_kernels.varlen import MixedScaleIndex, fine_cells_of_regions

AGGREGATIONS = ("shared", "zero_conv")


class ZeroConvAggregation(nn.Module):
    """``Linear_0(Conv_rxr(E))`` of each coarse token's sub-patch embeddings E (module docstring).

    Args:
        dim: the embedding width d; ratio: r = S_c / S_f (an integer >= 1).
    """

    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(dim, dim, kernel_size=ratio, stride=ratio)
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sub: Tensor) -> Tensor:
        """sub ``[K, r*r, d]``: the sub-patch embeddings of K coarse tokens, raster order inside the
        region -> ``[K, d]``, the term added to each coarse token's embedding."""
        k, _, d = sub.shape
        grid = sub.transpose(1, 2).reshape(k, d, self.ratio, self.ratio)
        return self.linear(self.conv(grid).flatten(1))

    def tree_terms(self, fine: Tensor, scales: int) -> Tensor:
        """fine ``[B, d, h0, w0]``: the embeddings of every finest cell on their grid -> ``[B, N_1 +
        ... + N_{S-1}, d]``: the term of every node of scales 1 .. S-1 (scale by scale, raster order
        in each; ``ScaleTree``'s node table after its finest rows): the conv applied s times, then
        the linear layer (module docstring)."""
        terms, grid = [], fine
        for _ in range(1, scales):
            grid = self.conv(grid)
            terms.append(self.linear(grid.flatten(2).transpose(1, 2)))
        return torch.cat(terms, 1)

    def macs_per_token(self) -> int:
        """MACs of the conv and the linear layer for one coarse token (the sub-patch embeddings are
        the patch embedding's: ``msvit.models.flops`` counts them with it); with more than two
        scales, for every node of a scale >= 1 (``tree_terms``)."""
        return self.conv.weight.numel() + self.linear.weight.numel()


def sub_patch_pixels(images: Tensor, regions: Tensor, fine_patch: int, ratio: int) -> Tensor:
    """Pixels ``[K * r*r, C*p*p]`` ((C, p, p) order) of the r x r fine sub-patches of the flat
    regions ``regions`` (int64 ``[K]``, ``b * Nc + j``), region by region, raster order inside it."""
    b, _, h, w = images.shape
    fine_grid = (h // fine_patch, w // fine_patch)
    coarse_grid = (fine_grid[0] // ratio, fine_grid[1] // ratio)
    n_regions = coarse_grid[0] * coarse_grid[1]
    cells = fine_cells_of_regions(coarse_grid, ratio, images.device, fine_grid[1])  # [Nc, r*r]
    image = torch.div(regions, n_regions, rounding_mode="floor")
    rows = image[:, None] * (fine_grid[0] * fine_grid[1]) + cells[regions % n_regions]
    return patchify(images, fine_patch).flatten(0, 1).index_select(0, rows.flatten())


def packed_regions(hard: Tensor, index: MixedScaleIndex, fixed: int, ratio: int) -> Tensor:
    """int64 ``[K]``: the flat regions whose coarse token a packed batch holds, without a host read.

    hard: bool ``[B, Nc]`` (True = fine); fixed: rows per image outside the regions (prefix and
    border cells). The host already knows T (``index.total``), and T = B * fixed + B*Nc +
    (r*r - 1) * (fine regions), so K = B*Nc - (fine regions) follows from it; a stable sort puts
    the coarse regions first. Where T does not tell the count (padding rows of a static shape, or
    r = 1) every region is aggregated: padding entries name region 0 of image 0 (``varlen``), and
    the count of coarse regions is on the device only.
    """
    n_regions = hard.numel()
    if index.padding_sequences or ratio == 1:
        return torch.arange(n_regions, device=hard.device)
    fine = (index.total - hard.shape[0] * fixed - n_regions) // (ratio * ratio - 1)
    return torch.argsort(hard.flatten().to(torch.uint8), stable=True)[: n_regions - fine]


def per_entry(values: Tensor, regions: Tensor, index: MixedScaleIndex, n_regions: int) -> Tensor:
    """``[Np, d]``: each packed patch token's aggregation term: ``values[i]`` (``[K, d]``, of region
    ``regions[i]``) on the coarse tokens (and padding entries), 0 on fine tokens."""
    slot = torch.zeros(n_regions, dtype=torch.long, device=regions.device)
    slot[regions] = torch.arange(regions.numel(), device=regions.device)
    found = values.index_select(0, slot[index.region.clamp_min(0)])  # border cells (-1) are fine
    return torch.where(index.is_fine[:, None], 0.0, found)
