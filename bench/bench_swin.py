"""Mixed-scale Swin-T (msvit.models.swin, the paper's Table 2 setting: S_c = 32, coarse tokens join at the
last stage) against the plain timm Swin-T: latency vs the fraction of fine regions, packed vs the
dense-masked baseline vs timm, one set of random weights, 224px.

CPU: float32, batch 8. GPU: bfloat16, batch 64. All runs are timed interleaved (bench/spread.py);
medians and paired spreads go to ``swin_summary.{json,md}`` in the run's results folder
(bench/results_io.py; their own files: this suite is run on its own,
``pytest bench/bench_swin.py --benchmark``, and must not replace the main suite's summary.json).
The masks are given (the gate is not run; its 0.017 GMACs are reported), spread per image around
the mean like a gate's (``spread_masks``). 25% fine = 12 of 49 regions,
50% = 25 of 49.
"""

import json

import timm
import torch

import msvit

from bench_inference import spread_masks
from results_io import environment
from spread import add_ratio, interleaved_times, medians

FINE_REGIONS = (0, 12, 25, 37, 49)  # of the 7 x 7 regions of 32px: 0, 25, 50, 75, 100% fine
MASKED_AT = (12, 25)  # the dense-masked baseline costs the same at any mask; timed where the ratios are


def test_swin_latency_vs_fine_fraction(benchmark, timed, device, bench_options, bench_dtype, results_folder):
    cuda = device == "cuda"
    dtype = bench_dtype
    batch = (bench_options["batch"] or (64 if cuda else 8)) if timed else 1
    repeats = 7 if timed else 1
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval().to(device, dtype)
    model = msvit.from_timm(swin).eval()
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    masks = {k: spread_masks(batch, k).to(device) for k in FINE_REGIONS}
    runs = {"timm": lambda: swin(images)}
    for k, mask in masks.items():
        runs[f"packed_{k}"] = lambda mask=mask: model(images, mask=mask)
        if k in MASKED_AT:
            runs[f"masked_{k}"] = lambda mask=mask: model(images, mask=mask, mode="masked")
    with torch.inference_mode():
        times = interleaved_times(runs, repeats, device)
        benchmark.pedantic(runs["packed_12"], rounds=repeats, iterations=1)
    ms = {k: v * 1e3 for k, v in medians(times).items()}
    gmacs = {k: msvit.count_macs(model, mask=m.cpu(), include_gate=False).mean().item() / 1e9 for k, m in masks.items()}
    summary = {
        "model": "swin_tiny_patch4_window7_224 (random weights), S_c 32, entry stage 3",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "repeats": repeats,
        "timm_ms": ms["timm"],
        "gate_gmacs": 49 * model.gate.macs_per_region() / 1e9,
        "points": [
            {
                "fine_regions": k,
                "fine_fraction": k / 49,
                "packed_ms": ms[f"packed_{k}"],
                "masked_ms": ms.get(f"masked_{k}"),
                "gmacs": gmacs[k],
            }
            for k in FINE_REGIONS
        ],
        "ratios": {},
    }
    for k, name in ((12, "25"), (25, "50")):
        add_ratio(summary, f"packed_over_timm_{name}pct_fine", times[f"packed_{k}"], times["timm"])
        add_ratio(summary, f"masked_over_packed_{name}pct_fine", times[f"masked_{k}"], times[f"packed_{k}"])
        add_ratio(summary, f"masked_over_timm_{name}pct_fine", times[f"masked_{k}"], times["timm"])
        summary["ratios"][f"packed_over_timm_{name}pct_fine_macs"] = gmacs[k] / gmacs[49]
    benchmark.extra_info.update(summary)
    if timed:
        write_swin_summary(summary, device, results_folder)


def write_swin_summary(summary: dict, device: str, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {**environment(device), **summary}
    (folder / "swin_summary.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    lines = [
        f"# Mixed-scale Swin-T: {payload['device']}",
        "",
        f"torch {payload['torch']}, {payload['threads']} threads, {payload['date']}; {summary['model']}; "
        f"dtype {summary['dtype']}, batch {summary['batch']}, medians of {summary['repeats']} interleaved "
        f"repetitions; masks given (the gate, {summary['gate_gmacs']:.3f} GMACs, not run)",
        "",
        f"plain timm Swin-T: {summary['timm_ms']:.1f} ms per batch",
        "",
        "| fine regions | packed ms | dense-masked ms | GMACs per image (packed) |",
        "|---|---|---|---|",
    ]
    for p in summary["points"]:
        masked = f"{p['masked_ms']:.1f}" if p["masked_ms"] is not None else "-"
        share = f"{p['fine_regions']}/49 ({p['fine_fraction']:.0%})"
        lines.append(f"| {share} | {p['packed_ms']:.1f} | {masked} | {p['gmacs']:.3f} |")
    lines += ["", "| ratio (time a / time b) | measured | spread: min [q1, q3] max (n) |", "|---|---|---|"]
    for key, value in summary["ratios"].items():
        s = summary["ratios_spread"].get(key)
        cell = f"{s['min']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}] {s['max']:.3f} ({s['n']})" if s else "- (MAC ratio)"
        lines.append(f"| {key} | {value:.3f} | {cell} |")
    (folder / "swin_summary.md").write_text("\n".join(lines) + "\n")
