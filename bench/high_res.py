"""Where mixed scales pay: high resolution. Tokens, whole-forward latency and the tokenizer of MSViT
with APT's training-free entropy gate at 384, 512 and 1024 px, against the timm ViT.

    PYTHONPATH=. python bench/high_res.py [--record | --out DIR] [--device cuda] [--parts ...]

1. tokens: tokens per image on scikit-image's photos (``msvit.data.sample_photos``, resized to each
   size) for ViT-B/16 geometry at 384, 512 and 1024 px: two scales (16/32 px) at tau in
   ``TAUS``; three scales (16/32/64 px) at the threshold pairs ``PAIRS`` (APT's and a sweep
   around it); the mean over photos, with the all-fine (= the ViT's) and all-coarse counts.
2. latency: whole forwards of ViT-S/16, ViT-B/16 and ViT-L/16 at 384 and 512 px, random weights: timm ViT
   at full tokens, MSViT packed with the entropy gate (two scales, tau 5.5; three scales, APT's
   thresholds) on one real photo with the gate inside the timed call, and the timm ViT at the
   MSViT's token count (the nearest grid, square or near-square, so a smaller image). CPU: fp32, batch 1 and
   ``--cpu-batch`` (default 4: the first photos), torch threads = torch's default, or ``--threads N``
   (1 on a machine shared with other work, where threads that wait on each other at every op make
   ratios measure the load). GPU: bf16, batch 1 and ``--batch`` (the photos repeated).
3. tokenizer: at 1024 px (ViT-B/16 geometry) the entropy gate, and gate + index + pack of the
   three- and two-scale models, against timm's patch_embed + pos_embed at full tokens (CPU: batch 1).

Timing: ``msvit.timing.interleaved_times`` (one warm-up call of every run, then interleaved
repetitions), medians and quartiles; a speed-up's spread comes from the per-repetition ratios.
Writes ``high_res.md`` and ``high_res.json`` into ``<results root>/<device slug>/``: the results
root is ``bench/results/`` with ``--record``, else ``--out DIR``, else ``bench/results-local/``
(``bench/results_io.py``). The entropy gate has no weights, so random weights give the real
token counts; nothing is downloaded.
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
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.layers import resample_abs_pos_embed
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io is a module of bench/

from high_res_report import APT_PAIR, TWO_SCALE_TAU, markdown  # noqa: E402

import msvit  # noqa: E402
from msvit.data import normalize, sample_photos  # noqa: E402
from msvit.models.flops import macs_for_tokens  # noqa: E402
from msvit.threads import add_threads_argument, use_threads  # noqa: E402
from msvit.timing import quartiles  # noqa: E402

from results_io import device_slug, environment, results_root  # noqa: E402
from spread import busy_report, interleaved_times  # noqa: E402

TOKEN_MODEL = "vit_base_patch16_384"  # the geometry (patch 16) and normalisation of the token table
TOKEN_SIZES = (384, 512, 1024)
TAUS = (4.5, 5.0, 5.5, 6.0, 6.5)  # two scales: fine where the 32 px region's entropy reaches tau (>=)
# Three scales: (tau at the 32 px nodes, tau at the 64 px nodes), the order of APT's list and of
# from_timm's entropy_thresholds (finest boundary first, msvit/models/tree_gate.py); a node splits
# when its entropy reaches its scale's tau. APT's (6.0, 4.0), each tau moved by 0.5, and the
# swapped pair (4.0, 6.0) (coarsest boundary first, the other reading of APT's list).
PAIRS = ((5.5, 3.5), (5.5, 4.0), (6.0, 3.5), APT_PAIR, (6.0, 4.5), (6.5, 4.0), (6.5, 4.5), (4.0, 6.0))
LATENCY_MODELS = ("vit_small_patch16_384", "vit_base_patch16_384", "vit_large_patch16_384")
LATENCY_SIZES = (384, 512)
TOKENIZER_SIZE = 1024
PHOTO = "astronaut"
# CPU repetitions per model: on a 2-core CPU ViT-L/16 at 512 px takes seconds per forward
CPU_REPEATS = {"vit_small_patch16_384": 9, "vit_base_patch16_384": 7, "vit_large_patch16_384": 5}
GPU_REPEATS = 20
TOKENIZER_REPEATS = {"cpu": 10, "cuda": 50}


# ---- models ----------------------------------------------------------------------------------


def timm_vit(name: str, size, source: Optional[torch.nn.Module] = None, **kwargs) -> torch.nn.Module:
    """timm ``name`` at ``size`` px (an int, or ``(H, W)``; eval, random weights, never downloaded).
    With ``source`` (the same architecture at another size) it takes the source's weights without a
    new random init: the parameters are shared and the position embedding is resampled as timm
    resamples it."""
    if source is None:
        return timm.create_model(name, pretrained=False, img_size=size, **kwargs).eval()
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, img_size=size, **kwargs)
    state = dict(source.state_dict())
    grid = vit.patch_embed.grid_size
    if tuple(grid) != tuple(source.patch_embed.grid_size):
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=grid, num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens
        )
    vit.load_state_dict(state, assign=True)
    return vit.eval()


def set_three_scale_thresholds(model, tau_32: float, tau_64: float) -> None:
    """Give each level of a 16/32/64 px entropy ``TreeGate`` its threshold by the patch size it
    gates, whatever order ``from_timm``'s ``entropy_thresholds`` takes them in."""
    by_size = {2 * model.tokenizer.fine_patch: float(tau_32), 4 * model.tokenizer.fine_patch: float(tau_64)}
    for level in model.gate.levels:
        level.thresholds = (by_size[level.region_size],)


