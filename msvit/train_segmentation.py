"""``msvit train --task segmentation``: train an MSSegmenter (MSViT backbone + Segmenter decoder).

Data (``--data``):
  * ``cluttered-digits`` (default): the dense variant of the built-in digits, 11 classes
    (0 = background, 1 + d = digit d on its pixels).
  * a folder laid out as::

        ROOT/train/images/NAME.png (or .jpg/.jpeg)   ROOT/train/labels/NAME.png
        ROOT/val/images/...                          ROOT/val/labels/...
        ROOT/classes.txt   optional, one class name per line (else pass --num-classes)

    A label map is a single-channel PNG with the image's stem whose pixel values are class ids
    (0..K-1); 255 marks unlabelled pixels (ignored by the loss and the metrics). Images and label
    maps are resized to --image-size (bilinear / nearest).

The options of ``msvit train`` (model, optimizer, schedule, gate loss, ...; see ``msvit train
--help``) apply too; ``--mode``/``--gate-mode`` must stay ``packed`` and ``--crop`` ``none``. The metric is mIoU
(per-class IoU logged as ``val_iou_<class>``); metrics go to ``metrics.jsonl``/``.csv`` and the
segmenter to a crash-safe run folder like classification's (``msvit.run_folder``; load it with
``msvit.segmentation.load_segmenter``), and ``--resume`` continues it the same way.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from . import resume_state, run_folder
from . import train as base
from .checkpoint import load_checkpoint
from .data import DenseClutteredDigits
from .flag_checks import Range, check_ranges
from .sample_images import normalize
from .segmentation import (DECODERS, IGNORE_INDEX, MSSegmenter, confusion_matrix, iou_metrics, save_segmenter,
                           segmenter_config)
from .train_data import DIGITS, DataBundle, loaders

TASKS = ("classification", "segmentation")
SEGMENTATION_RANGES = {"decoder_depth": Range(0), "decoder_heads": Range(1), "decoder_dim": Range(1),
                       "budget": Range(0, 1), "num_classes": Range(1)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def split_task(argv=None):
    """(task, the other arguments) from ``msvit train`` arguments; ``--task`` defaults to classification."""
    argv = list(sys.argv[1:] if argv is None else argv)
    task, rest, i = "classification", [], 0
    while i < len(argv):
        if argv[i] == "--task" or argv[i].startswith("--task="):
            value = argv[i].partition("=")[2] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in argv[i] else 2
            if value not in TASKS:
                raise SystemExit(f"msvit train: --task must be one of {', '.join(TASKS)}, got {value!r}")
            task = value
            continue
        rest.append(argv[i])
        i += 1
    return task, rest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="msvit train --task segmentation", add_help=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=DECODERS, default="linear", help="Segmenter decoder: linear or mask transformer")
    p.add_argument("--decoder-depth", type=int, default=2, help="mask decoder: transformer layers")
    p.add_argument("--decoder-heads", type=int, default=None, help="mask decoder: heads (default width // 64)")
    p.add_argument("--decoder-dim", type=int, default=None, help="mask decoder: width (default: the backbone's)")
    p.add_argument("--freeze-gate", action=argparse.BooleanOptionalAction, default=True,
                   help="frozen gate with eval decisions (the paper's setting); --no-freeze-gate trains it")
    p.add_argument("--budget", type=float, default=None, help="frozen gate: fraction of regions kept fine per image")
    p.add_argument("--init", default=None, help="classification checkpoint folder to start backbone and gate from")
    p.add_argument("--num-classes", type=int, default=None, help="folder data without classes.txt: number of classes")
    own, rest = p.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(p.format_help() + "\nthe options of msvit train follow:\n")
    # Segmentation defaults for shared options go first: a value the user gives comes later and wins.
    args = base.parse_args(["--smoothing", "0"] + rest)
    vars(args).update(vars(own))
    if args.mode != "packed" or getattr(args, "gate_mode", None) not in (None, "packed") or args.crop != "none":
        p.error("segmentation runs packed (--mode/--gate-mode packed) without crop augmentation (--crop none)")
    check_ranges(p, args, SEGMENTATION_RANGES)
    if args.budget is not None and not args.freeze_gate:
        p.error("--budget applies to a frozen gate only")
    if args.init is not None and not Path(args.init).is_dir():
        p.error(f"--init {args.init}: no such folder (a classification checkpoint folder is expected)")
    return args


class SegmentationTensors(Dataset):
    """uint8 images ``[N, 3, H, W]`` and label maps ``[N, H, W]`` (255 = ignore) in memory.
    Items: (float32 image in [0, 1], int64 map); ``hflip`` flips both together."""

    def __init__(self, images, maps, hflip: bool = False):
        self.images, self.maps, self.hflip = images, maps, hflip

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i):
        return joint_flip(self.images[i].float() / 255, self.maps[i].long(), self.hflip)


def joint_flip(image, label_map, hflip: bool):
    if hflip and torch.rand(()) < 0.5:
        return image.flip(-1), label_map.flip(-1)
    return image, label_map


def materialize_dense(ds: DenseClutteredDigits, desc: str, show: bool) -> SegmentationTensors:
    """Generate every image and map once (an epoch then costs no generation)."""
    images = torch.empty(len(ds), 3, *ds.image_size, dtype=torch.uint8)
    maps = torch.empty(len(ds), *ds.image_size, dtype=torch.uint8)
    for i in tqdm(range(len(ds)), desc=desc, unit="img", disable=not show, leave=False):
        image, maps[i] = ds[i]
        images[i] = (image * 255).round().to(torch.uint8)
    return SegmentationTensors(images, maps)


class SegmentationFolder(Dataset):
    """``split/images/*`` with ``split/labels/<stem>.png`` (see the module docstring), resized to ``size``."""

    def __init__(self, split_dir, size, num_classes: int, hflip: bool = False):
        split_dir = Path(split_dir)
        images = sorted(p for p in (split_dir / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"no images (*.png, *.jpg) in {split_dir / 'images'}")
        missing = [p.name for p in images if not (split_dir / "labels" / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in {split_dir / 'images'} have no label map "
                                    f"labels/<stem>.png, e.g. {', '.join(missing[:3])}")
        self.images, self.size, self.num_classes, self.hflip = images, tuple(size), num_classes, hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        path = self.images[i]
        label_path = path.parent.parent / "labels" / f"{path.stem}.png"
        label = np.array(Image.open(label_path))
        if label.ndim != 2:
            raise ValueError(f"{label_path}: label maps must be single-channel (class ids), got shape {label.shape}")
        wrong = label[(label != IGNORE_INDEX) & (label >= self.num_classes)]
        if wrong.size:
            raise ValueError(f"{label_path}: label {int(wrong.max())} is not a class id below {self.num_classes} "
                             f"nor {IGNORE_INDEX} (ignore)")
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        label = F.interpolate(torch.from_numpy(label.astype(np.int64))[None, None].float(), size=self.size,
                              mode="nearest")[0, 0].long()
        return joint_flip(image.clamp(0, 1), label, self.hflip)


def build_segmentation_data(args, show: bool) -> DataBundle:
    """Train/val datasets of ``--data`` (the dense digits or a folder) as a ``DataBundle``."""
    size = (args.image_size, args.image_size)
    if args.data == DIGITS:
        options = {"digit_scale": tuple(args.digit_scale)} if args.digit_scale else {}
        train = materialize_dense(DenseClutteredDigits(args.train_size, size, seed=args.seed, split="train", **options),
                                  "generating train", show)
        val = materialize_dense(DenseClutteredDigits(args.val_size, size, seed=args.seed + 1, split="val", **options),
                                "generating val", show)
        train.hflip = bool(args.hflip)  # digits are not mirror-symmetric: off unless asked for
        return DataBundle(train, val, DenseClutteredDigits.classes, size, (0.5,) * 3, (0.5,) * 3, None)
    root = Path(args.data)
    if not (root / "train" / "images").is_dir() or not (root / "val" / "images").is_dir():
        raise FileNotFoundError(f"--data must be {DIGITS!r} or a folder with train/images, train/labels, "
                                f"val/images and val/labels; got {root}")
    if (root / "classes.txt").is_file():
        classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
    elif args.num_classes:
        classes = [str(c) for c in range(args.num_classes)]
    else:
        raise ValueError(f"{root} has no classes.txt: pass --num-classes")
    from .sample_images import IMAGENET_MEAN, IMAGENET_STD

    train = SegmentationFolder(root / "train", size, len(classes), hflip=args.hflip is not False)
    val = SegmentationFolder(root / "val", size, len(classes))
    return DataBundle(train, val, classes, size, IMAGENET_MEAN, IMAGENET_STD, None)


@torch.no_grad()
def evaluate_segmentation(model: MSSegmenter, loader, mean, std, device, classes, budget=None) -> dict:
    """mIoU, per-class IoU (``iou_<class>``), pixel accuracy, tokens per image and fine rate."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long, device=device)
    tokens, fine = [], []
    for images, maps in loader:
        out = model(normalize(images.to(device), mean, std), budget=budget, return_gate=True)
        confusion += confusion_matrix(out.logits.argmax(1), maps.to(device), len(classes))
        tokens.append(out.tokens.double())
        fine.append(out.gate.hard.double().mean(1))
    model.train(was_training)
    metrics = iou_metrics(confusion.cpu())
    per_class = {f"iou_{name}": value for name, value in zip(classes, metrics.pop("iou"))}
    return {**metrics, "tokens_per_image": torch.cat(tokens).mean().item(), "fine_rate": torch.cat(fine).mean().item(),
            **per_class}


def build_segmenter(args, bundle: DataBundle):
    """(segmenter, checkpoint config): a fresh backbone from the timm recipe, or ``--init``'s."""
    data_config = base.model_config(args, bundle.classes, bundle)
    if args.init:
        try:
            backbone, init_config = load_checkpoint(args.init)
        except (OSError, ValueError) as error:
            raise SystemExit(f"msvit train: --init {args.init}: {error}") from error
        backbone_config = {**init_config, "data": data_config["data"]}
    else:
        backbone, backbone_config = base.make_model(args, data_config), data_config
    decoder_kwargs = {} if args.decoder == "linear" else {
        "depth": args.decoder_depth, "heads": args.decoder_heads, "decoder_dim": args.decoder_dim}
    segmenter = MSSegmenter(backbone, len(bundle.classes), args.decoder, args.freeze_gate, decoder_kwargs)
    return segmenter, segmenter_config(backbone_config, segmenter, decoder_kwargs)


def train_segmentation(args) -> dict:
    """Run the training described by ``args`` (from ``parse_args``); returns the last epoch's metrics."""
    device, rank, world = base.setup_distributed(args.device)
    main_process = rank == 0
    torch.manual_seed(args.seed + rank)
    out = Path(args.out)
    checkpoint = run_folder.prepare(out, args.resume, args.overwrite, rank, world, device)
    bundle = build_segmentation_data(args, main_process)
    segmenter, config = build_segmenter(args, bundle)
    segmenter = segmenter.to(device).train()
    grid = (args.image_size // segmenter.backbone.tokenizer.coarse_patch,) * 2
    gate_loss = None if args.freeze_gate else base.make_gate_loss(args, grid)
    if isinstance(gate_loss, nn.Module):
        gate_loss.to(device)
    train_loader, sampler, val_loader = loaders(bundle, args.batch_size, args.workers, world > 1, args.seed)
    base.check_batches(train_loader, args.batch_size, world)
    opt, schedule = base.make_optimizer(args, segmenter, gate_loss, len(train_loader))
    start_epoch, step, rows = 0, 0, []
    if checkpoint is not None:
        start_epoch, step, rows = resume_state.restore(checkpoint, segmenter, opt, schedule, gate_loss,
                                                       train_loader.generator, args, rank, world)
    net = nn.parallel.DistributedDataParallel(segmenter) if world > 1 else segmenter
    amp = args.amp and device.type == "cuda"
    metrics = rows[-1] if rows else {}

    def train_step(images, maps, epoch: int) -> dict:
        mask = None  # a trainable gate starts after --gate-start-epoch; random mixed-scale masks until then
        if not args.freeze_gate and epoch < args.gate_start_epoch:
            mask = base.random_masks(len(images), grid[0] * grid[1], args.gate_target, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            result = net(normalize(images.to(device), bundle.mean, bundle.std), mask=mask, budget=args.budget,
                         return_gate=True)
            task = F.cross_entropy(result.logits.float(), maps.to(device), ignore_index=IGNORE_INDEX,
                                   label_smoothing=args.smoothing)
        gate = gate_loss(result.gate.soft.float()) if gate_loss is not None and mask is None else task.new_zeros(())
        loss = task + args.gate_lambda * gate
        base.optimizer_step(loss, segmenter, opt, schedule, args.clip_grad)
        return {"loss": loss, "task": task, "gate": gate, "fine": result.gate.hard.float().mean(),
                "tokens": result.tokens.float().mean()}

    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        started, sums = time.perf_counter(), {}
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", disable=not main_process)
        for n, (images, maps) in enumerate(bar, 1):
            for k, v in train_step(images, maps, epoch).items():
                sums[k] = sums.get(k, 0) + v.detach()  # summed on the device: no host sync per step
            step += 1
            if n % 20 == 0:
                bar.set_postfix(loss=f"{sums['loss'].item() / n:.3f}")
            if base.stop_early(args, step, n, len(train_loader)):
                break
        metrics = {"epoch": epoch + 1, "step": step, **{f"train_{k}": v.item() / n for k, v in sums.items()},
                   "lr": schedule.get_last_lr()[0], "epoch_seconds": time.perf_counter() - started}
        if main_process:
            evaluation = evaluate_segmentation(segmenter, val_loader, bundle.mean, bundle.std, device, bundle.classes,
                                               args.budget)
            metrics.update({f"val_{k}": v for k, v in evaluation.items()})
            tqdm.write(f"epoch {epoch + 1}: loss {metrics['train_loss']:.4f}  val mIoU {metrics['val_miou']:.4f}  "
                       f"pixel acc {metrics['val_pixel_acc']:.4f}  tokens/img {metrics['val_tokens_per_image']:.1f}")
        rows.append(metrics)
        base.save_epoch(out, epoch, segmenter, config, save_segmenter, complete=n == len(train_loader), step=step,
                        opt=opt, schedule=schedule, gate_loss=gate_loss, generator=train_loader.generator, rows=rows,
                        args=args, rank=rank, world=world)
        if args.max_steps and step >= args.max_steps:
            break
    if world > 1:
        torch.distributed.destroy_process_group()
    return metrics


def main(argv=None) -> None:
    train_segmentation(parse_args(argv))
