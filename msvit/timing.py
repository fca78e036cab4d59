"""Wall-clock timing that is honest on CPU and GPU: warm-up excluded, CUDA synchronised, median."""

import statistics
import time
from typing import Callable, List

import torch


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


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device=None) -> float:
    """Median seconds per call (see ``measure``)."""
    return statistics.median(measure(fn, repeats, warmup, device))
