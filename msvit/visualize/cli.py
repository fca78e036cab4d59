"""``msvit visualize IMAGE... --out DIR``: the gate's mixed-scale mask over each image (Fig. 1).

Loads a checkpoint folder (``msvit train``: classification; ``msvit train --task segmentation``:
a segmenter), or without ``--checkpoint`` the model shipped in the package
(``msvit/pretrained/cluttered-digits``). Each image is centre-cropped to the checkpoint's aspect
ratio, resized to its image size and normalised with its mean/std; then per image it writes
``<stem>_mask.png`` (fine regions as r x r cells, coarse ones filled) and, with ``--segmentation``,
``<stem>_segmentation.png`` (mask and predicted map side by side), plus ``all_masks.png``.
"""

import argparse
from pathlib import Path

import torch

from msvit.data.sample_images import normalize, to_tensor_image
from msvit.io import checkpoint
from msvit.models.segmentation import is_segmenter_checkpoint, load_segmenter
from msvit.visualize.draw import save_grid, save_overlay, save_segmentation

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
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.budget is not None and not 0 <= args.budget <= 1:
        p.error(f"--budget is a fraction of the regions in [0, 1], got {args.budget}")
    return args


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


def read_image(path: Path, size) -> torch.Tensor:
    """float ``[3, H, W]`` in [0, 1] at ``size`` from an image file (grey, RGB or RGBA)."""
    import skimage.io
    import skimage.util

    try:
        array = skimage.io.imread(path)
    except Exception as exc:  # skimage raises per-plugin error types
        raise SystemExit(f"msvit visualize: cannot read {path} as an image ({type(exc).__name__}: {exc})") from None
    if array.dtype != "uint8" and array.dtype != bool:
        array = skimage.util.img_as_ubyte(array)
    return to_tensor_image(array, size)


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
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"msvit visualize: no such file: {', '.join(missing)}")
    model, segmenter, cfg = load_model(args.checkpoint, args.segmentation, args.device)
    data = cfg["data"]
    size = tuple(data["image_size"])
    coarse, fine = model.tokenizer.coarse_patch, model.tokenizer.fine_patch
    scales = getattr(model.tokenizer, "scales", 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = torch.stack([read_image(p, size) for p in paths])
    masks, titles = [], []
    for start in range(0, len(paths), BATCH):
        chunk = photos[start : start + BATCH]
        images = normalize(chunk.to(args.device), data["mean"], data["std"])
        mask = model.gate_mask(images, budget=args.budget)
        tokens = model.tokens_per_image(mask, images=images).tolist()
        labels = segmenter(images, mask=mask).argmax(1).cpu() if segmenter is not None else None
        for i, stem in enumerate(unique_stems(paths)[start : start + BATCH]):
            title = f"{stem}: {tokens[i]} tokens, {fine_percent(model, mask[i : i + 1], images[i : i + 1]):.0%} fine"
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
        torch.stack(masks),
        coarse,
        fine,
        titles,
        columns=min(4, len(paths)),
        scales=scales,
    )
    print(f"wrote {len(paths)} overlay(s){' and predicted maps' if segmenter is not None else ''} to {out}")


if __name__ == "__main__":
    main()