def level_thresholds(model) -> Dict[str, float]:
    """``{"<patch size> px": tau}`` of every level of a model's entropy gate (what it really uses)."""
    levels = getattr(model.gate, "levels", [model.gate])
    return {f"{level.region_size} px": level.thresholds[0] for level in levels}


def mixed_scale(vit, scales: int, device: str, dtype: torch.dtype, pair=APT_PAIR, tau=TWO_SCALE_TAU):
    """MSViT with the entropy gate from ``vit``: two scales at ``tau`` or three at ``pair``
    (tau at 32 px, tau at 64 px). CPU: the torch reference kernels; CUDA: the default (Triton)."""
    kernels = "reference" if torch.device(device).type == "cpu" else "auto"
    if scales == 2:
        model = msvit.from_timm(vit, gate="entropy", entropy_thresholds=(tau,), kernels=kernels)
    else:
        p = vit.patch_embed.patch_size[0]
        model = msvit.from_timm(vit, scales=(p, 2 * p, 4 * p), gate="entropy", entropy_thresholds=pair, kernels=kernels)
        used = level_thresholds(model)
        if used != {f"{2 * p} px": pair[0], f"{4 * p} px": pair[1]}:
            raise AssertionError(f"entropy_thresholds={pair} gave the levels {used}: not (tau_2p, tau_4p)")
    return model.eval().to(device, dtype)


