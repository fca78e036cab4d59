"""Ahead-of-time compile report: every Triton kernel, every config its launcher can choose, every
target GPU generation, compiled to a cubin without a GPU.

    python -m msvit_kernels.compile_report [--targets 70,75,80,86,89,90] [--json] [--out DIR] [--quick]

How: the real launchers run on small CPU stand-in tensors under ``launch.record_launches`` (see
``workloads``), so the arguments and constexprs are exactly those a GPU launch binds. Each recorded
launch is bound with Triton's own binder for ``GPUTarget("cuda", cap, 32)`` and compiled with
``triton.compile`` (the ptxas inside the triton wheel; no driver touched), once per config that
``TritonKernel.configs_for(cap, meta)`` keeps for that target. A row gives registers, spill bytes
and stack (ptxas ``-v``), shared memory (the kernel's metadata) against the target's per-block
limit, and compile seconds. The process must run without ``TRITON_INTERPRET`` (this module refuses).

A row is clean when it compiled, spilled nothing and fits the target's shared memory. The
first-call estimate per target sums the compile seconds of every config a first MSViT-S/16,32
training forward+backward compiles (autotuning compiles every candidate), in the dtype that target
would train in (float16 on sm_70/75, bfloat16 on sm_80+).
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple

TARGETS = (70, 75, 80, 86, 89, 90)


class Workload(NamedTuple):
    """One model-level use of the kernels: its name, dtype, head dim, and whether it is part of the
    first training call of MSViT-S/16,32 (the first-call compile estimate)."""

    name: str
    dtype: str
    head_dim: int
    first_call: bool


def _record(workload: Workload):
    """The launches of one workload, recorded from the real launchers on CPU stand-ins."""
    import torch

    from . import (
        attention_launch,
        entropy_kernel,
        gate_kernel,
        index_kernel,
        pack_kernel,
        tree_index_kernel,
        unpack_kernel,
    )
    from ._triton import record_launches
    from .scale_tree import ScaleTree
    from .varlen import StaticShape

    dtype = getattr(torch, workload.dtype)
    model = workload.name.split()[0]
    if model == "entropy-gate":  # APT's gate, in place of the MLP: default bins, both binnings, the extremes, grey
        images = torch.zeros(2, 3, 224, 224, dtype=dtype)
        with record_launches() as records:
            for bins, threshold, binning in (
                (entropy_kernel.DEFAULT_BINS, 5.5, "apt"),
                (entropy_kernel.DEFAULT_BINS, 5.5, "continuous"),
                (entropy_kernel.MIN_BINS, None, "apt"),
            ):
                entropy_kernel._launch(images, 32, (0.5,) * 3, (0.5,) * 3, bins, threshold, binning)
            entropy_kernel._launch(images[:, :1], 32, (0.5,), (0.5,), entropy_kernel.MAX_BINS, 5.5)
        return records
    if model == "list-entropy":  # APT's gate over a list of sizes (flat pixels): 2 and 3 scales, both binnings, grey
        from .tree_batch import TreeBatch

        pixels = torch.zeros(3 * (224 * 224 + 160 * 320), dtype=dtype)
        with record_launches() as records:
            for scales, bins, binning, chans in (
                (2, entropy_kernel.DEFAULT_BINS, "apt", 3),
                (3, entropy_kernel.DEFAULT_BINS, "apt", 3),
                (3, entropy_kernel.DEFAULT_BINS, "continuous", 3),
                (3, entropy_kernel.MIN_BINS, "apt", 3),
                (3, entropy_kernel.MAX_BINS, "apt", 1),
            ):
                batch = TreeBatch.of([(14, 14), (10, 20)], 2, scales)
                starts, norm = batch.scale_starts, (0.5,) * chans
                entropy_kernel._launch_list(
                    pixels,
                    batch.node_pixels(16, chans),
                    starts[1],
                    starts[-1] - starts[1],
                    16,
                    chans,
                    2 ** (scales - 1),
                    norm,
                    norm,
                    bins,
                    binning,
                )
        return records
    if model == "tree-pack":  # three scales (16/32/64 px, scale_tree.tree_index layouts) at ViT-S/16's width
        images, (dim, n_nodes, total) = torch.zeros(2, 3, 224, 224, dtype=dtype), (384, 196 + 49 + 9, 300)
        rows = torch.zeros(total - 2, dtype=torch.int64)
        with record_launches() as records:
            pack_kernel._pack_forward(
                images,
                torch.zeros(dim, 3 * 16 * 16, dtype=dtype),
                torch.zeros(dim, dtype=dtype),
                torch.zeros(n_nodes, dim, dtype=dtype),
                torch.zeros(2 * n_nodes, dtype=dtype),
                torch.zeros(1, dim, dtype=dtype),
                rows,
                rows,
                rows,
                torch.zeros(2, 1, dtype=torch.int64),
                total,
                16,
                2,
                3,
            )
        return records
    if model == "list-pack":  # a list of images of different sizes (flat pixels, docs/design.md section 11)
        from .tree_batch import TreeBatch

        dim, total = 384, 500
        rows = torch.zeros(total - 2, dtype=torch.int64)
        with record_launches() as records:
            for scales in (2, 3):
                batch = TreeBatch.of([(14, 14), (10, 20)], 2, scales)
                n_nodes = batch.scale_starts[-1]
                pack_kernel._pack_forward(
                    torch.zeros(3 * (224 * 224 + 160 * 320), dtype=dtype),
                    torch.zeros(dim, 3 * 16 * 16, dtype=dtype),
                    torch.zeros(dim, dtype=dtype),
                    torch.zeros(n_nodes, dim, dtype=dtype),
                    torch.zeros(n_nodes, dtype=dtype),
                    torch.zeros(1, dim, dtype=dtype),
                    rows,
                    rows,
                    rows,
                    torch.zeros(2, 1, dtype=torch.int64),
                    total,
                    16,
                    2,
                    scales,
                    batch.node_pixels(16, 3),
                )
        return records
    if model == "list-gate":  # the learned gate over a list of sizes (flat pixels): 32 / 64 px regions, train, infer
        from .tree_batch import TreeBatch

        hidden, pixels = 106, torch.zeros(3 * (224 * 224 + 160 * 320), dtype=dtype)
        batch = TreeBatch.of([(14, 14), (10, 20)], 2, 3)
        starts = batch.scale_starts
        with record_launches() as records:
            for s, training in ((1, True), (1, False), (2, True)):
                size, n_regions = 16 * 2**s, starts[s + 1] - starts[s]
                weights = _gate_weights(hidden, size, n_regions, dtype)
                noise = torch.zeros(n_regions, dtype=dtype) if training else None
                gate_kernel._list_gate_forward(
                    pixels, batch.node_pixels(16, 3), starts[s], size, weights, noise, 0.3, training
                )
        return records
    if model == "tree-index":  # the index of a tree of scales at 224 px (14 x 14 patches of 16): S=3, S=4, r=3
        with record_launches() as records:
            for ratio, scales in ((2, 3), (2, 4), (3, 3)):
                tree = ScaleTree.of((14, 14), ratio, scales)
                tree_index_kernel.triton_tree_index(torch.zeros(2, tree.decisions, dtype=torch.bool), tree, 1)
        return records
    dim, heads = {
        "ViT-S/16,32": (384, 6),
        "ViT-B/16,32": (768, 12),
        "attention": (workload.head_dim * 6, 6),
        "attention-pool": (workload.head_dim * 6, 6),  # keys in their own layout: one query per image
    }[model]
    head_dim = dim // heads
    batch, fine, coarse, hidden, prefix = 2, 16, 32, 106, 1
    grid, n_fine = (7, 7), 196
    images = torch.zeros(batch, 3, 224, 224, dtype=dtype)
    mask = torch.zeros(batch, 49, dtype=torch.bool)
    lengths = 150
    total = batch * lengths
    with record_launches() as records:
        if model != "attention":
            gate_weights = _gate_weights(hidden, coarse, 49, dtype)
            training = "train" in workload.name
            gate_kernel._gate_forward(
                images, coarse, gate_weights, torch.zeros(batch, 49) if training else None, 0.3, training
            )
            index_kernel._counts(mask, 2, prefix)
            index_kernel._index_maps(
                mask,
                torch.zeros(batch, 49, dtype=torch.int32),
                torch.zeros(batch + 1, dtype=torch.int32),
                StaticShape(total, lengths, 0),
                grid,
                2,
                prefix,
            )
            rows = torch.zeros(total - batch * prefix, dtype=torch.int64)
            pack_kernel._pack_forward(
                images,
                torch.zeros(dim, 3 * fine * fine, dtype=dtype),
                torch.zeros(dim, dtype=dtype),
                torch.zeros(n_fine + 49, dim, dtype=dtype),
                torch.zeros(batch * 49, dtype=dtype),
                torch.zeros(prefix, dim, dtype=dtype),
                rows,
                rows,
                rows,
                torch.zeros(batch, prefix, dtype=torch.int64),
                total,
                fine,
                2,
            )
            unpack_kernel._launch(
                torch.zeros(total, dim, dtype=dtype), torch.zeros(batch * n_fine, dtype=torch.int64), batch * n_fine
            )
        qkv = torch.zeros(total, 3, heads, head_dim, dtype=dtype)
        q, k, v = qkv.unbind(1)
        cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
        out = torch.zeros(total, heads, head_dim, dtype=dtype)
        lse = torch.zeros(heads, total)
        if model == "attention-pool":  # the SEPARATE_KV=True variant: B queries over B packed images
            pooled = (q[:batch], out[:batch], lse[:, :batch], cu_seqlens, 1)
            key_layout = dict(cu_seqlens_k=cu_seqlens, max_seqlen_k=246)
        else:
            pooled, key_layout = (q, out, lse, cu_seqlens, 246), {}
        queries, outputs, lses, cu_q, max_q = pooled
        attention_launch.attention_forward(queries, k, v, cu_q, max_q, head_dim**-0.5, **key_layout)
        if "infer" not in workload.name:
            attention_launch.attention_backward(
                outputs, queries, k, v, outputs, lses, cu_q, max_q, head_dim**-0.5, **key_layout
            )
    return records


def _gate_weights(hidden: int, region: int, n_regions: int, dtype) -> tuple:
    """Stand-ins for the gate's (w1, b1, pos, w2, b2, w3, b3, w4, b4): RGB regions of ``region`` px,
    a position table of ``n_regions`` rows."""
    import torch

    shapes = [(hidden, 3 * region * region), (hidden,), (n_regions, hidden), (hidden, hidden), (hidden,)]
    shapes += [(hidden, hidden), (hidden,), (1, hidden), (1,)]
    return tuple(torch.zeros(shape, dtype=dtype) for shape in shapes)


def workloads(quick: bool) -> List[Workload]:
    """The representative set (``quick``: what `make test` compiles) or the full sweep."""
    first = [Workload("ViT-S/16,32 train", d, 64, True) for d in ("float16", "bfloat16")]
    # each kernel variant the ViT workloads do not launch (the tree kernels: models of more than two scales)
    extras = (
        "attention-pool train",
        "entropy-gate infer",
        "tree-pack infer",
        "tree-index infer",
        "list-pack infer",
        "list-entropy infer",
        "list-gate train",
    )
    pool = [Workload(m, d, 64, False) for m in extras for d in ("float16", "bfloat16")]
    if quick:
        return first + [Workload("ViT-B/16,32 train", d, 64, False) for d in ("float16", "bfloat16")] + pool
    sweep = first + [Workload("ViT-S/16,32 train", "float32", 64, False)]
    sweep += [
        Workload(f"ViT-{m}/16,32 {mode}", d, 64, False)
        for m in "SB"
        for mode in ("train", "infer")
        for d in ("float16", "bfloat16", "float32")
        if not (m == "S" and mode == "train")
    ]
    sweep += [
        Workload("attention train", d, hd, False)
        for hd in (32, 80, 128, 256)
        for d in ("float16", "bfloat16", "float32")
    ]
    sweep += pool + [Workload(m, "float32", 64, False) for m in extras]
    return sweep


def _runs_on(target: int, workload: Workload) -> bool:
    """Which workloads a target runs: no bf16 and no head dim over 128 before sm_80 (the launchers
    refuse them there), and the first-call dtype is float16 on sm_70/75, bfloat16 from sm_80."""
    from . import attention_kernel

    if workload.dtype == "bfloat16" and target < 80:
        return False
    if workload.head_dim > attention_kernel.MAX_HEAD_DIM_BEFORE_AMPERE and target < 80:
        return False  # the attention backend refuses these head dims there (backends._triton_support)
    if workload.first_call and workload.dtype == "float16" and target >= 80:
        return False
    return True


class _Job(NamedTuple):
    workload: Workload
    launch: int
    target: int
    config: int


_JOBS: List[_Job] = []
_RECORDS: Dict[Workload, list] = {}
_UNFILTERED = [False]  # --unfiltered: every config of every kernel on every target (to derive the fits rules)
_KERNELS: List[str] = []  # --kernels: only the kernels whose name contains one of these (none: every kernel)


def _configs(record, target: int) -> list:
    kernel = record.kernel
    if _UNFILTERED[0] and kernel.configs is not None:
        return [c for c, _ in kernel.configs]
    return kernel.configs_for(target, record.meta)


def _plan(quick: bool, targets) -> List[_Job]:
    """Every (launch, target, config) to compile, each distinct compile once (ViT-S and ViT-B share
    most kernels' signatures)."""
    jobs, seen = [], set()
    for workload in workloads(quick):
        records = _RECORDS.setdefault(workload, _record(workload))
        for target in targets:
            if not _runs_on(target, workload):
                continue
            for i, record in enumerate(records):
                if _KERNELS and not any(part in record.kernel.name for part in _KERNELS):
                    continue
                for j, _ in enumerate(_configs(record, target)):
                    job = _Job(workload, i, target, j)
                    key = _bind(job)[-1]
                    if key not in seen:
                        seen.add(key)
                        jobs.append(job)
    return jobs


def _bind(job: _Job):
    """Triton's own binder over the recorded arguments, for the job's target: what a launch compiles."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    record = _RECORDS[job.workload][job.launch]
    config = _configs(record, job.target)[job.config]
    fn = record.kernel.fn
    kwargs = dict(record.meta, **(config.all_kwargs() if config is not None else {}))
    target = GPUTarget("cuda", job.target, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*record.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = f"{record.kernel.name}|{signature}|{sorted(constexprs.items())}|{sorted(kwargs.items())}|{job.target}"
    return record, kwargs, target, (options, signature, constexprs, attrs), key


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(job: _Job) -> dict:
    """Compile one (launch, config, target); never raises: a failure is a row with ok=False."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    from ._triton import SHARED_MEMORY_LIMIT

    record, kwargs, target, (options, signature, constexprs, attrs), key = _bind(job)
    fn = record.kernel.fn
    row = dict(
        kernel=record.kernel.name,
        workload=job.workload.name,
        dtype=job.workload.dtype,
        target=job.target,
        config=_config_text(kwargs, record.meta),
        ok=False,
        registers=None,
        spill_bytes=None,
        stack_bytes=None,
        shared=None,
        shared_limit=SHARED_MEMORY_LIMIT[job.target],
        seconds=None,
        first_call=job.workload.first_call,
        error="",
    )
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as error:  # noqa: BLE001  the report shows it
        row["error"] = (
            f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        )
        row["seconds"] = round(time.perf_counter() - start, 2)
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    regs, spills = _PTXAS.search(text), _SPILLS.search(text)
    row["registers"] = int(regs.group(1)) if regs else None
    if spills:
        row["stack_bytes"] = int(spills.group(1))
        row["spill_bytes"] = int(spills.group(2)) + int(spills.group(3))
    row["shared"] = int(compiled.metadata.shared)
    row["ok"] = row["spill_bytes"] == 0 and row["shared"] <= row["shared_limit"]
    if not row["ok"]:
        row["error"] = "spills" if row["spill_bytes"] else ("no ptxas log" if spills is None else "shared memory")
    return row


def _config_text(kwargs: dict, meta: dict) -> str:
    tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("BINS", "num_warps", "num_stages")}
    names = ("GATHER", "HEAD", "HAS_NOISE", "SAVE_PRE", "SEPARATE_KV", "HAS_THRESHOLD", "APT")
    flags = [k for k in names if meta.get(k)]
    flags += [f"SCALES={meta['SCALES']}"] if meta.get("SCALES", 2) > 2 else []  # the two-scale rows read as before
    flags += ["LIST"] if meta.get("LIST") else []
    return " ".join([f"{k}={v}" for k, v in tiles.items()] + flags)


