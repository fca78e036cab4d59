"""Where benchmark results go: ``bench/results/<device-slug>/<name>.json`` plus a Markdown table."""
import datetime
import json
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


def write_result(name: str, payload: dict, markdown: str, device: str = "cpu") -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under this device's results folder."""
    folder = RESULTS / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    return folder
