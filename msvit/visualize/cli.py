"""msvit visualize IMAGE... --out DIR: the gate's mixed-scale mask over each image (Fig. 1).

With --model TIMM_NAME: a timm ViT with APT's training-free entropy gate on your own photos, each
at its own aspect ratio (resized, never cropped, to multiples of the coarsest patch within
--max-side and --max-tokens; a line per photo says how). Random weights unless --pretrained FILE;
nothing is downloaded.

Otherwise it loads a checkpoint folder (msvit train: classification; msvit train --task
segmentation: a segmenter), or without --checkpoint the model shipped in the package
(msvit/pretrained/cluttered-digits). Each image is centre-cropped to the checkpoint's aspect ratio
(a line per image says so), resized to its image size and normalised with its mean/std; with
--max-patches N each image keeps its own aspect ratio instead (no crop, no common size: the largest
size with at most N fine patches whose sides are multiples of the coarsest patch) and the images
run as one list of different sizes (native resolution, docs/native_resolution.md).

Per image it writes <stem>_mask.png (fine regions as r x r cells, coarse ones filled) and, with
--segmentation, <stem>_segmentation.png (mask and predicted map side by side), plus all_masks.png.
"""

import argparse
import sys
from pathlib import Path

import torch

from msvit.data.native import ResizeToPatches
from msvit.data.sample_images import normalize, to_tensor_image
from msvit.io import checkpoint
from msvit.models.segmentation import is_segmenter_checkpoint, load_segmenter
from msvit.threads import add_threads_argument, use_threads
from msvit.visualize import timm_photos
from msvit.visualize.draw import save_grid, save_overlay, save_segmentation
from msvit.visualize.timm_photos import MAX_SIDE, MAX_TOKENS

BATCH = 32  # images per forward: bounds memory for long argument lists


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="msvit visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (png, jpg, ...)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped pretrained model)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="fraction of regions kept fine per image (default: the gate's own decisions)",
    )
    p.add_argument("--segmentation", action="store_true", help="also write the predicted map (segmenter checkpoint)")
    p.add_argument(
        "--max-patches",
        type=int,
        default=None,
        metavar="N",
        help="checkpoint models: keep each image's aspect ratio, at most N fine patches, no crop "
        "(default: centre-crop to the checkpoint's image size)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the forward: cpu (default), cuda, cuda:1, ...")
    add_threads_argument(p)
    timm_group = p.add_argument_group("a timm ViT with the entropy gate (instead of --checkpoint)")
    timm_group.add_argument(
        "--model", default=None, metavar="TIMM_NAME", help="timm ViT name, e.g. vit_base_patch16_224"
    )
    timm_group.add_argument("--pretrained", default=None, metavar="FILE", help="its weights (default: random weights)")
    timm_group.add_argument("--gate", choices=["entropy"], default="entropy", help="the gate (training-free: entropy)")
    timm_group.add_argument(
        "--entropy-threshold",
        type=float,
        nargs="+",
        default=None,
        metavar="BITS",
        help="fine where a region's grey-level entropy exceeds it; one per scale boundary (default: APT's)",
    )
    timm_group.add_argument(
        "--scales", type=int, nargs="+", default=None, metavar="PX", help="patch sizes, finest first, e.g. 16 32 64"
    )
    timm_group.add_argument(
        "--max-side", type=int, default=MAX_SIDE, help="longest side after resizing, px (default: %(default)s)"
    )
    timm_group.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_TOKENS,
        help="finest-scale tokens per photo at most (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.budget is not None and not 0 <= args.budget <= 1:
        p.error(f"--budget is a fraction of the regions in [0, 1], got {args.budget}")
    if args.max_patches is not None and args.max_patches < 1:
        p.error(f"--max-patches must be positive, got {args.max_patches}")
    check_model_flags(p, args, sys.argv[1:] if argv is None else argv)
    return args


