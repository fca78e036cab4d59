"""The Markdown report of bench/high_res.py (its results dict -> high_res.md), and the two
threshold settings both files name."""

from typing import List

APT_PAIR = (6.0, 4.0)
TWO_SCALE_TAU = 5.5  # APT's two-scale threshold

VARIANT_NAMES = {
    "vit_full": "timm ViT, full tokens",
    "msvit_2": f"MSViT 16/32, entropy tau {TWO_SCALE_TAU} (gate included)",
    "msvit_3": "MSViT 16/32/64, entropy (tau_32, tau_64) = {pair} (gate included)",
    "timm_embed": "timm patch_embed + pos_embed (full tokens)",
    "gate_3": "entropy gate alone, 16/32/64 (two levels)",
    "tokenizer_3": "gate + index + pack, 16/32/64",
    "tokenizer_2": f"gate + index + pack, 16/32 (tau {TWO_SCALE_TAU})",
}


def variant_name(row: dict, pair=APT_PAIR) -> str:
    label = row["variant"]
    if label in VARIANT_NAMES:
        return VARIANT_NAMES[label].format(pair=pair)
    matches = ", ".join(m.replace("msvit_", "") + " scales" for m in row.get("equal_tokens_for") or [])
    size = row["image_size"]
    size = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) else size
    return f"timm ViT at {size} px (tokens of MSViT {matches})"


def load_note(result: dict) -> str:
    """The machine's load average (1, 5, 15 min) at the start and the end of the run, when recorded."""
    if "load_average_start" not in result:
        return ""
    start, end = result["load_average_start"], result.get("load_average_end", result["load_average_start"])
    return (
        f" Load average (1/5/15 min) at the start {'/'.join(f'{v:.1f}' for v in start)}, at the end "
        f"{'/'.join(f'{v:.1f}' for v in end)} (machine-wide: above the thread count, other work shared the cores)."
    )


def photo_note(result: dict) -> str:
    """How the batch-1 photo's token counts compare with the mean over the photos (section 1)."""
    photo, tokens = result["photo"], result.get("tokens") or []
    sizes = sorted({r["size"] for r in result.get("latency") or []})
    notes = []
    for r in tokens:
        if r["size"] in sizes and r["setting"] in (f"tau {TWO_SCALE_TAU}", f"({APT_PAIR[0]}, {APT_PAIR[1]})"):
            if photo in r["per_photo"]:
                count, mean = r["per_photo"][photo], r["mean_tokens"]
                notes.append(f"{r['size']} px, {r['scales']} scales: {count} tokens (mean {mean:.0f})")
    if not notes:
        return f"The photo `{photo}`'s token counts against the other photos': section 1 of the CPU results."
    return f"The photo `{photo}` against the mean over the photos (section 1): " + "; ".join(notes) + "."


