"""Plots of a timed run: latency vs tokens per image (like the paper's Fig. 10, but measured) and
MACs vs measured time."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "vit": ("ViT (image size varies)", "k", "o"),
    "packed": ("MSViT packed", "#d62728", "s"),
    "masked": ("MSViT dense-masked", "#1f77b4", "^"),
    "trimmed": ("MSViT trimmed (x: padded length)", "#2ca02c", "v"),
    "naflex": ("timm NaFlexViT (x: padded length)", "#9467bd", "D"),
}


def _plot(points, path: Path, x_key: str, xlabel: str, title: str, lines: bool) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for variant, (label, colour, marker) in STYLE.items():
        rows = sorted((p for p in points if p["variant"] == variant), key=lambda p: p[x_key])
        if rows:
            xs, ys = [p[x_key] for p in rows], [p["ms"] for p in rows]
            ax.plot(xs, ys, marker=marker, color=colour, label=label, linestyle="-" if lines else "none")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms per batch (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(summary: dict, folder: Path) -> None:
    points = summary.get("inference_points", [])
    if not points:
        return
    run = f"{summary.get('model', 'MSViT')}, batch {summary.get('inference_batch')} ({summary.get('dtype')})"
    _plot(
        points,
        folder / "latency_vs_tokens.png",
        "tokens",
        "tokens per image (prefix included)",
        f"Latency vs tokens: {run}",
        lines=True,
    )
    _plot(
        points,
        folder / "macs_vs_time.png",
        "gmacs",
        "GMACs per image (count_macs; masked: all N_f + N_c tokens)",
        f"MACs vs measured time: {run}",
        lines=False,
    )
