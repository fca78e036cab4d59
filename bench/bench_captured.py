"""Whole-forward GPU study, host time and device time apart: does the packed forward follow its tokens?

The one H200 run took 10-12 ms per packed batch-256 forward at 65 and at 197 tokens per image, and
9.9 ms at batch 1: host time (docs/design.md section 9). Per forward this suite reports

- ``host_ms``: the Python call, no synchronisation (time the host spends queueing it);
- ``device_ms``: CUDA events around the call (device time, plus idle gaps when the host is slower);
- ``wall_ms``: synchronise to synchronise; ``kernel_ms``: the sum of the forward's kernel times
  (torch.profiler, one call): the device's busy time, what a host-free forward would cost.

for: ViT-S eager at 128/160/192/224 px (65/101/146/197 tokens), ViT-S ``torch.compile(mode=
"reduce-overhead")`` at 160 px, MSViT-S packed eager per attention backend (triton, torch_varlen,
flash_attn when installed, and which kernels torch_varlen ran: flash or cuDNN), packed captured
(``msvit.compile_packed``, CUDA graphs) with a budget at the four token counts and with buckets at
~101 tokens, dense-masked at ~101 tokens; batch 1: captured packed vs eager ViT-S. A variant that
fails is reported with its error and the study goes on. Timed runs on CUDA write
``captured_summary.{json,md}`` into the run's results folder
(``bench/results/<device>/`` with ``--bench-record``, as gpu_check.sh runs it); on CPU, or without ``--benchmark``, one
tiny captured-less pass checks the code path.
"""

import json
import statistics
import time

import pytest
import timm
import torch

import msvit
from msvit_kernels import available_backends

from bench_inference import VIT_SIZES
from results_io import environment

BATCH, REPEATS = 256, 20
HEADLINE = 17  # fine regions per image: 101 tokens, ViT-S at 160 px


def time_forward(fn, repeats: int) -> dict:
    """Medians of host, device (events) and wall ms per call; fn is warmed up first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    host, device, wall = [], [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append(1e3 * (t1 - t0))
        wall.append(1e3 * (t2 - t0))
        device.append(start.elapsed_time(end))
    return {name: statistics.median(v) for name, v in (("host_ms", host), ("device_ms", device), ("wall_ms", wall))}


def kernels_of(fn) -> dict:
    """Kernel time (ms) of one call and the names of its attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    words = ("attn", "flash", "cudnn", "fmha")
    attention = sorted({e.key[:60] for e in events if any(w in e.key.lower() for w in words)})
    return {"kernel_ms": total / 1e3, "attention_kernels": attention}


def fine_regions_mask(batch: int, fine: int, generator) -> torch.Tensor:
    return torch.rand(batch, 49, generator=generator).argsort(1) < fine


