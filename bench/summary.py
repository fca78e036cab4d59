"""The suite's summary: ratios measured in one run, next to docs/design.md section 7's targets.

Benchmarks put their ratios into the session's ``summary`` fixture; at the end of a timed run
(``--benchmark``) ``write_summary`` writes ``summary.json``, ``summary.md`` and the plots under
``bench/results/<device-slug>/``. Every ratio ``a_over_b`` is time(a) / time(b): the ratio of the
medians. ``ratios_spread`` holds, per ratio timed in interleaved repetitions, the quartiles of the
per-repetition ratios (bench/spread.py), so a run-to-run disagreement shows as a wide spread.
"""

import json

from results_io import RESULTS, device_slug, environment

# (key, comparison, bound, what it means) per device type.
TARGETS = {
    "cpu": [
        ("packed_over_vit_same_tokens", "<=", 1.05, "packed MSViT-S within 1.05x of ViT-S at equal tokens, batch 32"),
        ("packed_over_vit_same_tokens_b1", "<=", 1.10, "packed MSViT-S within 1.10x of ViT-S at equal tokens, batch 1"),
        ("masked_over_packed", ">=", 2.4, "dense masking at least 2.4x slower than packed (MAC ratio 2.58)"),
    ],
    "cuda": [
        ("packed_over_vit_same_tokens", "<=", 1 / 0.9, "packed throughput >= 0.9x ViT-S at the same tokens"),
        ("masked_over_packed", ">=", 1.8, "packed >= 1.8x dense-masked throughput at ~50% fine"),
        ("trimmed_over_packed", ">=", 1.3, "packed >= 1.3x trimmed throughput at ~50% fine"),
        ("tokenizer_share", "<=", 0.05, "tokenizer <= 5% of the MSViT-S forward at batch 256"),
        ("triton_attn_over_best_varlen", "<=", 1 / 0.8, "Triton varlen attention >= 0.8x the best varlen backend"),
        ("train_trimmed_over_packed", ">=", 1.3, "packed training step >= 1.3x faster than trimmed"),
    ],
}


def verdict(value, op: str, bound: float) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= bound if op == "<=" else value >= bound) else "NOT met"


def spread_cell(spread) -> str:
    if spread is None:
        return "-"  # not a timed ratio (e.g. a MAC ratio) or not from paired repetitions
    return f"{spread['min']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}] {spread['max']:.3f} ({spread['n']})"


def write_summary(summary: dict, device: str) -> None:
    """Write summary.json / summary.md for this run (and plots when the data for them is there)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    folder = RESULTS / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    ratios = summary.get("ratios", {})
    payload = {**environment(device), **{k: v for k, v in summary.items() if k != "ratios"}, "ratios": ratios}
    (folder / "summary.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    lines = [
        f"# Benchmark summary: {payload['device']}",
        "",
        f"torch {payload['torch']}, triton {payload['triton']}, {payload['date']}; "
        f"dtype {summary.get('dtype', '?')}, batch sizes {summary.get('batch_sizes', '?')}",
        "",
        "| ratio (time a / time b) | measured | spread: min [q1, q3] max (n) | target | verdict | meaning |",
        "|---|---|---|---|---|---|",
    ]
    spreads = summary.get("ratios_spread", {})
    for key, op, bound, meaning in TARGETS[kind]:
        value = ratios.get(key)
        shown = f"{value:.3f}" if value is not None else "-"
        lines.append(
            f"| {key} | {shown} | {spread_cell(spreads.get(key))} | {op} {bound:.3f} | "
            f"{verdict(value, op, bound)} | {meaning} |"
        )
    others = sorted(set(ratios) - {t[0] for t in TARGETS[kind]})
    for key in others:
        lines.append(f"| {key} | {ratios[key]:.3f} | {spread_cell(spreads.get(key))} | - | - | |")
    lines += [
        "",
        "measured: median(time a) / median(time b). spread: quartiles of the per-repetition ratios a_i / b_i",
        "(a_i, b_i timed back to back), whose median may differ from the ratio of medians.",
    ]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    from plots import write_plots

    write_plots(summary, folder)
