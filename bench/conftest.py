"""Benchmarks run with ``pytest bench/ --benchmark``; without the flag each one runs once as a smoke test.

The smoke mode is pytest-benchmark's own ``--benchmark-disable`` (the function runs once, untimed),
so ``make test`` exercises every benchmark cheaply and the timed study needs one flag.
"""

import pytest
import torch

SUMMARY = {"ratios": {}}


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False, help="time the benchmarks (default: run each once)"
    )
    parser.addoption(
        "--bench-model", default="vit_small_patch16_224", help="timm ViT the study converts (224px, patch 16)"
    )
    parser.addoption("--bench-batch", type=int, default=None, help="batch size (default: 256 on GPU, 32/16 on CPU)")
    parser.addoption(
        "--bench-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="inference dtype (default: float32 on CPU, bfloat16 on sm_80+, float16 before)",
    )
    parser.addoption("--bench-backend", default="auto", help="packed-attention backend of the MSViT runs")


def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def timed(request) -> bool:
    """True under ``--benchmark``: benchmarks use their full sizes instead of smoke sizes."""
    return request.config.getoption("--benchmark")


@pytest.fixture(scope="session")
def bench_options(request) -> dict:
    """The study's knobs: model, batch (None = per-suite default), dtype (None = per device), backend."""
    get = request.config.getoption
    dtype = get("--bench-dtype")
    return {
        "model": get("--bench-model"),
        "batch": get("--bench-batch"),
        "dtype": getattr(torch, dtype) if dtype else None,
        "backend": get("--bench-backend"),
    }


@pytest.fixture(scope="session")
def bench_dtype(bench_options, device) -> torch.dtype:
    """``--bench-dtype``, else float32 on CPU, bfloat16 on sm_80+ and float16 before it (no native
    bfloat16 there)."""
    if bench_options["dtype"] is not None:
        return bench_options["dtype"]
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16


@pytest.fixture(scope="session")
def summary() -> dict:
    """The run's summary: benchmarks add ``ratios`` (time a / time b, same run) and data for plots."""
    return SUMMARY


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--benchmark") and SUMMARY["ratios"]:  # partial runs still report
        from summary import write_summary

        write_summary(SUMMARY, "cuda" if torch.cuda.is_available() else "cpu")
