"""Semantic segmentation on mixed-scale tokens: Segmenter's decoders over an MSViT (Section 4.2.1).

The backbone runs packed (only the surviving tokens, varlen attention), then the tokens go back
onto the fine grid, each coarse token replicated over the r x r fine cells it covers
(Appendix E.1); the decoder sees an ordinary ``[B, h, w, C]`` feature map and does not change
(Strudel et al. 2021): a per-patch linear head, or a small mask transformer over the patch tokens
and K learned class embeddings. Logits are upsampled bilinearly to the image size.

The unpack runs the Triton kernel on CUDA and the torch reference elsewhere
(``msvit_kernels.unpack_kernel.unpack_to_grid``). A list of images of different sizes runs one
packed backbone forward and gives a list of maps, each at its image's own size
(docs/dense_tasks.md).
"""

from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvit.io.checkpoint import CONFIG, build_model, load_verified, resolve, write_checkpoint
from msvit.io.config_file import read_json_object
from msvit.io.recipe import segmenter_config  # noqa: F401  (re-exported: msvit train and the tests use it from here)
from msvit.models.checks import check_choice, check_images, check_mask_or_budget, is_image_list
from msvit.models.gate import Budget, GateDecision
from msvit.models.mixed_scale_vit import Images, MSViT, MSViTOutput, unpack_to_grid

DECODERS = ("linear", "mask")
IGNORE_INDEX = 255  # label value that counts nowhere: unlabelled pixels of a label map


