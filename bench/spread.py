"""Interleaved repetitions and the spread of a ratio, so two runs that disagree show it.

docs/design.md section 7: medians of interleaved repetitions, spread reported. A ratio a/b is
median(a) / median(b) (the ``ratios`` key, as before); its spread comes from the per-repetition
ratios a_i / b_i, which are paired because a_i and b_i ran back to back in the same repetition.
"""

import statistics
from typing import Dict, List

from msvit.timing import interleaved_times, quartiles  # noqa: F401  interleaved_times: the suites import it from here


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def add_ratio(summary: dict, key: str, a: List[float], b: List[float]) -> float:
    """Record time(a) / time(b) in ``summary['ratios']`` and its paired spread in ``ratios_spread``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"{key}: a ratio's spread needs paired repetitions, got {len(a)} and {len(b)} times")
    value = statistics.median(a) / statistics.median(b)
    summary["ratios"][key] = value
    summary.setdefault("ratios_spread", {})[key] = quartiles([x / y for x, y in zip(a, b)])
    return value