def check_model_flags(p, args, argv) -> None:
    """--model and --checkpoint exclude each other; the timm flags need --model."""
    if args.model is None:
        typed = [
            f
            for f in ("--pretrained", "--gate", "--entropy-threshold", "--scales")
            if any(a.startswith(f) for a in argv)
        ]
        if typed:
            p.error(f"{', '.join(typed)} apply to --model TIMM_NAME (a timm ViT with the entropy gate)")
        return
    if args.checkpoint is not None:
        p.error("give --model TIMM_NAME or --checkpoint DIR, not both")
    if args.max_patches is not None:
        p.error("--max-patches applies to checkpoint models; --model keeps each photo's aspect (see --max-tokens)")
    if args.segmentation:
        p.error("--segmentation needs a segmenter checkpoint (--checkpoint DIR), not --model")
    if args.max_side < 1 or args.max_tokens < 1:
        p.error("--max-side and --max-tokens must be positive")


def load_model(folder, segmentation: bool, device):
    """(MSViT whose gate decides, segmenter or None, the checkpoint's ``pretrained_cfg``) from a
    folder or the shipped model."""
    if folder is None:
        try:
            model = checkpoint.load_pretrained("cluttered-digits", device)
        except ValueError as exc:
            raise SystemExit(
                f"msvit visualize: no --checkpoint given and {exc}; train a model "
                "(msvit train --out DIR) and pass --checkpoint DIR"
            ) from None
    elif is_segmenter_checkpoint(folder):
        segmenter = load_segmenter(folder, device)
        return segmenter.backbone, (segmenter if segmentation else None), segmenter.pretrained_cfg
    else:
        model = checkpoint.load_checkpoint(folder, device)
    if segmentation:
        raise SystemExit(
            "msvit visualize: --segmentation needs a segmentation checkpoint "
            "(msvit train --task segmentation --out DIR)"
        )
    return model, None, model.pretrained_cfg


def read_array(path: Path):
    """uint8 (or bool) ``HxW`` / ``HxWxC`` array of an image file (grey, RGB or RGBA)."""
    import skimage.io
    import skimage.util

    try:
        array = skimage.io.imread(path)
    except Exception as exc:  # skimage raises per-plugin error types
        raise SystemExit(f"msvit visualize: cannot read {path} as an image ({type(exc).__name__}: {exc})") from None
    if array.dtype != "uint8" and array.dtype != bool:
        array = skimage.util.img_as_ubyte(array)
    return array


def read_image(path: Path, size) -> torch.Tensor:
    """float ``[3, H, W]`` in [0, 1] at ``size`` from an image file, centre-cropped to its aspect
    ratio; prints how."""
    array = read_array(path)
    height, width = array.shape[:2]
    target = size[0] / size[1]
    crop = (height, round(height / target)) if height / width <= target else (round(width * target), width)
    crop = (min(crop[0], height), min(crop[1], width))
    cropped = f"centre-cropped to {crop[1]}x{crop[0]} and " if crop != (height, width) else ""
    print(f"{path.name}: {width}x{height} px {cropped}resized to {size[1]}x{size[0]} px (the model's input size)")
    return to_tensor_image(array, size)


