"""The segmentation task of ``msvit train --task segmentation``: an MSSegmenter (MSViT backbone +
Segmenter decoder), per-pixel cross-entropy, mIoU on the held-out set."""

import argparse
from pathlib import Path

import torch

from msvit.data.sample_images import normalize
from msvit.io.checkpoint import load_checkpoint
from msvit.models.segmentation import (
    DECODERS,
    IGNORE_INDEX,  # noqa: F401  the label the task's loss skips
    MSSegmenter,
    confusion_matrix,
    iou_metrics,
    save_segmenter,
    segmenter_config,
)
from msvit.train.backbone import make_model, model_config
from msvit.train.flag_checks import GATE_TRAINING, Range, check_ranges
from msvit.train.segment_data import build_segmentation_data as build_data  # noqa: F401  the task's data

DESCRIPTION = """--task segmentation: an MSSegmenter (MSViT backbone + Segmenter decoder). Data (--data):
  * cluttered-digits (default): the dense variant of the built-in digits, 11 classes
    (0 = background, 1 + d = digit d on its pixels).
  * a folder laid out as::

        ROOT/train/images/NAME.png (or .jpg/.jpeg)   ROOT/train/labels/NAME.png
        ROOT/val/images/...                          ROOT/val/labels/...
        ROOT/classes.txt   optional, one class name per line (else pass --num-classes)

    A label map is a single-channel PNG with the image's stem whose pixel values are class ids
    (0..K-1); 255 marks unlabelled pixels (ignored by the loss and the metrics). Images and label
    maps are resized to --image-size (bilinear / nearest).

Segmentation runs packed (--mode/--gate-mode packed) without crop augmentation (--crop none); the
gate-training options need --no-freeze-gate. The metric is mIoU (per-class IoU logged as
val_iou_<class>); the segmenter is saved like a classifier (load it with
msvit.models.segmentation.load_segmenter)."""
DEFAULTS = {"smoothing": 0.0}
PROGRESS = ("val_miou", "val_pixel_acc", "val_tokens_per_image", "val_fine_rate")  # of the progress line
RANGES = {
    "decoder_depth": Range(0),
    "decoder_heads": Range(1),
    "decoder_dim": Range(1),
    "budget": Range(0, 1),
    "num_classes": Range(1),
}
# Flags that build the backbone: --init brings its own.
BACKBONE = (
    "model",
    "model_kwargs",
    "pretrained",
    "hub_pretrained",
    "coarse_patch",
    "scales",
    "gate",
    "gate_hidden",
    "gate_init_logit",
    "entropy_threshold",
    "entropy_bins",
    "entropy_binning",
)
save = save_segmenter


def add_options(group) -> None:
    group.add_argument(
        "--decoder", choices=DECODERS, default="linear", help="Segmenter decoder: linear or mask transformer"
    )
    group.add_argument("--decoder-depth", type=int, default=2, help="mask decoder: transformer layers")
    group.add_argument("--decoder-heads", type=int, default=None, help="mask decoder: heads (default: its width // 64)")
    group.add_argument("--decoder-dim", type=int, default=None, help="mask decoder: width (default: the backbone's)")
    group.add_argument(
        "--freeze-gate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="frozen gate with eval decisions (the paper's setting); --no-freeze-gate trains it",
    )
    group.add_argument(
        "--budget",
        type=float,
        default=None,
        help="frozen gate: fraction of regions kept fine per image (default: none, the gate's own decisions)",
    )
    group.add_argument(
        "--init",
        default=None,
        help="classification checkpoint folder to start backbone and gate from (default: none, a new "
        "backbone from --model)",
    )
    group.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="folder data without classes.txt: number of classes (default: the lines of classes.txt)",
    )


def check(parser, args) -> None:
    if args.mode != "packed" or args.gate_mode not in (None, "packed") or args.gate_mode_epochs or args.crop != "none":
        parser.error(
            "segmentation runs packed (--mode/--gate-mode packed, no --gate-mode-epochs) without crop "
            "augmentation (--crop none)"
        )
    check_ranges(parser, args, RANGES)
    if args.gate == "entropy" and not args.freeze_gate:
        parser.error("--no-freeze-gate trains the gate, and the entropy gate (--gate entropy) has nothing to train")
    if args.budget is not None and not args.freeze_gate:
        parser.error("--budget applies to a frozen gate only")
    changed = [k for k in GATE_TRAINING if getattr(args, k) != parser.get_default(k)]
    if args.freeze_gate and changed:
        parser.error(
            f"--{changed[0].replace('_', '-')} acts on a training gate; the segmentation gate is frozen "
            "(pass --no-freeze-gate to train it)"
        )
    overridden = [k for k in BACKBONE if getattr(args, k) != parser.get_default(k)]
    if args.init is not None and overridden:
        parser.error(
            f"--{overridden[0].replace('_', '-')} builds a backbone, but --init {args.init} brings its "
            "own: pass one or the other"
        )
    if args.init is not None and not Path(args.init).is_dir():
        parser.error(f"--init {args.init}: no such folder (a classification checkpoint folder is expected)")


def build_model(args, bundle):
    """(segmenter, checkpoint config): a fresh backbone from the timm recipe, or ``--init``'s."""
    data_config = model_config(args, bundle.classes, bundle)
    if args.init:
        try:
            backbone = load_checkpoint(args.init)
            init_config = backbone.pretrained_cfg["config"]
        except (OSError, ValueError) as error:
            raise SystemExit(f"msvit train: --init {args.init}: {error}") from error
        backbone_config = {**init_config, "data": data_config["data"]}
    else:
        backbone, backbone_config = make_model(args, data_config), data_config
    decoder_kwargs = (
        {}
        if args.decoder == "linear"
        else {"depth": args.decoder_depth, "heads": args.decoder_heads, "decoder_dim": args.decoder_dim}
    )
    segmenter = MSSegmenter(backbone, len(bundle.classes), args.decoder, args.freeze_gate, decoder_kwargs)
    return segmenter, segmenter_config(backbone_config, segmenter, decoder_kwargs)


def tokenizer(model):
    return model.backbone.tokenizer


def gate_trains(args) -> bool:
    return not args.freeze_gate


def forward(net, images, args, mode: str, mask):
    """``mode`` is always packed (``check``): the segmenter has no other."""
    return net(images, mask=mask, budget=args.budget, return_gate=True)


@torch.no_grad()
def evaluate(model: MSSegmenter, loader, bundle, args, device) -> dict:
    """mIoU, per-class IoU (``iou_<class>``), pixel accuracy, tokens per image and fine rate."""
    was_training = model.training
    model.eval()
    classes = bundle.classes
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long, device=device)
    tokens, fine = [], []
    for images, maps in loader:
        out = model(normalize(images.to(device), bundle.mean, bundle.std), budget=args.budget, return_gate=True)
        confusion += confusion_matrix(out.logits.argmax(1), maps.to(device), len(classes))
        tokens.append(out.tokens.double())
        fine.append(out.gate.hard.double().mean(1))
    model.train(was_training)
    metrics = iou_metrics(confusion.cpu())
    per_class = {f"iou_{name}": value for name, value in zip(classes, metrics.pop("iou"))}
    return {
        **metrics,
        "tokens_per_image": torch.cat(tokens).mean().item(),
        "fine_rate": torch.cat(fine).mean().item(),
        **per_class,
    }
