"""python bench/study.py: run the benchmark study on this machine and print its summary.

Runs pytest bench/ --benchmark on the chosen suites with the chosen options, writes
summary.{json,md} and plots into bench/results-local/<device>/ (--out DIR: DIR/<device>/;
--record: the committed bench/results/<device>/), merged into the summary already there, and
prints the table. Benchmarks live in the repository, not in the installed package.
"""

import argparse
import os
import sys
from pathlib import Path

from msvit.threads import add_threads_argument

BENCH = Path(__file__).resolve().parent
SUITES = ["inference", "training", "attention"]  # the default set; "peers" (bench_peers.py) on request


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python bench/study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_small_patch16_224", help="timm ViT to convert (224px, patch 16)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: 256 on GPU, 32 (inference) / 16 (training) on CPU"
    )
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--backend", default="auto", help="packed-attention backend for the MSViT runs")
    p.add_argument(
        "--suite",
        action="append",
        choices=SUITES + ["peers"],
        help="run only these suites (repeatable; default: inference, training, attention)",
    )
    p.add_argument("--smoke", action="store_true", help="run each benchmark once, untimed")
    add_threads_argument(p)
    p.add_argument("--record", action="store_true", help="write the committed bench/results/<device>/")
    p.add_argument("--out", default=None, help="results folder (default: bench/results-local/)")
    args = p.parse_args(argv)
    import pytest

    files = [str(BENCH / f"bench_{s}.py") for s in (args.suite or SUITES)]
    options = [
        "-q",
        "-p",
        "no:cacheprovider",
        f"--rootdir={BENCH.parent}",
        "--bench-model",
        args.model,
        "--bench-backend",
        args.backend,
    ]
    options += ["--bench-batch", str(args.batch_size)] if args.batch_size else []
    options += ["--bench-dtype", args.dtype] if args.dtype else []
    options += [] if args.smoke else ["--benchmark"]
    options += ["--bench-record"] if args.record else []
    options += ["--bench-out", args.out] if args.out else []
    options += ["--bench-threads", str(args.threads)] if args.threads else []
    code = pytest.main(files + options)
    import torch

    from results_io import OUT_ENV, device_slug, record_from_env, results_root

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = results_root(args.record or record_from_env(), args.out or os.environ.get(OUT_ENV) or None)
    table = root / device_slug(device) / "summary.md"
    if table.exists() and not args.smoke:
        print("\n" + table.read_text())
    sys.exit(int(code))


if __name__ == "__main__":
    main()
