"""make demo: MSViT-S/16,32 on scikit-image's bundled photos.

Builds MSViT-S/16,32 from timm's ViT-S/16, decides each photo's mixed-scale mask, runs the packed
model, and prints per photo the tokens kept and the batch-1 latency of packed vs dense-masked MSViT
vs the plain ViT (median and range of --repeats interleaved runs, with a warning when the machine
looks busy); writes one PNG overlay of the mask per photo plus a grid of all of them, with a legend.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import msvit
from msvit.data.digits import ClutteredDigits
from msvit.data.loaders import materialize
from msvit.data.sample_images import normalize, sample_photos
from msvit.demo.table import latency_table
from msvit.io.checkpoint import load_pretrained
from msvit.threads import add_threads_argument, use_threads
from msvit.timing import interleaved_times, load_warning
from msvit.train.evaluate import evaluate
from msvit.visualize.draw import save_grid, save_overlay


def fit_gate_to_detail(model: msvit.MSViT, images: torch.Tensor, steps: int = 150) -> float:
    """Stand-in for a trained gate: fit the gate to mark regions whose pixel standard deviation is
    above the median over all photos as fine. Returns the final agreement with that target (0..1).

    The gate starts all-fine, and the backbone here has random weights (no download), so the
    paper's training has nothing to learn from; this gives the budgeted masks a readable ranking.
    """
    coarse = model.tokenizer.coarse_patch
    regions = F.unfold(images, coarse, stride=coarse).transpose(1, 2)  # [B, Nc, C*S*S]
    detail = regions.std(-1)
    target = (detail > detail.median()).float()
    optimizer = torch.optim.Adam(model.gate.parameters(), lr=3e-3)
    model.gate.train()
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model.gate(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.gate.eval()
    with torch.no_grad():
        return ((model.gate(images) > 0).float() == target).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="folder for the PNG overlays")
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (random weights)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="fraction of regions kept fine per photo (default: the gate's own decisions)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median and range)")
    add_threads_argument(parser)
    parser.add_argument("--heldout", type=int, default=1000, help="held-out digits to evaluate the shipped model on")
    args = parser.parse_args(argv)
    threads = use_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    import timm

    vit = timm.create_model(args.model, pretrained=False).eval()
    model = msvit.from_timm(vit).eval()
    names, photos = sample_photos(224)
    images = normalize(photos)
    print(f"MSViT from {args.model} (random weights: nothing is downloaded), {len(names)} scikit-image photos, 224px")
    print(f"untrained gate: {model.gate_mask(images).float().mean():.0%} of regions fine (it starts all-fine)")
    agreement = fit_gate_to_detail(model, images)
    print(f"gate fitted in a few seconds to a pixel-detail target ({agreement:.0%} agreement)")
    masks = model.gate_mask(images, budget=args.budget)
    how = "the gate's own decisions" if args.budget is None else f"a budget of {args.budget:.0%} of regions"
    print(f"masks: {how}; {masks.float().mean():.0%} of regions fine over all photos")
    tokens = model.tokens_per_image(masks, images=images)
    every = model.tokens_per_image(torch.ones_like(masks[:1]), images=images[:1]).item()  # all fine: the ViT's

    rows = []
    with torch.inference_mode():
        for i in tqdm(range(len(names)), desc="timing (batch 1)", unit="photo"):
            x, m = images[i : i + 1], masks[i : i + 1]
            runs = {
                "packed": lambda: model(x, mask=m),
                "masked": lambda: model(x, mask=m, mode="masked"),
                "vit": lambda: vit(x),
            }
            # interleaved: a busy spell slows the ViT of that photo too, which the table then flags
            rows.append((names[i], int(tokens[i]), interleaved_times(runs, args.repeats, "cpu")))
            save_overlay(
                out / f"{names[i]}.png",
                photos[i],
                masks[i],
                model.tokenizer.coarse_patch,
                model.tokenizer.fine_patch,
                f"{names[i]}: {int(tokens[i])} of {every} tokens",
            )
    save_grid(
        out / "all_masks.png",
        photos,
        masks,
        model.tokenizer.coarse_patch,
        model.tokenizer.fine_patch,
        [f"{n} ({t} of {every} tokens)" for n, t in zip(names, tokens.tolist())],
    )

    dense_tokens = 1 + model.gate_mask(images).shape[1] * 5
    print("\n" + "\n".join(latency_table(rows)))
    print(f"{threads} torch threads")
    busy = load_warning()
    if busy:
        print(busy)
    print(
        f"\npacked runs only the kept tokens; masked computes all {dense_tokens} (N_f + N_c + cls); "
        f"the ViT computes 197. Overlays: {out}/<photo>.png and {out}/all_masks.png"
    )
    trained_gate_demo(out, args.heldout)


def trained_gate_demo(out: Path, n_heldout: int) -> None:
    """The shipped cluttered-digits model: held-out accuracy, where its gate puts fine tokens, and
    mask overlays on held-out digits and on the photos."""
    try:
        model = load_pretrained("cluttered-digits")
    except ValueError as error:
        print(f"\n(no trained model: {error})")
        return
    data = model.pretrained_cfg["data"]
    size = tuple(data["image_size"])
    options = {"digit_scale": tuple(data["digit_scale"])} if data.get("digit_scale") else {}
    digits = ClutteredDigits(n_heldout, size, seed=10_000, split="val", **options)  # unseen source digits and renders
    heldout = materialize(digits, "held-out digits", True)
    loader = torch.utils.data.DataLoader(heldout, batch_size=100)
    metrics = evaluate(model, loader, data["mean"], data["std"], "cpu", boxes=heldout.boxes)
    print(f"\nshipped cluttered-digits model ({size[0]}x{size[1]}px, {n_heldout} held-out images of unseen digits):")
    all_fine = model.tokens_per_image(torch.ones(1, (size[0] // 16) * (size[1] // 16), dtype=torch.bool)).item()
    print(
        f"  top-1 {metrics['top1']:.1%}; {metrics['tokens_per_image']:.1f} tokens/image "
        f"(all-fine: {all_fine}); {metrics['fine_rate']:.0%} of regions fine"
    )
    print(
        f"  fine regions on the digit box: {metrics['fine_on_digit']:.0%} vs {metrics['digit_share']:.0%} "
        f"of all regions ({metrics['fine_digit_ratio']:.2f}x)"
    )
    images = torch.stack([heldout[i][0] for i in range(12)])
    with torch.no_grad():
        masks = model.gate_mask(normalize(images, data["mean"], data["std"]))
        predictions = model(normalize(images, data["mean"], data["std"]), mask=masks).argmax(1)
    titles = [f"label {heldout[i][1]}, predicted {p}" for i, p in enumerate(predictions.tolist())]
    save_grid(out / "digits_masks.png", images, masks, model.tokenizer.coarse_patch, model.tokenizer.fine_patch, titles)
    names, photos = sample_photos(size)
    with torch.no_grad():
        masks = model.gate_mask(normalize(photos, data["mean"], data["std"]))
    save_grid(
        out / "photos_digit_gate.png", photos, masks, model.tokenizer.coarse_patch, model.tokenizer.fine_patch, names
    )
    print(f"  overlays: {out}/digits_masks.png (held-out digits), {out}/photos_digit_gate.png (its gate on the photos)")


if __name__ == "__main__":
    main()
