"""``msvit.export`` on a real device: package a small MSViT (ViT-S/16 width, two blocks, the entropy
gate, a budget), load each package in a process that never imports msvit, and compare its logits
and its time per call with the eager model's.

    PYTHONPATH=. python bench/export_check.py [--device cuda] [--kernels reference,triton] [--batch 8] [--out DIR]

One package per ``--kernels`` entry (default on CUDA: both): ``reference``, the torch path of
every op compiled by Inductor, and ``triton``, the package's fused index, pack and attention
kernels as ``triton_op``s (the entropy kernel included; docs/design.md section
14). A functional check for bench/gpu_check.sh (the package must carry everything a CUDA forward
needs), not a benchmark: two blocks keep AOTInductor's compiles within the stage's limit, and the
eager model (here) and each package (in its process) are timed one after the other, 20 calls after
a warm-up. Prints one line per step as it goes; exits 1 when a package's logits differ from the
eager model's or a package fails.
"""

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

import msvit

RUN_PACKAGE = textwrap.dedent("""
    import sys, time
    import torch
    from torch._inductor import aoti_load_package

    package = aoti_load_package(sys.argv[1])
    images = torch.load(sys.argv[2]).to(sys.argv[4])
    logits = package(images)
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync(); start = time.perf_counter()
    for _ in range(20):
        package(images)
    sync()
    torch.save(logits.cpu(), sys.argv[3])
    assert not [m for m in sys.modules if m.split(".")[0] in ("msvit", "msvit_kernels")], "msvit was imported"
    print(f"package: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms per call")
""")


def timed(call, sync, repeats: int = 20) -> float:
    """Milliseconds per call (after the caller's warm-up call)."""
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def check_package(model, images, args, kernels: str, folder: Path, expected: torch.Tensor, eager_ms: float) -> bool:
    """Export with ``kernels``, run the package in a fresh process, print its time and error; True if it matches."""
    start = time.perf_counter()
    try:
        path = msvit.export(
            model, folder / f"msvit_s2_{kernels}.pt2", args.batch, 224, budget=args.budget, kernels=kernels
        )
    except Exception as error:  # a failed export is this package's result, not the end of the check
        print(f"[{kernels}] export failed: {type(error).__name__}: {str(error)[:500]}", flush=True)
        return False
    print(f"[{kernels}] export + AOTInductor: {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    logits = folder / f"logits_{kernels}.pt"
    done = subprocess.run(
        [sys.executable, "-c", RUN_PACKAGE, str(path), str(folder / "images.pt"), str(logits), args.device],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode:
        print(f"[{kernels}] package failed: {done.stderr[-2000:]}", flush=True)
        return False
    package_ms = float(done.stdout.split("package: ")[-1].split(" ms")[0])
    error = (torch.load(logits) - expected).abs().max().item()
    ok = error < 1e-3 * max(1.0, expected.abs().max().item())
    print(
        f"[{kernels}] package: {package_ms:.2f} ms per call ({package_ms / eager_ms:.2f}x eager); "
        f"max |package - eager| = {error:.2e}{'' if ok else ' (too large)'}",
        flush=True,
    )
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--kernels",
        default=None,
        help="packages to build, comma separated (default: reference,triton on CUDA, reference elsewhere)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--out", default=None, help="folder for the packages (default: a temporary one)")
    args = p.parse_args()
    kinds = (args.kernels or ("reference,triton" if args.device.startswith("cuda") else "reference")).split(",")
    folder = Path(args.out or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    vit = dict(depth=2, num_classes=10)
    model = msvit.from_timm("vit_small_patch16_224", timm_kwargs=vit, gate="entropy").to(args.device).eval()
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.save(images, folder / "images.pt")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    on_device = images.to(args.device)
    with torch.inference_mode():
        expected = model(on_device, budget=args.budget).cpu()
        eager_ms = timed(lambda: model(on_device, budget=args.budget), sync)
    print(
        f"eager model: {eager_ms:.2f} ms per call (batch {args.batch}, budget {args.budget}, {args.device})", flush=True
    )
    results = [check_package(model, images, args, kernels, folder, expected, eager_ms) for kernels in kinds]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
