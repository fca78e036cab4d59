"""Wall-clock timing that is honest on CPU and GPU: warm-up excluded, CUDA synchronised, median,
and the spread that tells a busy machine from a slow model."""

import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# A repetition slower than this many medians means something else ran: under load `make demo`
# once showed one photo at 2264 ms against ~300 ms for the other photos, with nothing to say so.
BUSY_FACTOR = 2.0


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device=None) -> List[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones."""
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(runs: Dict[str, Callable[[], object]], repeats: int, device: str) -> Dict[str, List[float]]:
    """Seconds per call of every run, ``repeats`` times, interleaved (drift hits every run alike)."""
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up (and autotuning, on GPU)
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name] += measure(fn, repeats=1, warmup=0, device=device)
    return times


def quartiles(values: Sequence[float]) -> Dict[str, float]:
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


def looks_busy(times: Sequence[float], factor: float = BUSY_FACTOR) -> bool:
    """True when the slowest of ``times`` (repetitions of the same work) exceeds ``factor`` x their median."""
    return max(times) > factor * statistics.median(times)


# A median this many times the fastest repetition of the same work means the repetitions waited on
# other work: on 2 shared cores the demo's medians once sat 10x their minima while the only busy
# warning (BUSY_FACTOR, one outlier run) said nothing.
SPREAD_FACTOR = 1.5
ADVICE = (
    "rerun on a quiet machine (uptime: load below the cores), with --threads 1 or 2, or with more "
    "--repeats, and compare minima rather than medians (docs/timing.md)"
)


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_warning(load: Optional[float] = None, cores: Optional[int] = None) -> Optional[str]:
    """A warning when the 1-minute load average exceeds the cores (None when it does not, or
    where the platform has no load average). ``load``, ``cores``: the measured ones by default."""
    if load is None:
        if not hasattr(os, "getloadavg"):
            return None
        load = os.getloadavg()[0]
    cores = cpu_count() if cores is None else cores
    if load <= cores:
        return None
    return (
        f"! load average {load:.1f} exceeds the {cores} cores: other processes compete for them, so these "
        f"timings are slower and noisier than this machine's; {ADVICE}"
    )


def spread_warning(times: Dict[str, Sequence[float]], factor: float = SPREAD_FACTOR) -> Optional[str]:
    """A warning naming the runs whose median exceeds ``factor`` x their fastest repetition."""
    spread = {name: statistics.median(t) / min(t) for name, t in times.items() if len(t) > 1 and min(t) > 0}
    wide = sorted(((ratio, name) for name, ratio in spread.items() if ratio > factor), reverse=True)
    if not wide:
        return None
    named = ", ".join(f"{name} {ratio:.1f}x" for ratio, name in wide[:4]) + (" ..." if len(wide) > 4 else "")
    return f"! median over {factor:g}x the fastest run ({named}): the machine was busy; {ADVICE}"


def busy_warnings(times: Dict[str, Sequence[float]], load: Optional[float] = None) -> List[str]:
    """``spread_warning`` and ``load_warning`` of a set of timings, those that apply."""
    return [w for w in (spread_warning(times), load_warning(load)) if w]