def _init_worker(quick: bool, targets, unfiltered: bool, kernels) -> None:
    _UNFILTERED[0] = unfiltered
    _KERNELS[:] = kernels
    _JOBS[:] = _plan(quick, targets)


def _run_job(i: int) -> dict:
    return _compile(_JOBS[i])


def run_report(
    targets=TARGETS, quick: bool = False, jobs: int = 0, progress=None, unfiltered: bool = False, kernels=()
) -> dict:
    """Compile everything; returns {"rows": [...], "first_call_seconds": {target: s}, "triton": version}."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile report needs real launch configs: run it without TRITON_INTERPRET")
    _UNFILTERED[0] = unfiltered
    _KERNELS[:] = kernels
    plan = _plan(quick, targets)
    workers = jobs or min(len(os.sched_getaffinity(0)), 8)
    rows = []
    if workers > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
        initargs = (quick, tuple(targets), unfiltered, tuple(kernels))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs) as pool:
            for row in pool.map(_run_job, range(len(plan))):
                rows.append(row)
                if progress:
                    progress(len(rows), len(plan))
    else:
        for job in plan:
            rows.append(_compile(job))
            if progress:
                progress(len(rows), len(plan))
    first_call = {t: round(sum(r["seconds"] for r in rows if r["target"] == t and r["first_call"]), 1) for t in targets}
    return {"triton": triton.__version__, "targets": list(targets), "rows": rows, "first_call_seconds": first_call}


def to_markdown(report: dict) -> str:
    rows = report["rows"]
    bad = [r for r in rows if not r["ok"]]
    lines = [
        f"# Triton compile report (triton {report['triton']}, no GPU: ptxas from the triton wheel)",
        "",
        f"{len(rows)} compiles, {len(bad)} not clean. Clean = compiled, 0 spill bytes, shared memory within the "
        "target's per-block limit.",
        "",
        "First-call compile estimate (MSViT-S/16,32 training forward+backward, every autotune candidate; "
        "float16 on sm_70/75, bfloat16 on sm_80+): "
        + ", ".join(f"sm_{t}: {s} s" for t, s in report["first_call_seconds"].items()),
        "",
        "| kernel | config | dtype | target | ok | regs | spill B | stack B | smem B | limit B | compile s "
        "| workload |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["target"], r["dtype"], r["config"])):
        ok = "yes" if r["ok"] else f"NO ({r['error']})"
        lines.append(
            f"| {r['kernel']} | {r['config']} | {r['dtype']} | sm_{r['target']} | {ok} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['stack_bytes']} | {r['shared']} | {r['shared_limit']} | {r['seconds']} | "
            f"{r['workload']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m msvit_kernels.compile_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--targets",
        default=",".join(map(str, TARGETS)),
        help="compute capabilities, comma separated (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--out", help="also write summary.json and summary.md into this folder")
    parser.add_argument("--quick", action="store_true", help="the representative set make test compiles")
    parser.add_argument(
        "--unfiltered",
        action="store_true",
        help="compile every config on every target, ignoring the per-GPU rules (an audit of the rules)",
    )
    parser.add_argument(
        "--kernels",
        default="",
        help="only the kernels whose name contains one of these comma-separated parts (e.g. _attn after a change "
        "to the attention kernels; default: every kernel)",
    )
    parser.add_argument(
        "--jobs", type=int, default=0, help="parallel compile processes (default: one per core, up to 8)"
    )
    args = parser.parse_args(argv)
    try:
        targets = tuple(int(t) for t in args.targets.split(","))
    except ValueError:
        parser.error(f"--targets must be comma-separated integers like 70,80,90, got {args.targets!r}")
    from ._triton import SHARED_MEMORY_LIMIT

    unknown = [t for t in targets if t not in SHARED_MEMORY_LIMIT]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {sorted(SHARED_MEMORY_LIMIT)}")

    def progress(done, total):
        print(f"\rcompiled {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    kernels = [part for part in args.kernels.split(",") if part]
    report = run_report(
        targets, quick=args.quick, jobs=args.jobs, progress=progress, unfiltered=args.unfiltered, kernels=kernels
    )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(to_markdown(report))
    print(json.dumps(report, indent=1) if args.json else to_markdown(report))
    return 0 if all(r["ok"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
