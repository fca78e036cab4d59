"""Native resolution: images of many sizes and aspect ratios in one packed forward, against the
ways timm runs them. docs/design.md section 7 (targets) and section 11 (the layout).

    PYTHONPATH=. python bench/native_resolution.py [--record | --out DIR] [--device cuda] [--repeats N]

The set: scikit-image's bundled photos at their own aspect ratios (longer side 256, 384 or 512 px)
and crops of them from 3:1 to 1:3 (128 to 768 px), every side a multiple of 16; ViT-S/16 geometry,
random weights (timing only: nothing is downloaded). The images are grouped into batches of at
most ``--max-tokens`` tokens (``TokenBudgetBatchSampler``, in set order), the same batches for
every method, and every method runs the whole set per timed call:

- ``msvit_all_fine``: MSViT packed, every region fine, each batch a list: one forward per batch,
  no padding row, no masked attention.
- ``msvit_entropy_2`` / ``msvit_entropy_3``: the same with APT's entropy gate (two scales at 5.5
  bits; three scales 16/32/64 px at (6.0, 4.0)), the gate inside the timed call.
- ``naflexvit_padded``: timm's NaFlexViT (same trunk shape), each batch patchified and padded to
  its longest image as timm's NaFlex collator does (``patch_valid`` masks the padding); the
  patchify is loader work, done before timing.
- ``vit_one_by_one``: timm's ViT (``dynamic_img_size=True``) on each image alone, at its size.
- ``vit_square``: timm's ViT on square resizes (the usual pipeline: every image resized to one
  square with about the set's mean patch count, batched by the same token budget); other pixels,
  so a reference, not the same work.

Targets (docs/design.md section 7): all-fine packed >= 1.2x NaFlexViT's images per second, and
within 1.05x of the one-by-one ViT's time. Peak memory: on CUDA ``max_memory_allocated`` per
method (on CPU not measured: see ``peak_memory``). Writes ``native_resolution.{md,json}`` into
``<results root>/<device slug>/`` (``--record``: bench/results/, else ``--out`` or
bench/results-local/).
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io and naflex are modules of bench/

import msvit  # noqa: E402
from msvit.data import normalize  # noqa: E402
from msvit.data.native import TokenBudgetBatchSampler, image_tokens  # noqa: E402
from msvit.data.sample_images import SAMPLE_PHOTOS  # noqa: E402
from msvit.threads import add_threads_argument, use_threads  # noqa: E402
from msvit.timing import interleaved_times, quartiles  # noqa: E402

from naflex import naflex_like  # noqa: E402
from results_io import device_slug, environment, results_root  # noqa: E402

MODEL, PATCH = "vit_small_patch16_224", 16
PHOTO_SIDES = (256, 384, 512)  # longer side of the photos at their own aspect ratios, in turn
# (aspect ratio W/H, longer side): panoramas and portraits cut from the photos
CROPS = ((3.0, 768), (2.0, 512), (1.5, 384), (1 / 3, 384), (0.5, 256), (1 / 1.5, 512), (3.0, 384), (1.0, 128))
APT_TWO, APT_THREE = (5.5,), (6.0, 4.0)


def _snap(v: float) -> int:
    return max(PATCH, int(round(v / PATCH)) * PATCH)


def _resize(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def mixed_set() -> List[Tuple[str, torch.Tensor]]:
    """(name, float [3, H, W] in [0, 1]) of the benchmark set, in a fixed order."""
    import skimage.data

    photos = {}
    for name in SAMPLE_PHOTOS:
        a = torch.from_numpy(getattr(skimage.data, name)()).float() / 255
        a = a[..., None].expand(-1, -1, 3) if a.dim() == 2 else a[..., :3]
        photos[name] = a.permute(2, 0, 1).contiguous()
    out = []
    for i, (name, image) in enumerate(photos.items()):
        h, w = image.shape[-2:]
        side = PHOTO_SIDES[i % len(PHOTO_SIDES)]
        scale = side / max(h, w)
        out.append((f"{name} (own ratio)", _resize(image, (_snap(h * scale), _snap(w * scale)))))
    names = list(photos)
    for i, (ratio, side) in enumerate(CROPS):
        image = photos[names[i % len(names)]]
        h, w = image.shape[-2:]
        ch, cw = (h, min(w, int(h * ratio))) if ratio >= w / h else (min(h, int(w / ratio)), w)
        y, x = (h - ch) // 2, (w - cw) // 2
        crop = image[:, y : y + ch, x : x + cw]
        size = (_snap(side / ratio), side) if ratio >= 1 else (side, _snap(side * ratio))
        out.append((f"{names[i % len(names)]} crop {ratio:.2g}:1", _resize(crop, size)))
    return out


def naflex_inputs(images: List[torch.Tensor]) -> dict:
    """timm NaFlex collator semantics: patches ``[B, N_max, P*P*C]`` in (ph, pw, C) order, (y, x)
    coordinates, ``patch_valid`` False on the padding up to the batch's longest image."""
    n_max = max((im.shape[1] // PATCH) * (im.shape[2] // PATCH) for im in images)
    c = images[0].shape[0]
    patches = images[0].new_zeros(len(images), n_max, PATCH * PATCH * c)
    coord = torch.zeros(len(images), n_max, 2, dtype=torch.long, device=images[0].device)
    valid = torch.zeros(len(images), n_max, dtype=torch.bool, device=images[0].device)
    for b, im in enumerate(images):
        gh, gw = im.shape[1] // PATCH, im.shape[2] // PATCH
        p = im.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # [C, gh, gw, P, P]
        patches[b, : gh * gw] = p.permute(1, 2, 3, 4, 0).reshape(gh * gw, -1)
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coord[b, : gh * gw] = torch.stack([ys.flatten(), xs.flatten()], -1).to(coord.device)
        valid[b, : gh * gw] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def build(device: str, dtype: torch.dtype, max_tokens: int):
    """(runs: method -> callable over the whole set, facts: tokens, batches, padding)."""
    named = mixed_set()
    images = [normalize(im[None])[0].to(device, dtype) for _, im in named]
    vit = timm.create_model(MODEL, pretrained=False, dynamic_img_size=True).eval().to(device, dtype)
    tokens = image_tokens([tuple(im.shape[-2:]) for im in images], PATCH, num_prefix=1)
    batches = list(TokenBudgetBatchSampler(tokens, max_tokens, shuffle=False))
    lists = [[images[i] for i in batch] for batch in batches]
    fine = msvit.from_timm(vit).eval().to(device, dtype)
    two = msvit.from_timm(vit, gate="entropy", entropy_thresholds=APT_TWO).eval().to(device, dtype)
    three = msvit.from_timm(vit, scales=(16, 32, 64), gate="entropy", entropy_thresholds=APT_THREE)
    three = three.eval().to(device, dtype)
    all_fine = [[torch.ones(d, dtype=torch.bool, device=device) for d in fine.batch_of(ims).decisions] for ims in lists]
    naflex = naflex_like(fine).eval().to(device, dtype)
    naflex_batches = [naflex_inputs(ims) for ims in lists]
    side = _snap(math.sqrt(statistics.mean(t - 1 for t in tokens)) * PATCH)
    squares = torch.stack([_resize(im.float(), (side, side)).to(dtype) for im in images])
    per_square = max_tokens // (1 + (side // PATCH) ** 2)

    def over(fn, groups):
        def run():
            with torch.inference_mode():
                return [fn(g) for g in groups]

        return run

    runs = {
        "msvit_all_fine": over(lambda g: fine(g[0], mask=g[1]), list(zip(lists, all_fine))),
        "msvit_entropy_2": over(two, lists),
        "msvit_entropy_3": over(three, lists),
        "naflexvit_padded": over(lambda g: naflex(g), naflex_batches),
        "vit_one_by_one": over(lambda im: vit(im[None]), images),
        "vit_square": over(vit, list(squares.split(per_square))),
    }
    with torch.inference_mode():
        kept_two = torch.cat([two(ims, return_gate=True).tokens for ims in lists])
        kept_three = torch.cat([three(ims, return_gate=True).tokens for ims in lists])
    padded = sum(len(b["patch_valid"][0]) * len(b["patch_valid"]) for b in naflex_batches)
    facts = {
        "images": len(images),
        "sizes": [list(im.shape[-2:]) for im in images],
        "names": [n for n, _ in named],
        "tokens_all_fine": sum(tokens),
        "tokens_entropy_2": int(kept_two.sum()),
        "tokens_entropy_3": int(kept_three.sum()),
        "naflex_padded_rows": padded + len(images),  # + one cls row per image
        "square_side": side,
        "tokens_square": len(images) * (1 + (side // PATCH) ** 2),
        "batches": [len(b) for b in batches],
        "max_tokens": max_tokens,
    }
    return runs, facts


def peak_memory(runs, device: str) -> Dict[str, float]:
    """CUDA: ``max_memory_allocated`` above the allocated memory before each method's call (MiB).
    Not on CPU: a process's peak resident set there is set by building the models, not by the
    forwards (measured: zero growth for every method), so it would say nothing."""
    out = {}
    if not device.startswith("cuda"):
        return out
    for method in runs:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runs[method]()
        torch.cuda.synchronize()
        out[method] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def memory(result: dict, method: str) -> str:
    mib = result["peak_mib"].get(method)
    return "CUDA only" if mib is None else f"{mib:.0f}"


def markdown(result: dict) -> str:
    f, env = result["facts"], result["environment"]
    lines = [
        f"# Native resolution: {env.get('device_name', result['device'])}",
        "",
        f"`{result['command']}`; torch {env.get('torch')}, {result['dtype']}, {f['images']} images "
        f"({min(min(s) for s in f['sizes'])} to {max(max(s) for s in f['sizes'])} px, aspect 1:3 to 3:1), "
        f"batches of at most {f['max_tokens']} tokens ({len(f['batches'])} batches: {f['batches']} images), "
        f"{result['repeats']} interleaved repetitions of the whole set, {result['threads']} threads; load average "
        f"{result['load_before']} before, {result['load_after']} after.",
        "",
        "| method | tokens (rows) | images/s | time per set (median, q1-q3) | peak memory MiB |",
        "|---|---|---|---|---|",
    ]
    rows = {
        "msvit_all_fine": f["tokens_all_fine"],
        "msvit_entropy_2": f["tokens_entropy_2"],
        "msvit_entropy_3": f["tokens_entropy_3"],
        "naflexvit_padded": f["naflex_padded_rows"],
        "vit_one_by_one": f["tokens_all_fine"],
        "vit_square": f["tokens_square"],
    }
    for method, t in result["times"].items():
        q = quartiles(t)
        lines.append(
            f"| {method} | {rows[method]} | {f['images'] / q['median']:.2f} | {q['median'] * 1e3:.0f} ms "
            f"({q['q1'] * 1e3:.0f}-{q['q3'] * 1e3:.0f}) | {memory(result, method)} |"
        )
    r = result["ratios"]
    lines += [
        "",
        "| target (docs/design.md section 7) | measured | goal | verdict |",
        "|---|---|---|---|",
        f"| all-fine packed images/s over NaFlexViT padded | {r['naflex_over_packed']:.3f}x | >= 1.2x | "
        f"{'met' if r['naflex_over_packed'] >= 1.2 else 'NOT met'} |",
        f"| all-fine packed time over one-by-one ViT | {r['packed_over_one_by_one']:.3f} | <= 1.05 | "
        f"{'met' if r['packed_over_one_by_one'] <= 1.05 else 'NOT met'} |",
        f"| entropy gate (2 scales) time over all-fine packed | {r['entropy_2_over_all_fine']:.3f} | "
        f"(tokens {f['tokens_entropy_2'] / f['tokens_all_fine']:.3f}) | - |",
        f"| entropy gate (3 scales) time over all-fine packed | {r['entropy_3_over_all_fine']:.3f} | "
        f"(tokens {f['tokens_entropy_3'] / f['tokens_all_fine']:.3f}) | - |",
        "",
        "Ratios are medians of per-repetition ratios (each pair ran back to back). NaFlexViT computes "
        f"{f['naflex_padded_rows']} rows for the {f['tokens_all_fine']} real tokens (padding to each "
        "batch's longest image); the square resize computes "
        f"{f['tokens_square']} tokens of other pixels ({f['square_side']} px squares).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device (cuda: bf16, else fp32)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch, every method")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of the whole set")
    p.add_argument("--record", action="store_true", help="write bench/results/<device>/ (committed)")
    p.add_argument("--out", default=None, help="results root instead of bench/results-local/")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    add_threads_argument(p)
    args = p.parse_args(argv)
    use_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    runs, facts = build(args.device, dtype, args.max_tokens)
    times = interleaved_times(runs, args.repeats, args.device)
    pair = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    result = {
        "command": "python bench/native_resolution.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": args.device,
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "environment": environment(args.device),
        "facts": facts,
        "times": times,
        "ratios": {
            "naflex_over_packed": pair("naflexvit_padded", "msvit_all_fine"),
            "packed_over_one_by_one": pair("msvit_all_fine", "vit_one_by_one"),
            "entropy_2_over_all_fine": pair("msvit_entropy_2", "msvit_all_fine"),
            "entropy_3_over_all_fine": pair("msvit_entropy_3", "msvit_all_fine"),
        },
        "peak_mib": {} if args.no_memory else peak_memory(runs, args.device),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    folder = results_root(args.record, args.out) / device_slug(args.device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "native_resolution.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "native_resolution.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {folder}/native_resolution.{{md,json}}")
    return result


if __name__ == "__main__":
    main()