def read_native(path: Path, tokenizer, max_patches: int) -> torch.Tensor:
    """float ``[3, H, W]`` in [0, 1] from an image file at its own aspect ratio: the largest size with
    at most ``max_patches`` fine patches whose sides are multiples of the coarsest patch (every region
    whole, as the masks are drawn); prints how."""
    photo = timm_photos.read_photo(path, read_array)
    fine, step = tokenizer.fine_patch, tokenizer.patch_sizes[-1]
    per_step = (step // fine) ** 2
    if max_patches < per_step:
        raise SystemExit(f"msvit visualize: --max-patches {max_patches} is below one {step} px region ({per_step})")
    resized = ResizeToPatches(step, max_patches // per_step, "bilinear")(photo)
    (height, width), (h, w) = photo.shape[-2:], resized.shape[-2:]
    how = f"aspect kept, at most {max_patches} patches of {fine} px, sides multiples of {step} px; nothing cropped"
    print(f"{path.name}: {width}x{height} px resized to {w}x{h} px ({how})")
    return resized


def unique_stems(paths):
    """Output name stems, with ``_2``, ``_3``... where two inputs share a file name."""
    seen, stems = {}, []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return stems


def fine_percent(model, mask, images) -> float:
    """The share of the image at the finest scale (two scales: of the regions kept fine)."""
    from msvit.train.evaluate import fine_cells

    return fine_cells(model, mask, images)[0].float().mean().item()


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    use_threads(args.threads)
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"msvit visualize: no such file: {', '.join(missing)}")
    out = Path(args.out)
    if args.model is not None:
        photos, masks, titles, model = timm_photos.run(args, paths, unique_stems(paths), read_array, fine_percent)
        out.mkdir(parents=True, exist_ok=True)
        coarse, fine = model.tokenizer.coarse_patch, model.tokenizer.fine_patch
        scales = model.tokenizer.scales
        for stem, photo, mask, title in zip(unique_stems(paths), photos, masks, titles):
            save_overlay(out / f"{stem}_mask.png", photo, mask, coarse, fine, title, scales)
        save_grid(out / "all_masks.png", photos, masks, coarse, fine, titles, min(4, len(paths)), scales)
        print(f"wrote {len(paths)} overlay(s) and all_masks.png to {out}")
        return
    model, segmenter, cfg = load_model(args.checkpoint, args.segmentation, args.device)
    data = cfg["data"]
    size = tuple(data["image_size"])
    coarse, fine = model.tokenizer.coarse_patch, model.tokenizer.fine_patch
    scales = getattr(model.tokenizer, "scales", 2)
    out.mkdir(parents=True, exist_ok=True)
    native = args.max_patches is not None  # a list of images of different sizes, else one batch
    if native:
        photos = [read_native(p, model.tokenizer, args.max_patches) for p in paths]
    else:
        photos = [read_image(p, size) for p in paths]
    masks, titles = [], []
    for start in range(0, len(paths), BATCH):
        chunk = photos[start : start + BATCH]
        if native:
            images = [normalize(photo[None].to(args.device), data["mean"], data["std"])[0] for photo in chunk]
        else:
            images = normalize(torch.stack(chunk).to(args.device), data["mean"], data["std"])
        mask = model.gate_mask(images, budget=args.budget)  # a list of masks for a list of images
        tokens = model.tokens_per_image(mask, images=images).tolist()
        labels = [m.argmax(0).cpu() for m in segmenter(images, mask=mask)] if segmenter is not None else None
        for i, stem in enumerate(unique_stems(paths)[start : start + BATCH]):
            height, width = chunk[i].shape[-2:]
            every = model.tokenizer.num_prefix + (height // fine) * (width // fine)  # all at the finest scale
            share = fine_percent(model, mask[i][None], images[i][None])
            title = f"{stem}: {tokens[i]} of {every} tokens, {share:.0%} fine"
            save_overlay(out / f"{stem}_mask.png", chunk[i], mask[i].cpu(), coarse, fine, title, scales)
            if labels is not None:
                save_segmentation(
                    out / f"{stem}_segmentation.png",
                    chunk[i],
                    mask[i].cpu(),
                    labels[i],
                    coarse,
                    fine,
                    segmenter.num_classes,
                    data.get("classes"),
                    title,
                    scales,
                )
            masks.append(mask[i].cpu())
            titles.append(title)
            print(title)
    save_grid(
        out / "all_masks.png",
        photos,
        masks,
        coarse,
        fine,
        titles,
        columns=min(4, len(paths)),
        scales=scales,
    )
    print(f"wrote {len(paths)} overlay(s){' and predicted maps' if segmenter is not None else ''} to {out}")


if __name__ == "__main__":
    main()
