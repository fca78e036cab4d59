"""Interleaved repetitions and the spread of a ratio, so two runs that disagree show it.

docs/design.md section 7: medians of interleaved repetitions, spread reported. A ratio a/b is
median(a) / median(b) (the ``ratios`` key, as before); its spread comes from the per-repetition
ratios a_i / b_i, which are paired because a_i and b_i ran back to back in the same repetition.
"""

import statistics
from typing import Callable, Dict, List

import torch

from msvit import timing
from msvit.timing import quartiles

# Every run timed in this process, for ``busy_report`` at the end of a bench script or session.
TIMED: Dict[str, List[float]] = {}


def interleaved_times(runs: Dict[str, Callable[[], object]], repeats: int, device: str) -> Dict[str, List[float]]:
    """``msvit.timing.interleaved_times``, its times also kept in ``TIMED`` (the suites import it from here)."""
    times = timing.interleaved_times(runs, repeats, device)
    call = len({key.rsplit(" #", 1)[1] for key in TIMED}) + 1
    TIMED.update({f"{name} #{call}": t for name, t in times.items()})
    return times


def busy_report() -> List[str]:
    """The threads used, and the warnings (``msvit.timing.busy_warnings``) for everything timed so far."""
    return [f"{torch.get_num_threads()} torch threads", *timing.busy_warnings(TIMED)]


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