def fmt_spread(spread: dict, digits: int = 2) -> str:
    return f"{spread['q1']:.{digits}f}-{spread['q3']:.{digits}f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Where mixed scales pay: high resolution (MSViT + APT's entropy gate)",
        "",
        f"Device: {env['device']} ({result['device']}), torch threads {env['threads']}, torch {env['torch']}, "
        f"timm {result['timm']}, triton {env['triton']}; {env['date']}. "
        + (
            f"Whole run: {result['seconds']:.0f} s."
            if result["complete"]
            else f"**Partial**: stopped after {result['seconds']:.0f} s; the parts below are what it measured."
        )
        + load_note(result),
        "",
        "Made by (from the repository root):",
        "",
        "```",
        result["command"],
        "```",
        "",
    ]
    tokens = result.get("tokens")
    if tokens:
        sizes = sorted({r["size"] for r in tokens})
        lines += [
            "## 1. Tokens per image on scikit-image's photos (ViT-B/16 geometry)",
            "",
            f"Mean over {len(tokens[0]['per_photo'])} photos ({', '.join(tokens[0]['per_photo'])}), each centre-"
            "cropped and resized to the size; cls included, percent of the ViT's (all-fine) count in brackets. "
            'Entropies as APT\'s released code computes them (the default `entropy_binning="apt"`: 8-bit grey '
            "levels, 512 bins). Two scales (16/32 px): a 32 px region is fine when its entropy reaches tau (>=, "
            "APT's rule). Three scales (16/32/64 px): a 64 px node splits when its entropy reaches tau_64, a 32 px "
            "node inside a split one when its entropy reaches tau_32; columns are (tau_32, tau_64). APT's three-scale "
            f"setting [6.0, 4.0], read in APT's order (finest boundary first), is {APT_PAIR}; (4.0, 6.0) is the "
            "other reading. The thresholds each gate level really used are in the JSON (`thresholds`). The "
            "entropies come from the torch reference on the CPU, so this table is the same on every machine.",
            "",
        ]
        for scales in (2, 3):
            rows = [r for r in tokens if r["scales"] == scales]
            if not rows:
                continue
            settings = list(dict.fromkeys(r["setting"] for r in rows))
            lines += [
                f"### {scales} scales ({'16/32' if scales == 2 else '16/32/64'} px)",
                "",
                "| size | all coarse | " + " | ".join(settings) + " | all fine (ViT) |",
                "|---|---|" + "---|" * len(settings) + "---|",
            ]
            for size in sizes:
                at = {r["setting"]: r for r in rows if r["size"] == size}
                some = next(iter(at.values()))
                fine = some["all_fine"]
                cells = [f"{at[s]['mean_tokens']:.0f} ({100 * at[s]['mean_tokens'] / fine:.0f}%)" for s in settings]
                lines.append(f"| {size} | {some['all_coarse']} | " + " | ".join(cells) + f" | {fine} |")
            lines.append("")
    latency = result.get("latency")
    if latency:
        photo = result["photo"]
        lines += [
            "## 2. Whole-forward latency (random weights)",
            "",
            f"Batch 1: the photo `{photo}`; larger batches: the photos repeated. MSViT runs packed, its gate "
            "inside the timed call; the ViT at equal tokens is the same timm model (same weights, position "
            "embedding resampled) at the image size whose grid (square, or a near-square rectangle: "
            "h <= w <= h + 2) has the nearest token count: it sees a smaller image. Tokens per image (mean), "
            "GMACs per image (the entropy gate counts 0 MACs); ms: median "
            "(quartiles) of interleaved repetitions after one warm-up call each; speed-up: full ViT median / this "
            "median (quartiles of the per-repetition ratios); time / ViT at equal tokens: an MSViT's median over "
            "the median of the ViT at its token count (quartiles of the per-repetition ratios; 1 = the packing, "
            "the gate and the mixed-scale embedding cost nothing).",
            "",
            photo_note(result),
            "",
            "| model | size | batch | dtype | variant | tokens | GMACs | ms | ms q1-q3 | speed-up | speed-up q1-q3 "
            "| time / ViT at equal tokens | n |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in latency:
            equal = (
                ""
                if "over_equal_tokens_vit" not in r
                else (f"{r['over_equal_tokens_vit']:.2f} ({fmt_spread(r['over_equal_tokens_vit_spread'])})")
            )
            lines.append(
                f"| {r['model']} | {r['size']} | {r['batch']} | {r['dtype']} | {variant_name(r)} | {r['tokens']:.0f} | "
                f"{r['gmacs']:.1f} | {r['ms']:.1f} | {fmt_spread(r['ms_spread'], 1)} | {r['speedup']:.2f}x | "
                f"{fmt_spread(r['speedup_spread'])} | {equal} | {r['ms_spread']['n']} |"
            )
        lines.append("")
    tok = result.get("tokenizer")
    if tok:
        lines += [
            f"## 3. The tokenizer alone at {tok[0]['size']} px (ViT-B/16 geometry)",
            "",
            f"The photo `{result['photo']}` at batch 1 (the photos repeated at larger batches). timm: "
            "`patch_embed` (the conv) + `_pos_embed` (cls and position embedding) at full tokens. MSViT: the "
            f"entropy gate's decisions, the packed index and the packed embedded tokens (`gate.decide` then "
            f"`tokenizer.pack`), three scales at (tau_32, tau_64) = {APT_PAIR} and two at tau {TWO_SCALE_TAU}. "
            f"Kernels: {'the torch reference' if result['device'] == 'cpu' else 'the default (Triton on CUDA)'}. "
            "Speed-up: timm's median / this median.",
            "",
            "| batch | dtype | variant | tokens | ms | ms q1-q3 | speed-up vs timm | n |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in tok:
            lines.append(
                f"| {r['batch']} | {r['dtype']} | {variant_name(r)} | {r['tokens']:.0f} | {r['ms']:.2f} | "
                f"{fmt_spread(r['ms_spread'])} | {r['speedup']:.2f}x | {r['ms_spread']['n']} |"
            )
        lines.append("")
    lines += ["## Headline", ""] + headline(result) + ["", "## What this shows, and what it does not", ""]
    lines += [caveats(result), ""]
    return "\n".join(lines)


def headline(result: dict) -> List[str]:
    """The numbers a reader wants first, taken from the tables above."""
    lines = []
    tokens = result.get("tokens") or []
    for size in sorted({r["size"] for r in tokens}):
        at = {(r["scales"], r["setting"]): r for r in tokens if r["size"] == size}
        two, three = at.get((2, f"tau {TWO_SCALE_TAU}")), at.get((3, f"({APT_PAIR[0]}, {APT_PAIR[1]})"))
        if two and three:
            fine = two["all_fine"]
            lines.append(
                f"- {size} px: the ViT has {fine} tokens; two scales at tau {TWO_SCALE_TAU} keep "
                f"{two['mean_tokens']:.0f} ({100 * two['mean_tokens'] / fine:.0f}%), three scales at APT's "
                f"{APT_PAIR} keep {three['mean_tokens']:.0f} ({100 * three['mean_tokens'] / fine:.0f}%) on average."
            )
    latency = result.get("latency") or []
    for key in dict.fromkeys((r["model"], r["size"], r["batch"]) for r in latency):
        rows = {r["variant"]: r for r in latency if (r["model"], r["size"], r["batch"]) == key}
        full = rows["vit_full"]
        parts = [_speedup_part(label, r, full) for label, r in rows.items() if label.startswith("msvit_")]
        lines.append(
            f"- {key[0]} at {key[1]} px, batch {key[2]}: the full ViT takes {full['ms']:.1f} ms; MSViT speed-up "
            + ", ".join(parts)
            + "."
        )
    tok = {(r["batch"], r["variant"]): r for r in result.get("tokenizer") or []}
    for batch in dict.fromkeys(b for b, _ in tok):
        timm_row, three = tok[(batch, "timm_embed")], tok[(batch, "tokenizer_3")]
        lines.append(
            f"- Tokenizer at {three['size']} px, batch {batch}: timm's patch_embed + pos_embed {timm_row['ms']:.2f} ms "
            f"({timm_row['tokens']:.0f} tokens); the three-scale gate + index + pack {three['ms']:.2f} ms "
            f"({three['tokens']:.0f} tokens), of which the gate {tok[(batch, 'gate_3')]['ms']:.2f} ms: "
            f"{three['ms'] / timm_row['ms']:.2f}x timm's, target <= 2 {_met(three['ms'] <= 2 * timm_row['ms'])}."
        )
    return lines


def _speedup_part(label: str, r: dict, full: dict) -> str:
    """One MSViT's speed-up against its targets: >= 0.9x the MAC ratio, <= 1.05x the ViT at equal tokens."""
    macs = full["gmacs"] / r["gmacs"]
    equal = r["over_equal_tokens_vit"]
    return (
        f"{label[-1]} scales {r['speedup']:.2f}x ({r['tokens']:.0f} tokens; MAC ratio {macs:.2f}x, target >= "
        f"{0.9 * macs:.2f}x {_met(r['speedup'] >= 0.9 * macs)}; {equal:.2f}x the time of the ViT at equal tokens, "
        f"target <= 1.05 {_met(equal <= 1.05)})"
    )


def _met(met: bool) -> str:
    return "(met)" if met else "(missed)"


def caveats(result: dict) -> str:
    device = result["device"]
    where = (
        "These are CPU numbers in fp32 at batch 1 and a small batch (torch threads as the header says: all "
        "cores by default, 1 with --threads 1 on a machine shared with other work, whose load the header gives), "
        "where the matrix products dominate; on a "
        "GPU host time and launches weigh more at batch 1, and the GPU stage of bench/gpu_check.sh runs this "
        "script there."
        if device == "cpu"
        else "These are GPU numbers in bf16 at batch 1, where host time and launches weigh heavily, and at a "
        "larger batch, where the kernels dominate."
    )
    tokenizer = (
        " On CPU the tokenizer is the torch path (the Triton kernels run on CUDA) and the packed attention is "
        "the grouped_sdpa backend (msvit_kernels/grouped_attention.py: one fused SDPA call per run of "
        "equal-length images, docs/design.md section 13); both are part of MSViT's time over the ViT at equal "
        "tokens."
        if device == "cpu"
        else ""
    )
    return (
        "Shows: how many tokens APT's training-free entropy gate keeps on real photos at high resolution, with "
        "two and with three scales, and what that buys in whole-forward time against the same timm ViT at full "
        "tokens, the gate and the packing included. "
        + where
        + tokenizer
        + " Does not show: accuracy. The weights are random, so nothing here says how well a mixed-scale model "
        "classifies (the entropy gate itself needs no weights, so its token counts are those a pretrained model "
        "would get on these photos). Eight scikit-image photos are not a dataset: token counts vary a lot per "
        "photo (the JSON lists them), and the batch-1 latency rows use one photo. The ViT baselines at equal "
        "tokens see a smaller image (less detail everywhere), whereas MSViT sees the full image with fine tokens "
        "only where the entropy is high: they compare cost at equal tokens, not quality. Timings with a wide "
        "quartile range (a busy machine) deserve a rerun."
    )
