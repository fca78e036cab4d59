"""VLM vision towers with APT's entropy gate: encoder tokens, LLM tokens under each projector
option, encoder MACs and CPU time against timm's tower (docs/design.md section 17).

    PYTHONPATH=. python bench/vlm_towers.py [--record | --out DIR] [--repeats 3] [--timed astronaut,coffee]

1. tokens and MACs, for every bundled photo (``msvit.data.sample_photos``' list) at its native
   size, resized keeping the aspect ratio to a multiple the tower's projector takes (Qwen: 32 px,
   Gemma 4: 48 px; DeepSeek: 42 px, whole 3x3 regions: the entropy gate takes no border cells
   yet), for the full-size ``qwen3_vit_88m_enc``,
   ``deepseek_vit_412m_enc`` and ``gemma4_vit_167m_enc``: encoder tokens of timm's tower (every
   patch) and of the MSViT with the entropy gate at two scales (tau 5.5 bits, APT's two-scale
   threshold; coarse patch = the projector window) and, for Qwen, three scales (16/32/64 px,
   APT's (6.0, 4.0)); LLM tokens with ``llm_tokens="replicate"`` (timm's count) and
   ``"merged"``; encoder MACs (blocks, embedding, projector; the gate's histograms are no MACs)
   from ``msvit.models.flops``, which equals FlopCounterMode on these towers (tests/test_vlm_towers.py).
   The gate needs no weights, so random weights give the real token counts.
2. CPU time of ``qwen3_vit_88m_enc`` at full size (12 x 768, the smallest tower), random weights,
   fp32, batch 1, on the ``--timed`` photos with the long side capped at 512 px: timm's tower
   against the MSViT (gate inside the timed call) at two and three scales; medians of
   interleaved repetitions (``msvit.timing``), the speed-up's spread from per-repetition ratios.

Writes ``vlm_towers.md`` and ``vlm_towers.json`` into ``<results root>/<device slug>/``: the
committed ``bench/results/`` with ``--record``, else ``--out DIR``, else ``bench/results-local/``.
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import List

import numpy as np
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io is a module of bench/

import msvit  # noqa: E402
from msvit.data.sample_images import SAMPLE_PHOTOS, normalize  # noqa: E402
from msvit.models.flops import macs_for_tokens  # noqa: E402
from msvit.timing import interleaved_times, quartiles  # noqa: E402

from results_io import device_slug, environment, results_root  # noqa: E402

TOWERS = {  # name: (multiple the projector takes in px, three-scale patch sizes or None)
    "qwen3_vit_88m_enc": (32, (16, 32, 64)),
    "deepseek_vit_412m_enc": (42, None),  # whole 3x3 regions: the entropy gate takes no border cells yet
    "gemma4_vit_167m_enc": (48, None),
}
TWO_SCALE_TAU = 5.5
THREE_SCALE_TAUS = (6.0, 4.0)
TIMED_TOWER = "qwen3_vit_88m_enc"
TIMED_LONG_SIDE = 512
NARROW = dict(depth=1, embed_dim=32, num_heads=2)  # the gate and the token layout only: weights do not matter


def photo(name: str, multiple: int, long_side: int = 0) -> torch.Tensor:
    """A bundled photo ``[1, 3, H, W]`` in [0, 1], aspect kept, H and W rounded to ``multiple``
    (long side capped at ``long_side`` when given)."""
    import skimage.data

    array = getattr(skimage.data, name)()
    image = torch.from_numpy(np.asarray(array, dtype=np.float32) / 255.0)
    image = (image[..., None].expand(-1, -1, 3) if image.dim() == 2 else image[..., :3]).permute(2, 0, 1)
    h, w = image.shape[-2:]
    scale = min(1.0, long_side / max(h, w)) if long_side else 1.0
    size = [max(multiple, round(n * scale / multiple) * multiple) for n in (h, w)]
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def model_input(tower_name: str, pixels: torch.Tensor) -> torch.Tensor:
    cfg = timm.models.get_pretrained_cfg(tower_name.rsplit(".", 1)[0]) or {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    return normalize(pixels, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))


def towers(name: str, scales, narrow: bool, **timm_kwargs):
    """(timm tower, MSViT with the entropy gate) of ``name``; ``narrow``: the token-layout model."""
    kwargs = dict(pretrained=False, **(NARROW if narrow else {}), **timm_kwargs)
    if narrow and name.startswith("gemma4"):
        kwargs.update(head_dim=16, intermediate_size=32)
    tower = timm.create_model(name, **kwargs).eval()
    thresholds = THREE_SCALE_TAUS if scales and len(scales) > 2 else (TWO_SCALE_TAU,)
    model = msvit.from_timm(tower, gate="entropy", scales=scales, entropy_thresholds=thresholds).eval()
    return tower, model


def token_rows(device: str) -> List[dict]:
    rows = []
    for name, (multiple, three) in TOWERS.items():
        with torch.device("meta"):  # the full-size tower's shapes for the MAC formula, no memory
            full = {s: towers(name, s, False)[1] for s in {None, three}}
        for photo_name in SAMPLE_PHOTOS:
            pixels = photo(photo_name, multiple)
            x = model_input(name, pixels).to(device)
            row = {"tower": name, "photo": photo_name, "size": list(x.shape[-2:])}
            for label, scales in (("two", None), ("three", three)):
                if label == "three" and scales is None:
                    continue
                _, layout = towers(name, scales, True)
                layout = layout.to(device)
                mask = layout.gate_mask(x)
                tokens = layout.tokens_per_image(mask, images=x)
                fine_grid = layout.tokenizer.grids(x)[0]
                merged = layout.encode(x, mask=mask, llm_tokens="merged")
                big = full[scales]
                n_regions = 0 if layout.tokenizer.scales > 2 else mask.shape[1]
                macs = macs_for_tokens(big, tokens.cpu(), n_regions, include_gate=False)["total"].item()
                all_fine = torch.tensor([fine_grid[0] * fine_grid[1]])
                row["timm_tokens"] = int(all_fine)
                row["timm_gmacs"] = (
                    macs_for_tokens(big, all_fine, n_regions, include_gate=False)["total"].item()
                    + big.projector_macs(fine_grid)
                ) / 1e9
                row[f"{label}_tokens"] = int(tokens)
                row[f"{label}_gmacs"] = (macs + big.projector_macs(fine_grid)) / 1e9
                row["llm_replicate"] = int(merged.window_grid[0] * merged.window_grid[1])
                row[f"{label}_llm_merged"] = int(merged.cu_seqlens[-1])
            rows.append(row)
    return rows


def timing_rows(device: str, photos: List[str], repeats: int) -> List[dict]:
    multiple, three = TOWERS[TIMED_TOWER]
    torch.manual_seed(0)
    tower, two = towers(TIMED_TOWER, None, False)
    three_model = msvit.from_timm(tower, gate="entropy", scales=three, entropy_thresholds=THREE_SCALE_TAUS).eval()
    tower, two, three_model = tower.to(device), two.to(device), three_model.to(device)
    rows = []
    for photo_name in photos:
        x = model_input(TIMED_TOWER, photo(photo_name, multiple, TIMED_LONG_SIDE)).to(device)
        runs = {"timm": lambda: tower(x), "two": lambda: two(x), "three": lambda: three_model(x)}
        with torch.inference_mode():
            times = interleaved_times(runs, repeats, device)
            models = (("two", two), ("three", three_model))
            tokens = {k: int(m.tokens_per_image(m.gate_mask(x), images=x)) for k, m in models}
        row = {"photo": photo_name, "size": list(x.shape[-2:]), "timm_tokens": x.shape[-2] * x.shape[-1] // 256}
        for label in runs:
            row[f"{label}_ms"] = quartiles([1e3 * t for t in times[label]])
        for label in ("two", "three"):
            ratios = [a / b for a, b in zip(times["timm"], times[label])]
            row[f"{label}_tokens"] = tokens[label]
            row[f"{label}_speedup"] = quartiles(ratios)
        rows.append(row)
    return rows


def _third(row: dict, key: str) -> str:
    """`` / value`` of a three-scale column, or nothing for a tower measured at two scales only."""
    if key not in row:
        return ""
    return f" / {row[key]:.1f}" if isinstance(row[key], float) else f" / {row[key]}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# VLM towers with the entropy gate: tokens, MACs, CPU time",
        "",
        f"Command: `{result['command']}`",
        f"Device: {env['device']}, {env['threads']} threads, torch {env['torch']}; load average "
        f"{result['load_average']} before, {result.get('load_average_after')} after (a shared machine: "
        "times are noisy, MACs and tokens are not). Random weights (the gate needs none); full-size towers.",
        "",
        "## Tokens and encoder MACs (bundled photos, native size, aspect kept)",
        "",
        "Encoder tokens: every patch (timm) vs the entropy gate at two scales (tau 5.5, coarse patch = "
        "the projector window) and three (Qwen: 16/32/64 px, APT's (6.0, 4.0)). LLM tokens: "
        "`replicate` is timm's count (the default); `merged` hands one token per coarse token "
        "spanning several windows. GMACs: blocks + embedding + projector (the gate's histograms are no MACs).",
        "",
        "| tower | photo | H x W | enc tokens timm / 2 sc / 3 sc | LLM replicate | LLM merged 2 sc / 3 sc "
        "| GMACs timm / 2 sc / 3 sc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["tokens"]:
        lines.append(
            f"| {r['tower']} | {r['photo']} | {r['size'][0]}x{r['size'][1]} | {r['timm_tokens']} / {r['two_tokens']}"
            f"{_third(r, 'three_tokens')} | {r['llm_replicate']} | "
            f"{r['two_llm_merged']}{_third(r, 'three_llm_merged')} "
            f"| {r['timm_gmacs']:.1f} / {r['two_gmacs']:.1f}{_third(r, 'three_gmacs')} |"
        )
    lines += [
        "",
        f"## CPU time, {TIMED_TOWER} (12 x 768), fp32, batch 1, long side {TIMED_LONG_SIDE} px",
        "",
        "Medians of interleaved repetitions, ms; speed-up = timm / MSViT per repetition, median [quartiles]. "
        "The MSViT's time includes the entropy gate and the torch tokenizer (no Triton on CPU).",
        "",
        "| photo | H x W | tokens timm / 2 sc / 3 sc | timm ms | MSViT 2 sc ms | speed-up | MSViT 3 sc ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["timing"]:
        sp = lambda k: f"{r[k]['median']:.2f}x [{r[k]['q1']:.2f}, {r[k]['q3']:.2f}]"  # noqa: E731
        lines.append(
            f"| {r['photo']} | {r['size'][0]}x{r['size'][1]} | {r['timm_tokens']} / {r['two_tokens']} / "
            f"{r['three_tokens']} | {r['timm_ms']['median']:.0f} | {r['two_ms']['median']:.0f} | {sp('two_speedup')} "
            f"| {r['three_ms']['median']:.0f} | {sp('three_speedup')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="write into the committed bench/results/")
    parser.add_argument("--out", default=None, help="results root (default bench/results-local/)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timed", default="astronaut,coffee,chelsea", help="photos timed (comma-separated)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = {
        "command": "PYTHONPATH=. python bench/vlm_towers.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "environment": environment(args.device),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "tokens": token_rows(args.device),
        "timing": timing_rows(args.device, [p for p in args.timed.split(",") if p], args.repeats),
    }
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    folder = results_root(args.record, args.out) / device_slug(args.device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vlm_towers.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "vlm_towers.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
