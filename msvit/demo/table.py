"""The demo's latency table: per photo the median of several batch-1 runs and their range, and a
warning when the spread says the machine was busy rather than the model slow."""

import statistics
from typing import Dict, List, Sequence, Tuple

from msvit.timing import BUSY_FACTOR, looks_busy, quartiles, spread_warning

COLUMNS = {"packed": "packed ms", "masked": "masked ms", "vit": "ViT-224 ms"}
Row = Tuple[str, int, Dict[str, List[float]]]  # photo, tokens kept, seconds of each run per column


def cell(times: List[float]) -> str:
    """'median (min-max)' in ms, then '!' when the slowest run took over BUSY_FACTOR x the median."""
    q = quartiles(times)
    return f"{q['median'] * 1e3:.0f} ({q['min'] * 1e3:.0f}-{q['max'] * 1e3:.0f})" + ("!" if looks_busy(times) else " ")


def latency_table(rows: Sequence[Row]) -> List[str]:
    """The table's lines: one row per photo, the mean of the medians, and the warnings."""
    runs = len(rows[0][2]["packed"])
    lines = [
        f"{'photo':<22}{'tokens':>7}" + "".join(f"{title:>18} " for title in COLUMNS.values()),
        *(f"{name:<22}{n:>7}" + "".join(f"{cell(times[k]):>19}" for k in COLUMNS) for name, n, times in rows),
    ]
    medians = {k: [statistics.median(times[k]) for _, _, times in rows] for k in COLUMNS}
    mean_tokens = statistics.mean(n for _, n, _ in rows)
    lines.append(
        f"{'mean of medians':<22}{mean_tokens:>7.0f}"
        + "".join(f"{statistics.mean(medians[k]) * 1e3:>18.0f} " for k in COLUMNS)
    )
    lines.append(f"ms per photo at batch 1: median (min-max) of {runs} runs")
    busy = [name for name, _, times in rows if any(looks_busy(times[k]) for k in COLUMNS)]
    if busy:
        lines.append(
            f"! the slowest run took over {BUSY_FACTOR:g}x the median for {', '.join(busy)}: machine busy? "
            "Rerun on a quiet machine or with more --repeats."
        )
    spread = spread_warning({f"{name} {COLUMNS[k]}": times[k] for name, _, times in rows for k in COLUMNS})
    if spread:
        lines.append(spread)
    if len(rows) > 1 and looks_busy(medians["vit"]):
        lines.append(
            f"! the ViT's median on one photo is over {BUSY_FACTOR:g}x its median over all photos, for the "
            "same work (197 tokens each): machine busy? Compare the photos with care."
        )
    return lines