SegmenterOutput = MSViTOutput  # the old name of the shared output type, kept for one release


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear layer per patch. ``[B, h, w, C] -> [B, K, h, w]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, grid: Tensor) -> Tensor:
        return self.head(grid).permute(0, 3, 1, 2)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: ``depth`` transformer layers over the h*w patch tokens and K
    learned class embeddings; each class's mask is the scalar product of the L2-normalised patch
    features with the L2-normalised class features, then LayerNorm over the classes.

    Args:
        dim: encoder width C; num_classes: K; decoder_dim: the decoder's width (default C);
        depth: transformer layers (Segmenter uses 2); heads: attention heads (default
        decoder_dim // 64, at least 1); mlp_ratio: hidden width of the layers' MLP.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        decoder_dim: Optional[int] = None,
        depth: int = 2,
        heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block  # timm's pre-norm block, as Segmenter's

        width = decoder_dim or dim
        heads = heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"decoder_dim {width} must be divisible by heads {heads}")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(dim, width)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj_patch = nn.Linear(width, width, bias=False)
        self.proj_classes = nn.Linear(width, width, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.class_embed, std=0.02)

    def forward(self, grid: Tensor) -> Tensor:
        b, h, w, _ = grid.shape
        x = torch.cat([self.proj_in(grid.flatten(1, 2)), self.class_embed.expand(b, -1, -1)], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        patches = F.normalize(self.proj_patch(x[:, : -self.num_classes]), dim=-1)
        classes = F.normalize(self.proj_classes(x[:, -self.num_classes :]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, h*w, K]
        return masks.transpose(1, 2).reshape(b, self.num_classes, h, w)


class MSSegmenter(nn.Module):
    """MSViT backbone + Segmenter decoder: images ``[B, 3, H, W]`` -> logits ``[B, K, H, W]``.

    Args:
        backbone: an ``MSViT``. Its classification head (and fc_norm) become Identity: a dense model
            has no use for them, and unused parameters would trouble DDP and the optimizer.
        num_classes: K.
        decoder: ``"linear"`` or ``"mask"`` (mask transformer); decoder_kwargs: options of
            ``MaskTransformerDecoder`` (decoder_dim, depth, heads, mlp_ratio).
        freeze_gate: True (the paper's setting, Section 4.2.1): the gate's weights get no
            gradient and its decisions are the eval ones (threshold or budget) even in training.
            False: the gate trains through the straight-through tokens (Gumbel-Sigmoid samples in
            training); add a gate loss on ``output.gate.soft``.
        unpack_backend: ``"auto"`` (Triton on CUDA, the torch reference elsewhere), ``"triton"``
            or ``"reference"``.
    """

    def __init__(
        self,
        backbone: MSViT,
        num_classes: int,
        decoder: str = "linear",
        freeze_gate: bool = True,
        decoder_kwargs: Optional[dict] = None,
        unpack_backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(backbone, MSViT):
            raise TypeError(f"backbone must be an msvit.MSViT (see msvit.from_timm), got {type(backbone).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_choice("decoder", decoder, DECODERS)
        if decoder == "linear" and decoder_kwargs:
            raise ValueError(f"the linear decoder takes no options, got decoder_kwargs={decoder_kwargs}")
        backbone.head = nn.Identity()
        backbone.fc_norm = nn.Identity()
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder_name = decoder
        self.decoder_kwargs = dict(decoder_kwargs or {})  # what a checkpoint records to rebuild it
        dim = backbone.tokenizer.embed.out_features
        self.decoder = (
            LinearDecoder(dim, num_classes)
            if decoder == "linear"
            else MaskTransformerDecoder(dim, num_classes, **(decoder_kwargs or {}))
        )
        self.freeze_gate = bool(freeze_gate)
        self.unpack_backend = unpack_backend
        backbone.gate.requires_grad_(not self.freeze_gate)

    @property
    def gate(self) -> nn.Module:
        """The backbone's gate (so optimizer helpers can give it its own parameter group)."""
        return self.backbone.gate

    def decide(self, images: Images, *, mask=None, budget: Budget = None) -> Optional[GateDecision]:
        """The frozen gate's eval decisions (no autograd graph), or None when the backbone decides.
        A list of images: flat decisions ``[sum D_b]``, as ``MSViT.decide`` gives them."""
        check_mask_or_budget(mask, budget)
        if mask is not None or not self.freeze_gate:
            return None  # the backbone validates the images and the mask
        with torch.no_grad():
            if is_image_list(images):  # the backbone checks the list
                return self.backbone._decide_list(images, None, budget, sample=False)
            tokenizer = self.backbone.tokenizer
            check_images(images, self.backbone.in_chans, tokenizer.fine_patch, tokenizer.patch_sizes[-1])
            return self.backbone.gate.decide(images, sample=False, budget=budget)

    def forward(self, images: Images, *, mask=None, budget: Budget = None, return_gate: bool = False):
        """Segment ``images [B, C, H, W]`` (normalised; H, W multiples of the patch size) into logits
        ``[B, K, H, W]``, or a list of ``[C, H_b, W_b]`` images of different sizes into a list of
        ``[K, H_b, W_b]`` maps, each at its image's size and equal to that image segmented alone.

        mask: optional bool ``[B, Nc]`` (True = fine) overriding the gate (a list of images: a list
        of bool ``[D_b]``, as ``MSViT.forward``); budget: eval-style number (int) or fraction
        (float) of fine regions per image; return_gate: return a ``MSViTOutput`` instead of the logits.
        """
        frozen = self.decide(images, mask=mask, budget=budget)
        given = mask if frozen is None else self._as_mask(frozen, images)
        features = self.backbone.forward_features(images, mask=given, budget=None if given is not None else budget)
        grid = unpack_to_grid(features, backend=self.unpack_backend).grid
        if is_image_list(images):  # the decoder sees one image's grid at a time: its own size
            logits = [self._decode(part[None], image.shape[-2:])[0] for part, image in zip(grid, images)]
        else:
            logits = self._decode(grid, images.shape[-2:])
        if not return_gate:
            return logits
        index = features.index
        tokens = (index.cu_seqlens[1 : index.batch + 1] - index.cu_seqlens[: index.batch]).long()
        return MSViTOutput(logits, frozen if frozen is not None else features.gate, tokens)

    def _as_mask(self, decision: GateDecision, images: Images) -> Union[Tensor, List[Tensor]]:
        """The frozen decisions as the ``mask=`` the backbone takes (a list's: one entry per image)."""
        if is_image_list(images):
            return list(decision.hard.split(self.backbone.batch_of(images).decisions))
        return decision.hard

    def _decode(self, grid: Tensor, size: Sequence[int]) -> Tensor:
        """Fine-grid features ``[B, h, w, C]`` -> logits ``[B, K, H, W]`` at the image size."""
        return F.interpolate(self.decoder(grid), size=tuple(size), mode="bilinear", align_corners=False)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """int64 ``[K, K]``: entry (t, p) counts pixels of true class t predicted as p.

    pred, target: integer tensors of one shape (e.g. ``[B, H, W]``); target pixels equal to
    ``ignore_index`` (or outside [0, K)) are not counted.
    """
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    flat = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_metrics(confusion: Tensor) -> dict:
    """mIoU (mean over classes that occur in target or prediction), per-class IoU (None for
    classes that never occur) and pixel accuracy from a confusion matrix ``[K, K]``."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    iou = hits / union.clamp_min(1)
    return {
        "miou": iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": (hits.sum() / confusion.sum().clamp_min(1)).item(),
        "iou": [v if p else None for v, p in zip(iou.tolist(), present.tolist())],
    }


def save_segmenter(folder, segmenter: MSSegmenter, config: dict, point: str = "") -> Path:
    """``model.safetensors`` (the segmenter's state dict) and ``config.json`` (from ``segmenter_config``)."""
    if config.get("task") != "segmentation":
        raise ValueError("config must come from segmenter_config (it has no 'segmentation' section)")
    return write_checkpoint(folder, segmenter, config, point, build=build_segmenter)


def is_segmenter_checkpoint(folder) -> bool:
    path = resolve(folder) / CONFIG
    return read_json_object(path, "checkpoint config written by msvit").get("task") == "segmentation"


def build_segmenter(config: dict) -> MSSegmenter:
    """A segmenter with random weights in the architecture of a ``segmenter_config``."""
    if config.get("task") != "segmentation":
        raise ValueError("it holds a classification checkpoint; load it with msvit.load_checkpoint")
    return MSSegmenter(build_model(config), **config["segmentation"])


def load_segmenter(folder, map_location="cpu", verify: bool = True) -> MSSegmenter:
    """The segmenter in eval mode from a folder written by ``save_segmenter`` or a training run,
    with ``segmenter.pretrained_cfg`` as ``msvit.load_checkpoint``'s models; verified as they are."""
    return load_verified(folder, build_segmenter, verify).to(map_location).eval()