def study(device: str, dtype, batch: int, repeats: int, profile_kernels: bool) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows = {}

    def run(name, make):
        """Time ``make()`` (which returns the zero-argument forward) under inference_mode."""
        try:
            with torch.inference_mode():
                fn = make()
                row = time_forward(fn, repeats)
                if profile_kernels:
                    try:
                        row.update(kernels_of(fn))
                    except Exception as error:  # keep the timing when the profiler fails
                        row["kernels_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        except Exception as error:  # a broken variant must not cost the GPU window the others
            row = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        rows[name] = row
        print(name, row, flush=True)

    def vit_s(**kwargs):  # models are built outside inference_mode, as users build them
        return timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval().to(device, dtype)

    def msvit_s():
        return msvit.from_timm("vit_small_patch16_224").eval().to(device, dtype)

    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    for size, fine in VIT_SIZES.items():
        tokens = 1 + 49 + 3 * fine
        vit = vit_s(img_size=size)
        small = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        run(f"vit eager {tokens}", lambda: lambda: vit(small))
        if fine == HEADLINE:
            compiled = torch.compile(vit, mode="reduce-overhead")
            run(f"vit compiled {tokens}", lambda: lambda: compiled(small))
        model = msvit_s()
        run(f"packed captured budget {tokens}", lambda: captured(model, images, budget=fine))
        if fine == HEADLINE:
            mask = fine_regions_mask(batch, fine, gen).to(device)
            for backend in ("triton", "torch_varlen", "flash_attn"):
                if backend in available_backends(device, dtype):
                    model.attention_backend = backend
                    run(f"packed eager {backend} {tokens}", lambda: lambda: model(images, mask=mask))
            model.attention_backend = "auto"
            run(f"masked eager {tokens}", lambda: lambda: model(images, mask=mask, mode="masked"))
            run(f"packed captured buckets ~{tokens}", lambda: bucketed_runner(model, images, fine))
    vit = vit_s()
    one = images[:1]
    run("batch1 vit eager 197", lambda: lambda: vit(one))
    model = msvit_s()
    run(f"batch1 packed eager {1 + 49 + 3 * HEADLINE}", lambda: lambda: model(one, budget=HEADLINE))
    run(f"batch1 packed captured {1 + 49 + 3 * HEADLINE}", lambda: captured(model, one, budget=HEADLINE))
    return rows


def captured(model, images, **options):
    """The zero-argument forward of a captured runner for ``images``' batch."""
    runner = msvit.compile_packed(model, images.shape[0], 224, **options)
    return lambda: runner(images)


def bucketed_runner(model, images, fine: int):
    """A runner with the default buckets whose gate keeps ~``fine`` of 49 regions fine (its last bias
    shifted to that quantile of the random gate's logits): the one-read path."""
    logits = model.gate(images).float()
    with torch.no_grad():
        model.gate.fc4.bias -= torch.quantile(logits.flatten(), 1 - fine / 49).to(model.gate.fc4.bias.dtype)
    return captured(model, images)


def ratios(rows: dict) -> dict:
    def ms(name):
        row = rows.get(name, {})
        return row.get("wall_ms")

    out = {}
    tokens = 1 + 49 + 3 * HEADLINE
    best_vit = min(filter(None, (ms(f"vit eager {tokens}"), ms(f"vit compiled {tokens}"))), default=None)
    for fine in VIT_SIZES.values():
        t = 1 + 49 + 3 * fine
        vit_t = min(filter(None, (ms(f"vit eager {t}"), ms(f"vit compiled {t}"))), default=None)
        if ms(f"packed captured budget {t}") and vit_t:
            out[f"captured_over_best_vit_{t}"] = ms(f"packed captured budget {t}") / vit_t
    if best_vit and ms(f"packed captured buckets ~{tokens}"):
        out["bucketed_over_best_vit"] = ms(f"packed captured buckets ~{tokens}") / best_vit
    if ms(f"masked eager {tokens}") and ms(f"packed captured budget {tokens}"):
        out["masked_over_captured"] = ms(f"masked eager {tokens}") / ms(f"packed captured budget {tokens}")
    if ms("batch1 vit eager 197") and ms(f"batch1 packed captured {tokens}"):
        out["batch1_captured_over_vit_eager"] = ms(f"batch1 packed captured {tokens}") / ms("batch1 vit eager 197")
    return out


TARGETS = {  # docs/design.md section 7
    "captured_over_best_vit_101": ("<=", 1.05),
    "masked_over_captured": (">=", 2.0),
    "batch1_captured_over_vit_eager": ("<=", 0.5),
}


def test_captured_forward_study(benchmark, timed, device, bench_dtype, results_folder):
    if device != "cuda":
        model = msvit.from_timm("vit_small_patch16_224", timm_kwargs=dict(pretrained=False, depth=1, img_size=64))
        model.eval()
        runner = msvit.compile_packed(model, 2, 64, budget=2, mode="eager")
        benchmark.pedantic(lambda: runner(torch.randn(2, 3, 64, 64)), rounds=1, iterations=1)
        return
    if not timed:
        pytest.skip("the GPU study runs with --benchmark (bench/gpu_check.sh)")
    rows = study(device, bench_dtype, BATCH, REPEATS, profile_kernels=True)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    write(rows, ratios(rows), bench_dtype, results_folder)


def write(rows: dict, measured: dict, dtype, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    env = environment("cuda")
    record = {"environment": env, "dtype": str(dtype), "batch": BATCH, "rows": rows, "ratios": measured}
    (folder / "captured_summary.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        f"# Whole forwards, host and device time apart ({env['device']}, {dtype}, batch {BATCH})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, {env['date']}",
        "",
        "| forward | host ms | device ms | wall ms | kernel ms | attention kernels |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:120]} | | | | |")
            continue
        kernels = ", ".join(row.get("attention_kernels", []))[:80]
        lines.append(
            f"| {name} | {row['host_ms']:.2f} | {row['device_ms']:.2f} | {row['wall_ms']:.2f} | "
            f"{row.get('kernel_ms', float('nan')):.2f} | {kernels} |"
        )
    lines += ["", "| ratio (wall) | measured | target |", "|---|---|---|"]
    for name, value in measured.items():
        target = TARGETS.get(name)
        lines.append(f"| {name} | {value:.3f} | {' '.join(map(str, target)) if target else '-'} |")
    (folder / "captured_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
