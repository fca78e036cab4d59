"""Where benchmark results go and what every result records.

``bench/results/<device-slug>/`` holds the committed reference results: a timed run writes there
only when asked to record (``--bench-record`` or ``MSVIT_BENCH_RECORD=1``), so trying one suite
never replaces them. Otherwise results go to ``--bench-out DIR`` (or ``MSVIT_BENCH_OUT``), by
default ``bench/results-local/`` (ignored by git), in the same ``<device-slug>/`` layout.
"""

import datetime
import os
import platform
import re
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).parent / "results"
LOCAL = Path(__file__).parent / "results-local"
RECORD_ENV, OUT_ENV = "MSVIT_BENCH_RECORD", "MSVIT_BENCH_OUT"


def record_from_env() -> bool:
    return os.environ.get(RECORD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def results_root(record: bool = False, out: Optional[str] = None) -> Path:
    """bench/results/ when recording, else ``out``, else bench/results-local/."""
    if record and out:
        raise ValueError(f"recording writes {RESULTS}; --bench-out / {OUT_ENV} names another folder: give one")
    if record:
        return RESULTS
    return Path(out) if out else LOCAL


def add_output_arguments(parser, name: str) -> None:
    """``--record`` and ``--out FILE`` of a script that writes one results file ``name``."""
    parser.add_argument("--record", action="store_true", help=f"write the committed bench/results/{name}")
    parser.add_argument("--out", default=None, help=f"the file to write (default: bench/results-local/{name})")


def output_file(name: str, record: bool, out: Optional[str]) -> Path:
    """Where a script's results file goes: ``out``, else bench/results/ when recording, else
    bench/results-local/ (ignored by git): trying a README command never rewrites a committed file."""
    if record and out:
        raise ValueError(f"--record writes {RESULTS / name}; --out names another file: give one")
    if out:
        return Path(out)
    return (RESULTS if record else LOCAL) / name


def device_name(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str = "cpu") -> str:
    kind = torch.device(device).type
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"{kind}-{name}"[:80]


def environment(device: str = "cpu") -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
