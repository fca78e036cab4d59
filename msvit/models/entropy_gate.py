"""APT's training-free entropy gate (Choudhury et al., *Accelerating Vision Transformers with
Adaptive Patch Sizes*, ICLR 2026): a region stays fine when its pixels' grey-level entropy is high.

A drop-in for ``MixedScaleGate`` in ``MSViT`` (same ``decide`` / ``decision`` / ``forward`` and
``region_size``, ``grid``, ``kernels`` attributes), with nothing to learn, so a pretrained ViT runs
mixed-scale without training: ``msvit.from_timm(name, gate="entropy", entropy_thresholds=(5.5,))``.

- logits: ``entropy - threshold`` in bits. A region is fine when ``H >= tau`` (``logit >= 0``):
  APT keeps a patch whole when ``H < tau`` (its ``select_patches_by_threshold``), so an entropy
  exactly at the threshold splits. With ``binning="continuous"`` (the rule of checkpoints saved
  before APT's binning was the default) it is fine when ``H > tau``, as the learned gate's logit.
- binning: ``"apt"`` (default) bins as APT's released code (8-bit levels, ``torch.histc``), so
  APT's thresholds keep APT's tokens; ``msvit_kernels.entropy_kernel`` says how, docs/design.md
  section 15 what was checked against APT's code.
- non-finite pixels: a region with a NaN or infinite pixel has entropy +inf: it is fine (never
  merged), and first in a budget; the NaN then reaches only that image's tokens.
- soft: None. There is no relaxed output, so the gate losses do not apply (the training loop
  skips them when ``soft`` is None); a threshold on a histogram has no useful gradient.
- st: the hard decision as a float with no gradient: training the ViT with this gate works, the
  task loss simply does not reach the gate (it has no parameters).
- sample is ignored: the decision is the same in training and evaluation.
- budget: the ``k`` highest-entropy regions of each image stay fine (``budget_mask`` on the logits).

Scales: APT compares one entropy per scale boundary with its own threshold, listed from the
finest boundary up (its ``select_patches_by_threshold`` gives the i-th smallest patch size above
the finest ``thresholds[i - 1]``: with 16/32/64 px and ``[6.0, 4.0]``, 32 px patches use 6.0 and
64 px ones 4.0). With two scales (fine S_f, coarse S_c) there is one boundary, so ``thresholds``
holds one value (APT's two-scale setting is 5.5), and the entropy is measured on the S_c regions.
More scales: ``msvit.models.tree_gate.TreeGate.entropy``, one ``EntropyGate`` (one
``patch_entropy`` call) per scale, thresholds in APT's order. A list of images of different sizes:
:func:`list_entropies` (one launch for every scale of the list, ``msvit.models.list_gates``).
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from msvit.data.sample_images import IMAGENET_MEAN, IMAGENET_STD
from msvit.models.gate import Budget, GateDecision, budget_mask, mask_decision
from msvit_kernels.dispatch import use_triton
from msvit_kernels.entropy_kernel import DEFAULT_BINS, check_entropy_args, list_patch_entropy, patch_entropy
from msvit_kernels.reference import entropy_flat_reference, entropy_reference
from msvit_kernels.tree_batch import TreeBatch

APT_THRESHOLD = 5.5  # APT's threshold for two scales
APT_THREE_SCALE_THRESHOLDS = (6.0, 4.0)  # APT's three scales, in its order: 2p px nodes 6.0, 4p px 4.0


class EntropyGate(nn.Module):
    """Fine where the grey-level entropy of a region exceeds the threshold (module docstring).

    Args:
        region_size: coarse patch size S_c in pixels (the entropy is that of S_c x S_c regions).
        grid: the coarse grid (h, w) of the size the model was built for (``MSViT.tokens_per_image``).
        thresholds: one entropy threshold (bits) per scale boundary: one value for two scales.
        mean, std: the normalisation of the images the model sees (one number per channel); the
            entropy is that of the un-normalised pixels in [0, 1].
        bins: grey-level histogram bins, a power of two up to 1024 (default 512, APT's code).
        in_chans: 3 (RGB, grey = BT.601 luma) or 1.
        binning: ``"apt"`` (default) or ``"continuous"`` (module docstring).

    Attribute ``kernels`` (``"auto" | "triton" | "reference"``, set by ``MSViT.kernels``): the Triton
    kernel (``msvit_kernels.entropy_kernel``) or the torch reference; auto = Triton on CUDA.
    """

    def __init__(
        self,
        region_size: int,
        grid: Tuple[int, int],
        thresholds: Sequence[float] = (APT_THRESHOLD,),
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        bins: int = DEFAULT_BINS,
        in_chans: int = 3,
        binning: str = "apt",
    ):
        super().__init__()
        if isinstance(thresholds, (int, float)) or len(thresholds) != 1:
            raise ValueError(
                f"entropy thresholds: one per scale boundary, and MSViT has two scales (one boundary), "
                f"so pass one value, e.g. (5.5,); got {thresholds!r}"
            )
        if isinstance(thresholds[0], bool) or not isinstance(thresholds[0], (int, float)):
            raise ValueError(f"an entropy threshold must be a number of bits, got {thresholds[0]!r}")
        if math.isnan(thresholds[0]):
            raise ValueError("an entropy threshold must be a number of bits, got NaN")
        self.region_size = region_size
        self.grid = tuple(grid)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.bins = bins
        self.binning = binning
        check_entropy_args(torch.empty(0, in_chans, region_size, region_size), region_size, mean, std, bins, binning)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.kernels = "auto"

    def macs_per_region(self) -> int:
        """0: un-normalising, the grey sum and the histogram are elementwise work (about ten
        operations per pixel), which ``msvit.count_macs`` leaves out as it leaves out norms."""
        return 0

    def whole_regions(self, images: Tensor) -> Tensor:
        """The pixels of the whole regions (a view). The gate decides whole regions only: the border
        cells of a size that is not a whole number of regions are always fine (docs/design.md
        section 2), so their pixels are cut off before the histograms."""
        r = self.region_size
        return images[..., : images.shape[-2] // r * r, : images.shape[-1] // r * r]

    def entropy(self, images: Tensor) -> Tensor:
        """float32 ``[B, Nc]``: the grey-level entropy (bits) of every coarse region."""
        images = self.whole_regions(images)
        if use_triton(self.kernels, images):
            return patch_entropy(images, self.region_size, **self._options()).entropy
        return entropy_reference(images.detach(), self.region_size, self.mean, self.std, self.bins, self.binning)

    def _options(self) -> dict:
        return {"mean": self.mean, "std": self.std, "bins": self.bins, "binning": self.binning}

    def fine(self, logits: Tensor) -> Tensor:
        """The threshold decision of ``forward``'s logits: ``>= 0`` (APT's tie rule), or ``> 0``
        with ``binning="continuous"``. +inf (a non-finite region) is always fine."""
        return logits >= 0 if self.binning == "apt" else logits > 0

    def forward(self, images: Tensor, entropy: Optional[Tensor] = None) -> Tensor:
        """images ``[B, C, H, W]`` -> logits float32 ``[B, Nc]``: entropy minus the threshold
        (``entropy``: this gate's entropies when the caller computed them, e.g. ``TreeGate``)."""
        return (self.entropy(images) if entropy is None else entropy) - self.thresholds[0]

    def decide(
        self,
        images: Tensor,
        sample: bool = False,
        budget: Budget = None,
        noise: Optional[Tensor] = None,
        entropy: Optional[Tensor] = None,
    ) -> GateDecision:
        """Hard decisions for a batch: ``entropy >= threshold`` (``fine``), or with a ``budget`` the
        top-k entropies of each image (``budget_mask``: ties in raster order). ``sample`` and
        ``noise`` are accepted for the learned gate's interface and ignored: the decision is
        deterministic. ``entropy``: as in ``forward``."""
        del sample, noise
        images = self.whole_regions(images)
        if entropy is None and budget is None and use_triton(self.kernels, images):  # decisions from the kernel
            entropy, hard = patch_entropy(images, self.region_size, threshold=self.thresholds[0], **self._options())
            logits = entropy - self.thresholds[0]
        else:
            logits = self(images, entropy)
            hard = budget_mask(logits, budget) if budget is not None else self.fine(logits)
        return GateDecision(logits, None, hard, hard.to(images.dtype))

    def decision(self, images: Tensor, mask: Optional[Tensor], *, sample: bool, budget: Budget = None) -> GateDecision:
        """The caller's ``mask`` (bool ``[B, Nc]``) as a decision, or, when it is None, ``decide``."""
        if mask is None:
            return self.decide(images, sample=sample, budget=budget)
        return mask_decision(images, mask, self.region_size)

    def describe_architecture(self) -> dict:
        """What a checkpoint's ``config.json`` records of this gate (``msvit.io.architecture``)."""
        return {
            "type": "entropy",
            "thresholds": list(self.thresholds),
            "bins": self.bins,
            **binning_record(self.binning),
            "mean": list(self.mean),
            "std": list(self.std),
            "grid": list(self.grid),
        }

    def from_timm_kwargs(self) -> dict:
        """The ``msvit.from_timm`` keywords that rebuild this gate (a checkpoint's ``config["msvit"]``)."""
        return {
            "gate": "entropy",
            "entropy_thresholds": list(self.thresholds),
            "entropy_bins": self.bins,
            "entropy_binning": self.binning,
            "entropy_mean": list(self.mean),
            "entropy_std": list(self.std),
        }

    def extra_repr(self) -> str:
        return (
            f"region_size={self.region_size}, thresholds={self.thresholds}, bins={self.bins}, binning={self.binning!r}"
        )


def binning_record(binning: str) -> dict:
    """What an architecture record holds of the binning: nothing for ``"continuous"``, the rule of
    every entropy-gate checkpoint saved before the binning was recorded (so they still verify, and
    ``msvit.io.architecture.from_timm_options`` rebuilds them with it), else ``{"binning": ...}``."""
    return {} if binning == "continuous" else {"binning": binning}


def list_entropies(
    levels: Sequence[Tuple[int, EntropyGate]], pixels: Tensor, batch: TreeBatch, fine_patch: int, chans: int
) -> List[Tensor]:
    """The entropies of every node a list of images' entropy gates decide, float32 ``[N_s]`` per
    level, in global node order (``TreeBatch``): levels, ``(scale, gate)`` pairs, scales ascending
    ``1 .. S-1``; pixels: the list's flat pixel buffer (each ``[C, H_b, W_b]`` flattened in turn).

    Triton (``use_triton`` on the pixels): ``list_patch_entropy``, one launch for every level when the
    levels bin alike (as ``TreeGate.entropy`` builds them), else one per level. Torch:
    ``entropy_flat_reference``, the pixels binned once and each coarser level's histograms summed
    from its children's. Equal, node by node, to the entropies of each image alone."""
    first = levels[0][1]
    starts, ratio = batch.scale_starts, batch.trees[0].ratio
    alike = all(_binning_of(gate) == _binning_of(first) for _, gate in levels)
    groups = [levels] if alike else [[level] for level in levels]
    node_pixels = batch.node_pixels(fine_patch, chans, pixels.device)
    out: List[Tensor] = []
    for group in groups:
        low, high = group[0][0], group[-1][0]
        options = dict(zip(("mean", "std", "bins", "binning"), _binning_of(group[0][1])))
        if use_triton(first.kernels, pixels):
            nodes = range(starts[low], starts[high + 1])
            entropy = list_patch_entropy(pixels, node_pixels, nodes, fine_patch, chans, largest=ratio**high, **options)
            out += list(entropy.split([starts[s + 1] - starts[s] for s in range(low, high + 1)]))
        else:
            layout = batch.layout(pixels.device)
            merges = [
                (layout.parent[starts[s] : starts[s + 1]], starts[s + 2] - starts[s + 1]) for s in range(low, high)
            ]
            cells = torch.arange(starts[low], starts[low + 1], device=pixels.device)
            out += entropy_flat_reference(
                pixels,
                node_pixels,
                cells,
                fine_patch * ratio**low,
                chans,
                merges=merges,
                ratio=ratio,
                segment=fine_patch,
                **options,
            )
    return out


def _binning_of(gate: EntropyGate) -> tuple:
    return (gate.mean, gate.std, gate.bins, gate.binning)
