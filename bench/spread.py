"""Interleaved repetitions and the spread of a ratio, so two runs that disagree show it.

docs/design.md section 7: medians of interleaved repetitions, spread reported. A ratio a/b is
median(a) / median(b) (the ``ratios`` key, as before); its spread comes from the per-repetition
ratios a_i / b_i, which are paired because a_i and b_i ran back to back in the same repetition.
"""

import statistics
from typing import Callable, Dict, List

from msvit.timing import measure


def interleaved_times(runs: Dict[str, Callable[[], object]], repeats: int, device: str) -> Dict[str, List[float]]:
    """Seconds per call of every run, ``repeats`` times, interleaved (drift hits every run alike)."""
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up (and autotuning, on GPU)
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name] += measure(fn, repeats=1, warmup=0, device=device)
    return times


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def quartiles(values: List[float]) -> Dict[str, float]:
    """min / q1 / median / q3 / max and the count (one value gives a zero spread)."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {
        "min": ordered[0],
        "q1": q1,
        "median": statistics.median(ordered),
        "q3": q3,
        "max": ordered[-1],
        "n": len(ordered),
    }


def add_ratio(summary: dict, key: str, a: List[float], b: List[float]) -> float:
    """Record time(a) / time(b) in ``summary['ratios']`` and its paired spread in ``ratios_spread``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"{key}: a ratio's spread needs paired repetitions, got {len(a)} and {len(b)} times")
    value = statistics.median(a) / statistics.median(b)
    summary["ratios"][key] = value
    summary.setdefault("ratios_spread", {})[key] = quartiles([x / y for x, y in zip(a, b)])
    return value
