"""Where benchmark results go (``bench/results/<device-slug>/``) and what every result records."""

import datetime
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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
