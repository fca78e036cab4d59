"""Plots of a timed run: latency vs tokens per image (like the paper's Fig. 10, but measured) and
MACs vs measured time."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"vit": ("ViT (image size varies)", "k", "o"), "packed": ("MSViT packed", "#d62728", "s"),
         "masked": ("MSViT dense-masked", "#1f77b4", "^"), "trimmed": ("MSViT trimmed", "#2ca02c", "v")}


def write_plots(summary: dict, folder: Path) -> None:
    points = summary.get("inference_points", [])
    if not points:
        return
    title = f"{summary.get('model', 'MSViT-S')} batch {summary.get('inference_batch')} ({summary.get('dtype')})"
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for variant, (label, colour, marker) in STYLE.items():
        rows = sorted((p for p in points if p["variant"] == variant), key=lambda p: p["tokens"])
        if rows:
            ax.plot([p["tokens"] for p in rows], [p["ms"] for p in rows], marker=marker, color=colour, label=label)
    ax.set_xlabel("tokens per image (prefix included)")
    ax.set_ylabel("ms per batch (median)")
    ax.set_title(f"Latency vs tokens: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "latency_vs_tokens.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for variant, (label, colour, marker) in STYLE.items():
        rows = [p for p in points if p["variant"] == variant]
        if rows:
            ax.scatter([p["gmacs"] for p in rows], [p["ms"] for p in rows], color=colour, marker=marker, label=label)
    ax.set_xlabel("GMACs per image (count_macs; masked: all N_f + N_c tokens)")
    ax.set_ylabel("ms per batch (median)")
    ax.set_title(f"MACs vs measured time: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "macs_vs_time.png")
    plt.close(fig)
