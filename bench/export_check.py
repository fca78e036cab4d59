"""``msvit.export`` on a real device: package a small MSViT (ViT-S/16 width, two blocks, the entropy
gate, a budget), load the package in a process that never imports msvit, and compare its logits
and its time per call with the eager model's.

    PYTHONPATH=. python bench/export_check.py [--device cuda] [--batch 8] [--out DIR]

A functional check for bench/gpu_check.sh (the package must carry everything a CUDA forward needs;
docs/design.md section 14), not a benchmark: two blocks keep AOTInductor's compile within the
stage's limit. Prints one line per step; exits 1 when the logits differ.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--out", default=None, help="folder for the package (default: a temporary one)")
    args = p.parse_args()
    folder = Path(args.out or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    vit = dict(depth=2, num_classes=10)
    model = msvit.from_timm("vit_small_patch16_224", timm_kwargs=vit, gate="entropy").to(args.device).eval()
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    path = msvit.export(model, folder / "msvit_s2.pt2", args.batch, 224, budget=args.budget)
    print(f"export + AOTInductor: {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    torch.save(images, folder / "images.pt")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_PACKAGE,
            str(path),
            str(folder / "images.pt"),
            str(folder / "logits.pt"),
            args.device,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(done.stdout.strip() or done.stderr[-2000:])
    if done.returncode:
        sys.exit(1)
    with torch.inference_mode():
        expected = model(images.to(args.device), budget=args.budget).cpu()
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(20):
            model(images.to(args.device), budget=args.budget)
        sync()
    print(f"eager model: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms per call")
    error = (torch.load(folder / "logits.pt") - expected).abs().max().item()
    print(f"max |package - eager| = {error:.2e} (batch {args.batch}, budget {args.budget}, {args.device})")
    sys.exit(0 if error < 1e-3 * max(1.0, expected.abs().max().item()) else 1)


if __name__ == "__main__":
    main()
