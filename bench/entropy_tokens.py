"""Tokens per image the training-free entropy gate (APT) gives on scikit-image's photos, per threshold.

    python bench/entropy_tokens.py [--record | --out FILE.md] [--threads N]

MSViT-S/16,32 geometry at 224 px (49 regions of 32 px; a fine region gives 4 tokens, a coarse one 1;
cls included: 50 .. 197 tokens), the photos normalised as ``vit_small_patch16_224`` expects. The
entropies come from the torch reference (``msvit_kernels.reference.entropy_reference``, which the
Triton kernel matches), so the table is the same on every machine; it takes seconds on a CPU.
"""

import argparse
import sys
from pathlib import Path

import timm
import torch

import msvit
from msvit.data import normalize, sample_photos
from msvit.threads import add_threads_argument, use_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io is a module of bench/
from results_io import add_output_arguments, output_file  # noqa: E402

THRESHOLDS = (3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0)
BINS = (512, 256)  # APT's code's bins (the default), and one bin per 8-bit level


def table(model, names, images, bins: int) -> list:
    """Markdown lines: tokens per photo (rows) at every threshold (columns), and their mean."""
    model.gate.bins = bins
    entropy = model.gate.entropy(images)
    rows = {t: model.tokens_per_image(model.gate.fine(entropy - t), images=images) for t in THRESHOLDS}
    lines = [
        f"### {bins} bins",
        "",
        "| photo | entropy min / median / max | " + " | ".join(f"tau {t}" for t in THRESHOLDS) + " |",
        "|---|---|" + "---|" * len(THRESHOLDS),
    ]
    for i, name in enumerate(names):
        e = entropy[i]
        stats = f"{e.min():.2f} / {e.median():.2f} / {e.max():.2f}"
        lines.append(f"| {name} | {stats} | " + " | ".join(str(int(rows[t][i])) for t in THRESHOLDS) + " |")
    means = " | ".join(f"{rows[t].double().mean():.1f}" for t in THRESHOLDS)
    return lines + [f"| **mean** | | {means} |", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser, "entropy_tokens.md")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    try:
        out = output_file("entropy_tokens.md", args.record, args.out)
    except ValueError as error:
        parser.error(str(error))
    use_threads(args.threads)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)  # geometry and normalisation only
    model = msvit.from_timm(vit, gate="entropy", kernels="reference").eval()
    names, photos = sample_photos(224)
    images = normalize(photos, vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"])
    lines = [
        "# Entropy gate: tokens per image vs threshold (MSViT-S/16,32, 224 px, scikit-image photos)",
        "",
        "`python bench/entropy_tokens.py`. Tokens per image, cls included: 1 + 49 regions + 3 per fine "
        "region (50 all coarse, 197 all fine = ViT-S/16). A region is fine when the entropy (bits) of its "
        "grey-level histogram reaches tau (H >= tau; APT's two-scale tau is 5.5), binned as APT's released "
        "code bins it: the 8-bit levels k of the un-normalised pixels, grey = 0.2989 k_R + 0.587 k_G + "
        "0.114 k_B, bin = trunc(grey * bins / 255) (torch.histc over [0, 255]; docs/design.md section 15). "
        f"torch {torch.__version__}, timm {timm.__version__}; the torch reference computes the entropies.",
        "",
    ]
    for bins in BINS:
        lines += table(model, names, images, bins)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}" + ("" if args.record else " (not the committed bench/results/: --record writes that)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
