"""Benchmarks run with ``pytest bench/ --benchmark``; without the flag each one runs once as a smoke test.

The smoke mode is pytest-benchmark's own ``--benchmark-disable`` (the function runs once, untimed),
so ``make test`` exercises every benchmark cheaply and the timed study needs one flag.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False, help="time the benchmarks (default: run each once)")


def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def timed(request) -> bool:
    """True under ``--benchmark``: benchmarks use their full sizes instead of smoke sizes."""
    return request.config.getoption("--benchmark")
