"""The suite's summary: ratios measured in one run, next to docs/design.md section 7's targets.

Benchmarks put their ratios into the session's ``summary`` fixture; at the end of a timed run
(``--benchmark``) ``write_summary`` writes ``summary.json``, ``summary.md`` and the plots into the
run's results folder (bench/results_io.py). Every ratio ``a_over_b`` is time(a) / time(b): the ratio
of the medians. ``ratios_spread`` holds, per ratio timed in interleaved repetitions, the quartiles
of the per-repetition ratios (bench/spread.py), so a run-to-run disagreement shows as a wide spread.

A run of some suites merges into the summary already in the folder: what it measured replaces the
old values, everything else is kept, and ``runs`` records which run (date, versions, dtype)
measured which ratio, so a merged table never passes one run's numbers off as another's.
"""

import json
from pathlib import Path

from results_io import environment

# Per target, (summary field holding the batch it ran at, or that batch itself; the batch docs/design.md
# section 7 states the target for): the meaning names the batch that ran, not the target's.
CPU_32, CUDA_256, TRAIN_256 = ("inference_batch", 32), ("inference_batch", 256), ("train_batch", 256)

# (key, comparison, bound, what it means, batch) per device type.
TARGETS = {
    "cpu": [
        ("packed_over_vit_same_tokens", "<=", 1.05, "packed MSViT-S within 1.05x of ViT-S at equal tokens", CPU_32),
        ("packed_over_vit_same_tokens_b1", "<=", 1.10, "packed MSViT-S within 1.10x of ViT-S at equal tokens", (1, 1)),
        ("masked_over_packed", ">=", 2.4, "dense masking at least 2.4x slower than packed (MAC ratio 2.58)", CPU_32),
    ],
    "cuda": [
        ("packed_over_vit_same_tokens", "<=", 1 / 0.9, "packed throughput >= 0.9x ViT-S at the same tokens", CUDA_256),
        ("masked_over_packed", ">=", 1.8, "packed >= 1.8x dense-masked throughput at ~50% fine", CUDA_256),
        ("trimmed_over_packed", ">=", 1.3, "packed >= 1.3x trimmed throughput at ~50% fine", CUDA_256),
        ("tokenizer_share", "<=", 0.05, "tokenizer <= 5% of the MSViT-S forward", ("tokenizer_batch", 256)),
        ("triton_attn_over_best_varlen", "<=", 1 / 0.8, "Triton attention >= 0.8x the best varlen backend", None),
        ("train_trimmed_over_packed", ">=", 1.3, "packed training step >= 1.3x faster than trimmed", TRAIN_256),
    ],
}
BATCH_FIELDS = ("inference_batch", "train_batch", "tokenizer_batch", "cpu_backends_batch")


def verdict(value, op: str, bound: float) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= bound if op == "<=" else value >= bound) else "NOT met"


def spread_cell(spread) -> str:
    if spread is None:
        return "-"  # not a timed ratio (e.g. a MAC ratio) or not from paired repetitions
    return f"{spread['min']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}] {spread['max']:.3f} ({spread['n']})"


def meaning_cell(summary: dict, meaning: str, batch) -> str:
    """The target's meaning with the batch that ran; a batch other than the target's is flagged."""
    if batch is None:
        return meaning
    field, stated = batch
    ran = field if isinstance(field, int) else summary.get(field)
    if ran is None:
        return f"{meaning}, batch not recorded"
    return f"{meaning}, batch {ran}" + (f" (the target is stated for batch {stated})" if ran != stated else "")


def batch_sizes(summary: dict) -> list:
    sizes = {summary[f] for f in BATCH_FIELDS if summary.get(f) is not None}
    return sorted(sizes | ({1} if "batch1_ms" in summary else set()))


def run_record(payload: dict, ratio_keys) -> dict:
    keys = ("date", "torch", "triton", "threads", "dtype")
    return {**{k: payload.get(k) for k in keys}, "ratios": sorted(ratio_keys)}


def merge(previous: dict, run: dict) -> dict:
    """``run`` laid over ``previous``: run's fields replace old ones (dicts such as ``ratios`` or
    ``peers`` one key deeper), older ones stay; ``runs`` lists which run measured which ratio."""
    merged = dict(previous)
    for key, value in run.items():
        old = previous.get(key)
        merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    measured = set(run.get("ratios", {}))
    for key in measured - set(run.get("ratios_spread", {})):
        merged.get("ratios_spread", {}).pop(key, None)  # re-measured without a spread: the old one is stale
    earlier = previous.get("runs") or ([run_record(previous, previous.get("ratios", {}))] if previous else [])
    kept = [dict(r, ratios=[k for k in r["ratios"] if k not in measured]) for r in earlier]
    merged["runs"] = [r for r in kept if r["ratios"]] + [run_record(run, measured)]
    return merged


def write_summary(summary: dict, device: str, folder: Path) -> dict:
    """Merge this run into ``folder``'s summary.json, write it, summary.md and the plots; returns it."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    payload = merge(previous, {**environment(device), **summary})
    payload["batch_sizes"] = batch_sizes(payload)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (folder / "summary.md").write_text(markdown(payload, kind))
    from plots import write_plots

    write_plots(payload, folder)
    return payload


def markdown(payload: dict, kind: str) -> str:
    ratios = payload.get("ratios", {})
    lines = [
        f"# Benchmark summary: {payload['device']}",
        "",
        f"torch {payload['torch']}, triton {payload['triton']}, {payload['date']}; "
        f"dtype {payload.get('dtype', '?')}, batch sizes {payload['batch_sizes']}",
        "",
    ]
    if len(payload.get("runs", [])) > 1:
        lines += ["Merged from the runs below; each ratio comes from the run that lists it.", ""]
        for run in payload["runs"]:
            lines.append(f"- {run['date']}, torch {run['torch']}, {run['dtype']}: {', '.join(run['ratios'])}")
        lines.append("")
    lines += [
        "| ratio (time a / time b) | measured | spread: min [q1, q3] max (n) | target | verdict | meaning |",
        "|---|---|---|---|---|---|",
    ]
    spreads = payload.get("ratios_spread", {})
    for key, op, bound, meaning, batch in TARGETS[kind]:
        value = ratios.get(key)
        shown = f"{value:.3f}" if value is not None else "-"
        said = meaning_cell(payload, meaning, batch) if value is not None else meaning
        lines.append(
            f"| {key} | {shown} | {spread_cell(spreads.get(key))} | {op} {bound:.3f} | "
            f"{verdict(value, op, bound)} | {said} |"
        )
    for key in sorted(set(ratios) - {t[0] for t in TARGETS[kind]}):
        lines.append(f"| {key} | {ratios[key]:.3f} | {spread_cell(spreads.get(key))} | - | - | |")
    lines += [
        "",
        "measured: median(time a) / median(time b). spread: quartiles of the per-repetition ratios a_i / b_i",
        "(a_i, b_i timed back to back), whose median may differ from the ratio of medians.",
    ]
    return "\n".join(lines) + "\n"