def photos_at(size, vit, names: Optional[Sequence[str]] = None) -> Tuple[List[str], torch.Tensor]:
    """scikit-image's photos at ``size`` px (an int, or ``(H, W)``), normalised as ``vit`` expects."""
    names, images = sample_photos(size) if names is None else sample_photos(size, names)
    return names, normalize(images, vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"])


def equal_grid(tokens: float, prefix: int = 1) -> Tuple[int, int]:
    """The grid ``(h, w)``, ``h <= w <= h + 2``, whose token count ``h * w + prefix`` is nearest
    ``tokens`` (ties: the squarer grid). Near-square rectangles make "equal tokens" equal: 463
    tokens (ViT-S at 384 px, three scales) is a 21 x 22 grid (463), where the nearest square
    (21 x 21: 442, the baseline before 2026-12-08) has 5% fewer tokens and MACs."""
    side = max(1, math.isqrt(max(int(tokens - prefix), 1)))
    candidates = [(h, w) for h in range(max(1, side - 2), side + 3) for w in range(h, h + 3)]
    return min(candidates, key=lambda g: (abs(g[0] * g[1] + prefix - tokens), g[1] - g[0]))


# ---- 1. tokens -------------------------------------------------------------------------------


def token_table(
    name: str = TOKEN_MODEL,
    sizes: Sequence[int] = TOKEN_SIZES,
    taus: Sequence[float] = TAUS,
    pairs: Sequence[Tuple[float, float]] = PAIRS,
    photo_names: Optional[Sequence[str]] = None,
) -> List[dict]:
    """One row per (size, scales, thresholds): mean tokens per image over the photos, per photo,
    and the all-coarse / all-fine counts. The model has one block: tokens depend only on the patch
    sizes, the image size and the pixels (the gate has no weights)."""
    rows = []
    for size in sizes:
        vit = timm_vit(name, size, depth=1)
        names, images = photos_at(size, vit, photo_names)
        with torch.inference_mode():
            for scales in (2, 3):
                model = mixed_scale(vit, scales, "cpu", torch.float32)
                mask = model.gate_mask(images)
                bounds = {
                    "all_coarse": int(model.tokens_per_image(torch.zeros_like(mask), images=images)[0]),
                    "all_fine": int(model.tokens_per_image(torch.ones_like(mask), images=images)[0]),
                }
                settings = [(t, None) for t in taus] if scales == 2 else [(None, p) for p in pairs]
                for tau, pair in settings:
                    if scales == 2:
                        model.gate.thresholds = (float(tau),)
                    else:
                        set_three_scale_thresholds(model, *pair)
                    tokens = model.tokens_per_image(model.gate_mask(images), images=images)
                    rows.append(
                        {
                            "size": size,
                            "scales": scales,
                            "setting": f"tau {tau}" if scales == 2 else f"({pair[0]}, {pair[1]})",
                            "thresholds": level_thresholds(model),
                            "mean_tokens": float(tokens.double().mean()),
                            "per_photo": {n: int(t) for n, t in zip(names, tokens)},
                            **bounds,
                        }
                    )
    return rows


# ---- 2. latency ------------------------------------------------------------------------------


def progress_runs(runs: dict, bar) -> dict:
    """``runs`` whose every call advances ``bar`` and names the model running."""

    def wrap(label, fn):
        def call():
            bar.set_postfix_str(label, refresh=False)
            out = fn()
            bar.update(1)
            return out

        return call

    return {label: wrap(label, fn) for label, fn in runs.items()}


def spread_of(times: Dict[str, List[float]], baseline: str) -> Dict[str, dict]:
    """Per run: ms quartiles, and the speed-up over ``baseline`` (median ratio, per-repetition quartiles)."""
    out = {}
    base = times[baseline]
    for label, seconds in times.items():
        out[label] = {
            "ms": statistics.median(seconds) * 1e3,
            "ms_spread": {k: (v * 1e3 if k != "n" else v) for k, v in quartiles(seconds).items()},
            "speedup": statistics.median(base) / statistics.median(seconds),
            "speedup_spread": quartiles([b / s for b, s in zip(base, seconds)]),
        }
    return out


def latency_rows(
    name: str,
    size: int,
    device: str,
    dtype: torch.dtype,
    batches: Sequence[int],
    repeats: int,
    photo: str = PHOTO,
    source: Optional[torch.nn.Module] = None,
) -> List[dict]:
    """Whole-forward latency of one model at one size (module docstring, part 2); ``source``: the
    same architecture already built (its weights are reused: no new random init)."""
    vit = timm_vit(name, size, source)
    ms2 = mixed_scale(vit, 2, device, dtype)
    ms3 = mixed_scale(vit, 3, device, dtype)
    full = vit.to(device, dtype)
    rows = []
    for batch in batches:
        names = [photo] if batch == 1 else None
        photo_names, images = photos_at(size, full, names)
        images = images.repeat((batch + len(photo_names) - 1) // len(photo_names), 1, 1, 1)[:batch]
        images = images.to(device, dtype)
        with torch.inference_mode():
            variants = {}
            for label, model in (("msvit_2", ms2), ("msvit_3", ms3)):
                mask = model.gate_mask(images)
                tokens = model.tokens_per_image(mask, images=images).double()
                macs = msvit.count_macs(model, images, mask=mask).mean().item()
                variants[label] = {"model": model, "tokens": float(tokens.mean()), "gmacs": macs / 1e9}
            grid = full.patch_embed.grid_size
            prefix = full.num_prefix_tokens
            vit_tokens = {"vit_full": prefix + grid[0] * grid[1]}
            eq_sizes = {}
            patch = full.patch_embed.patch_size[0]
            for label in ("msvit_2", "msvit_3"):
                h, w = equal_grid(variants[label]["tokens"], prefix)
                eq_sizes.setdefault((h * patch, w * patch), []).append(label)
            runs = {"vit_full": lambda: full(images)}
            runs["msvit_2"] = lambda: ms2(images)
            runs["msvit_3"] = lambda: ms3(images)
            eq_models = {}
            for eq_size, labels in sorted(eq_sizes.items(), reverse=True):
                if eq_size == (size, size):  # as many tokens as the full ViT: that run is the full ViT
                    continue
                label = f"vit_{eq_size[0]}" if eq_size[0] == eq_size[1] else f"vit_{eq_size[0]}x{eq_size[1]}"
                small = timm_vit(name, eq_size, source=vit).to(device, dtype)
                small_images = photos_at(eq_size, small, photo_names)[1]
                small_images = small_images.repeat((batch + len(photo_names) - 1) // len(photo_names), 1, 1, 1)
                small_images = small_images[:batch].to(device, dtype)
                g = small.patch_embed.grid_size
                vit_tokens[label] = prefix + g[0] * g[1]
                shown = eq_size[0] if eq_size[0] == eq_size[1] else list(eq_size)
                eq_models[label] = {"size": shown, "matches": labels}
                runs[label] = lambda m=small, x=small_images: m(x)
            total = (repeats + 1) * len(runs)
            desc = f"{name} {size}px b{batch}"
            with tqdm(total=total, desc=desc, mininterval=1.0 if device == "cuda" else 0.1, file=sys.stdout) as bar:
                times = interleaved_times(progress_runs(runs, bar), repeats, device)
        stats = spread_of(times, "vit_full")
        equal_of = {m: label for label, e in eq_models.items() for m in e["matches"]}
        for label in runs:
            extra = {}
            if label in variants:  # its time over the ViT at its token count (or the full ViT's, when that is it)
                other = times[equal_of.get(label, "vit_full")]
                extra = {
                    "equal_tokens_vit": equal_of.get(label, "vit_full"),
                    "over_equal_tokens_vit": statistics.median(times[label]) / statistics.median(other),
                    "over_equal_tokens_vit_spread": quartiles([a / b for a, b in zip(times[label], other)]),
                }
            if label in variants:
                tokens, gmacs = variants[label]["tokens"], variants[label]["gmacs"]
                image_size = size
            else:
                tokens = vit_tokens[label]
                gmacs = macs_for_tokens(ms2, torch.tensor([float(tokens)]), 0, include_gate=False)["total"].item() / 1e9
                image_size = eq_models[label]["size"] if label in eq_models else size
            rows.append(
                {
                    "model": name,
                    "size": size,
                    "batch": batch,
                    "dtype": str(dtype).replace("torch.", ""),
                    "variant": label,
                    "image_size": image_size,
                    "equal_tokens_for": eq_models.get(label, {}).get("matches"),
                    "tokens": tokens,
                    "gmacs": gmacs,
                    **stats[label],
                    **extra,
                }
            )
    return rows


def latency_table(
    models: Sequence[str],
    sizes: Sequence[int],
    device: str,
    dtype: torch.dtype,
    batches: Sequence[int],
    repeats: Optional[int],
    photo: str = PHOTO,
    on_rows=None,
) -> List[dict]:
    """``latency_rows`` of every model and size; ``on_rows(rows so far)`` after each (a run cut by a
    time limit keeps what it measured)."""
    rows = []
    for name in models:
        torch.manual_seed(0)
        base = timm_vit(name, sizes[0])  # one random init per architecture; other sizes share it
        for size in sizes:
            n = repeats or (GPU_REPEATS if device == "cuda" else CPU_REPEATS.get(name, 3))
            rows += latency_rows(name, size, device, dtype, batches, n, photo, source=base)
            if on_rows is not None:
                on_rows(rows)
        del base
    return rows


# ---- 3. tokenizer ----------------------------------------------------------------------------


def tokenize(model, images):
    """Eval-mode gate decisions, then the packed index and packed embedded tokens."""
    decision = model.gate.decide(images, sample=False)
    return model.tokenizer.pack(images, decision.hard, decision.st)


def tokenizer_rows(
    name: str = TOKEN_MODEL,
    size: int = TOKENIZER_SIZE,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batches: Sequence[int] = (1,),
    repeats: int = 10,
    photo: str = PHOTO,
) -> List[dict]:
    """The tokenizer alone (module docstring, part 3). One block: the tokenizer never runs it."""
    torch.manual_seed(0)
    vit = timm_vit(name, size, depth=1)
    ms2 = mixed_scale(vit, 2, device, dtype)
    ms3 = mixed_scale(vit, 3, device, dtype)
    vit = vit.to(device, dtype)
    rows = []
    for batch in batches:
        photo_names, images = photos_at(size, vit, [photo] if batch == 1 else None)
        images = images.repeat((batch + len(photo_names) - 1) // len(photo_names), 1, 1, 1)[:batch].to(device, dtype)
        with torch.inference_mode():
            runs = {
                "timm_embed": lambda: vit._pos_embed(vit.patch_embed(images)),
                "gate_3": lambda: ms3.gate.decide(images, sample=False),
                "tokenizer_3": lambda: tokenize(ms3, images),
                "tokenizer_2": lambda: tokenize(ms2, images),
            }
            tokens = {"timm_embed": float(vit._pos_embed(vit.patch_embed(images)).shape[1])}
            for label, model in (("3", ms3), ("2", ms2)):
                mask = model.gate_mask(images)
                tokens[f"tokenizer_{label}"] = float(model.tokens_per_image(mask, images=images).double().mean())
            tokens["gate_3"] = tokens["tokenizer_3"]
            with tqdm(total=(repeats + 1) * len(runs), desc=f"tokenizer {size}px b{batch}", file=sys.stdout) as bar:
                times = interleaved_times(progress_runs(runs, bar), repeats, device)
        stats = spread_of(times, "timm_embed")
        used = {"timm_embed": {}, "gate_3": level_thresholds(ms3), "tokenizer_3": level_thresholds(ms3)}
        used["tokenizer_2"] = level_thresholds(ms2)
        for label in runs:
            rows.append(
                {
                    "model": name,
                    "size": size,
                    "batch": batch,
                    "dtype": str(dtype).replace("torch.", ""),
                    "variant": label,
                    "tokens": tokens[label],
                    "thresholds": used[label],
                    **stats[label],
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="write into the committed bench/results/")
    parser.add_argument("--out", default=None, help="results root when not recording (default bench/results-local)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("tokens", "latency", "tokenizer"),
        default=["tokens", "latency", "tokenizer"],
        help="what to run, in this order",
    )
    parser.add_argument("--models", nargs="+", default=list(LATENCY_MODELS), help="latency: timm model names")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(LATENCY_SIZES), help="latency: image sizes")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: per model and device)")
    parser.add_argument("--batch", type=int, default=32, help="the larger batch on CUDA")
    parser.add_argument("--cpu-batch", type=int, default=4, help="the larger batch on CPU (0: batch 1 only)")
    parser.add_argument("--photo", default=PHOTO, help="the scikit-image photo of the batch-1 latency rows")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    root = results_root(args.record, args.out)
    device = args.device
    cuda = torch.device(device).type == "cuda"
    if not cuda:
        use_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = (1, args.batch) if cuda else ((1, args.cpu_batch) if args.cpu_batch > 1 else (1,))
    command = shlex.join(["PYTHONPATH=.", "python", "bench/high_res.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    result = {"command": command, "device": device, "photo": args.photo, "timm": timm.__version__}
    result["environment"] = environment(device)
    if hasattr(os, "getloadavg"):  # a shared machine's load says how far to trust the spread
        result["load_average_start"] = os.getloadavg()
    result["complete"] = False
    seconds = result["seconds_per_part"] = {}
    folder = root / device_slug(device)

    def save() -> str:
        """Write what has been measured so far (each part, each latency group)."""
        result["seconds"] = time.perf_counter() - start
        if hasattr(os, "getloadavg"):
            result["load_average_end"] = os.getloadavg()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "high_res.json").write_text(json.dumps(result, indent=1) + "\n")
        text = markdown(result)
        (folder / "high_res.md").write_text(text)
        return text

    def partial(key):
        def keep(rows):
            result[key] = list(rows)
            save()

        return keep

    for part in args.parts:
        t = time.perf_counter()
        if part == "tokens":
            result["tokens"] = token_table(TOKEN_MODEL, TOKEN_SIZES)
        elif part == "latency":
            result["latency"] = latency_table(
                args.models, args.sizes, device, dtype, batches, args.repeats, args.photo, partial("latency")
            )
        else:
            repeats = args.repeats or TOKENIZER_REPEATS["cuda" if cuda else "cpu"]
            result["tokenizer"] = tokenizer_rows(
                TOKEN_MODEL, TOKENIZER_SIZE, device, dtype, batches if cuda else (1,), repeats, args.photo
            )
        seconds[part] = time.perf_counter() - t
        print(f"{part}: {seconds[part]:.0f} s", flush=True)
        save()
    result["complete"] = True
    print(save())
    print("\n".join(busy_report()))
    print(f"wrote {folder / 'high_res.md'} and high_res.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
