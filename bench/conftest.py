"""Benchmarks run with ``pytest bench/ --benchmark``; without the flag each one runs once as a smoke test.

The smoke mode is pytest-benchmark's own ``--benchmark-disable`` (the function runs once, untimed),
so ``make test`` exercises every benchmark cheaply and the timed study needs one flag.

Where a timed run writes (bench/results_io.py): ``bench/results-local/<device>/`` by default, or
``--bench-out DIR`` (``MSVIT_BENCH_OUT``); only ``--bench-record`` (``MSVIT_BENCH_RECORD=1``) writes
the committed ``bench/results/<device>/``. A run of some suites merges into the summary already
in that folder: the ratios and data of the suites that did not run are kept.
"""

import os

import pytest
import torch

from msvit.threads import HELP as THREADS_HELP
from msvit.threads import positive_int, use_threads

from results_io import OUT_ENV, device_slug, record_from_env, results_root
from spread import busy_report

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
    parser.addoption("--bench-threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)
    parser.addoption(
        "--bench-record",
        action="store_true",
        default=record_from_env(),
        help="write the committed bench/results/<device>/ (also MSVIT_BENCH_RECORD=1); default: bench/results-local/",
    )
    parser.addoption(
        "--bench-out",
        default=os.environ.get(OUT_ENV) or None,
        help=f"folder for the results of a timed run, not recorded (also {OUT_ENV}; default: bench/results-local/)",
    )


def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True
    use_threads(config.getoption("--bench-threads"))
    try:
        results_root(config.getoption("--bench-record"), config.getoption("--bench-out"))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def output_folder(config, device: str):
    """``<results root>/<device-slug>/``: where this session's timed results go."""
    return results_root(config.getoption("--bench-record"), config.getoption("--bench-out")) / device_slug(device)


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
def summary(bench_dtype) -> dict:
    """The run's summary: benchmarks add ``ratios`` (time a / time b, same run) and data for plots."""
    SUMMARY["dtype"] = str(bench_dtype).replace("torch.", "")
    return SUMMARY


@pytest.fixture(scope="session")
def results_folder(request, device):
    """The folder a suite writes its own result files to (not created until written)."""
    return output_folder(request.config, device)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--benchmark") and SUMMARY["ratios"]:  # partial runs merge, see write_summary
        from summary import write_summary

        device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = output_folder(session.config, device)
        write_summary(SUMMARY, device, folder)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"benchmark summary: {folder / 'summary.md'}")
            for line in busy_report():
                reporter.write_line(line)
