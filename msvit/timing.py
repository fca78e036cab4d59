"""Wall-clock timing that is honest on CPU and GPU: warm-up excluded, CUDA synchronised, median,
and the spread that tells a busy machine from a slow model."""

import statistics
import time
from typing import Callable, Dict, List, Sequence

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
