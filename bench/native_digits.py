"""Top-1 of digits models at several sizes and aspect ratios: does training at native resolution
(``--max-tokens-per-batch``, images of their own aspect ratios) help where square training does not
reach? Issue 27 item 5; docs/native_resolution.md ("Training").

    PYTHONPATH=. python bench/native_digits.py [--record | --out FILE.md] \
        --model shipped=cluttered-digits --model native=runs/digits-native [--images 2000]

Each ``--model LABEL=CHECKPOINT`` is a run folder, a checkpoint folder or a shipped name
(``msvit.load_checkpoint`` / ``msvit.load_pretrained``). The test sets: held-out cluttered digits
(``split="val"``, a seed no run trains or validates on) rendered at every ``--sizes`` H x W: by
default three heights (48, 64, 96 px; the shipped model trained at 64 x 64) at 1:1, 2:1 and 1:2
(width:height). Digits are sized relative to the shorter side (``--digit-scale``, the runs'), so a
2:1 image holds the digit of the square of its height and twice the clutter area. Every model
sees the same images (one set per size, built once), ``--batch-size`` at a time, eval mode, its
own gate (logit > 0), packed. ``--usual LABEL`` adds that model through the usual square pipeline,
``msvit.eval_transform(model)`` (timm's resize of the shorter side and centre crop to the size it
trained at): what a square-trained model sees when the images are not kept at their own size. Reported: top-1,
its binomial standard error, and tokens per image (prefix included). Accuracy does not depend on the
device, so the table goes to ``bench/results/native_digits.{md,json}`` (``--record``).
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io is a module of bench/

import msvit  # noqa: E402
from msvit.data import ClutteredDigits, normalize  # noqa: E402
from msvit.io.checkpoint import load_checkpoint, load_pretrained  # noqa: E402
from msvit.threads import add_threads_argument, use_threads  # noqa: E402

from results_io import add_output_arguments, environment, output_file  # noqa: E402

CELL = 16  # the digits models' coarse patch: every side a whole number of coarse regions
TEST_SEED = 7_000  # runs use --seed 0: train seed 0, val seed 1
DEFAULT_SIZES = ("48x48", "64x64", "96x96", "48x96", "64x128", "96x192", "96x48", "128x64", "192x96")


def load_model(spec: str) -> Tuple[str, str, torch.nn.Module]:
    """``LABEL=CHECKPOINT`` -> (label, checkpoint, model in eval mode)."""
    if "=" not in spec:
        raise SystemExit(f"--model takes LABEL=CHECKPOINT (a run folder or a shipped name), got {spec!r}")
    label, where = spec.split("=", 1)
    model = load_checkpoint(where) if Path(where).exists() else load_pretrained(where)
    return label, where, model.eval()


def parse_size(text: str) -> Tuple[int, int]:
    """``HxW`` -> (H, W), each side a whole number of 16 px cells."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HxW, e.g. 64x128; got {text!r}") from None
    if h <= 0 or w <= 0 or h % CELL or w % CELL:
        raise argparse.ArgumentTypeError(f"each side must be a positive multiple of {CELL} px, got {text!r}")
    return h, w


def test_set(size: Tuple[int, int], images: int, digit_scale) -> Tuple[Tensor, Tensor]:
    """``images`` held-out digits at ``size`` (H, W): pixels in [0, 1] ``[N, 3, H, W]`` and labels."""
    seed = TEST_SEED + size[0] * 1000 + size[1]
    data = ClutteredDigits(images, image_size=size, seed=seed, split="val", digit_scale=digit_scale)
    pixels = torch.stack([data[i][0] for i in range(images)])
    labels = torch.tensor([data[i][1] for i in range(images)])
    return pixels, labels


@torch.no_grad()
def evaluate(model, pixels: Tensor, labels: Tensor, batch_size: int, usual: bool = False) -> Dict[str, float]:
    """Top-1, its standard error and mean tokens per image of ``model`` on one test set (``usual``:
    through ``msvit.eval_transform(model)``, resized and centre-cropped to its training size)."""
    correct, tokens = 0, 0.0
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]  # the checkpoint's own
    square = msvit.eval_transform(model) if usual else None
    for start in range(0, len(labels), batch_size):
        chunk = pixels[start : start + batch_size]
        x = torch.stack([square(image) for image in chunk]) if usual else normalize(chunk, mean, std)
        out = model(x, return_gate=True)
        correct += int((out.logits.argmax(-1) == labels[start : start + batch_size]).sum())
        tokens += float(out.tokens.float().sum())
    top1 = correct / len(labels)
    return {"top1": top1, "stderr": math.sqrt(top1 * (1 - top1) / len(labels)), "tokens": tokens / len(labels)}


def markdown(rows: List[dict], models: List[Tuple[str, str]], meta: dict) -> str:
    lines = [
        "# Digits at native resolution: top-1 by size and aspect ratio",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['images']} held-out images per set (split val, seed {TEST_SEED} + 1000 H + W, digit scale "
        f"{meta['digit_scale']} of the shorter side), eval mode, packed, "
        f"each model's own gate; torch {meta['env']['torch']}, {meta['env']['device']}, {meta['env']['date']}.",
        "Top-1 in percent (binomial standard error), tokens per image (prefix included).",
        "",
        "| H x W | W:H | " + " | ".join(f"{label} top-1 | {label} tokens" for label, _ in models) + " |",
        "|---|---|" + "---|---|" * len(models),
    ]
    for row in rows:
        h, w = row["size"]
        cells = [f"{h} x {w}", f"{w / h:g}"]
        for label, _ in models:
            r = row[label]
            cells += [f"{100 * r['top1']:.1f} ({100 * r['stderr']:.1f})", f"{r['tokens']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Models:", ""] + [f"- `{label}`: `{where}`" for label, where in models]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="LABEL=CHECKPOINT (repeat)")
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in DEFAULT_SIZES], help="HxW")
    p.add_argument("--usual", action="append", default=[], help="LABEL: also through the square eval transform")
    p.add_argument("--images", type=int, default=2000, help="test images per set")
    p.add_argument("--digit-scale", type=float, nargs=2, default=[0.15, 0.3], help="as the runs' --digit-scale")
    p.add_argument("--batch-size", type=int, default=250)
    add_threads_argument(p)
    add_output_arguments(p, "native_digits.md")
    args = p.parse_args(argv)
    use_threads(args.threads)
    loaded = [load_model(spec) for spec in args.model]
    unknown = sorted(set(args.usual) - {label for label, _, _ in loaded})
    if unknown:
        p.error(f"--usual {unknown[0]}: no --model with that label")
    rows = []
    for size in tqdm(args.sizes, desc="sets", unit="set"):
        pixels, labels = test_set(size, args.images, tuple(args.digit_scale))
        row = {"size": list(size)}
        for label, _, model in loaded:
            row[label] = evaluate(model, pixels, labels, args.batch_size)
            if label in args.usual:
                row[label + " (resize+crop)"] = evaluate(model, pixels, labels, args.batch_size, usual=True)
        rows.append(row)
    models = [(label, where) for label, where, _ in loaded]
    models += [
        (label + " (resize+crop)", f"{where} through msvit.eval_transform")
        for label, where, _ in loaded
        if label in args.usual
    ]
    meta = {"command": "python bench/native_digits.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    meta.update(images=args.images, digit_scale=args.digit_scale, env=environment("cpu"))
    out = output_file("native_digits.md", args.record, args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, models, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": models, "rows": rows}, indent=1))
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
