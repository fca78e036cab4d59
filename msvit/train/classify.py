"""The classification task of ``msvit train``: an MSViT classifier, cross-entropy with label
smoothing, top-1 (and, on the digits, where the fine tokens go) on the held-out set."""

from msvit.data.loaders import build_data as build_image_data
from msvit.io.checkpoint import write_checkpoint
from msvit.train.backbone import coarsest_patch, make_model, model_config
from msvit.train.evaluate import evaluate as evaluate_classifier

DESCRIPTION = """--task classification (default): --data cluttered-digits (10 classes) or an ImageFolder root
with train/<class>/* and val/<class>/* (the same class folders in both)."""
DEFAULTS = {}
IGNORE_INDEX = -100  # cross_entropy's default: every label counts
# The held-out metrics of the progress line (the digits' boxes add the fine-on-digit ratio).
PROGRESS = ("val_top1", "val_tokens_per_image", "val_gmacs_per_image", "val_fine_rate", "val_fine_digit_ratio")
save = write_checkpoint


def add_options(group) -> None:
    """Classification has only the shared options."""


def check(parser, args) -> None:
    """Every shared option acts on classification."""


def build_data(args, show: bool):
    return build_image_data(
        args.data,
        args.image_size,
        args.crop,
        args.hflip,
        args.train_size,
        args.val_size,
        args.seed,
        show,
        digit_scale=args.digit_scale,
        shift=args.shift,
        native=native_options(args),
    )


def native_options(args):
    """``build_data``'s ``native`` of ``--max-tokens-per-batch``: images whose sides are whole
    coarsest patches (no border cells), at ``--aspect-ratios`` for the digits."""
    if not getattr(args, "max_tokens_per_batch", 0):
        return None
    return coarsest_patch(args), args.aspect_ratios or (0.5, 1.0, 2.0)


def build_model(args, bundle):
    config = model_config(args, bundle.classes, bundle)
    return make_model(args, config), config


def tokenizer(model):
    return model.tokenizer


def gate_trains(args) -> bool:
    return args.gate == "learned"  # the entropy gate has no weights and no gate loss


def forward(net, images, args, mode: str, mask):
    return net(images, mode=mode, return_gate=True, mask=mask)


def evaluate(model, loader, bundle, args, device) -> dict:
    return evaluate_classifier(model, loader, bundle.mean, bundle.std, device, boxes=bundle.val_boxes)
