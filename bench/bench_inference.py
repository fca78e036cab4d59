"""End-to-end inference: timm ViT-S/16 at 128/160/192/224px against MSViT-S/16,32 at 224px with
gate budgets giving the same mean token counts, in packed, dense-masked and trimmed modes, and the
peer timm NaFlexViT fed MSViT's per-image token counts (bench/naflex.py).

CPU: float32, batch 32. GPU: bfloat16, batch 256 (throughput) and batch 1 (latency). Masks vary
per image around the mean (a gate's masks do), so trimmed mode pads to the batch's longest image.
All variants of one token count are timed interleaved (bench/spread.py), medians reported; the
ratios and their spread go into the run's summary.

On CPU with one torch thread the suite also records the ratios of process CPU seconds
(``..._cpu_seconds``, no target): a one-thread forward's CPU time leaves out the time it waited for
a core, which its wall time holds. On the shared 2-core machine at load 11 a batch-1 ViT-S forward
took 125-140 ms of wall time for 54 ms of CPU time, so there the wall-clock ratio measures the load
(docs/design.md section 13).
"""

import time

import pytest
import timm
import torch

import msvit
from msvit.models.flops import macs_for_tokens

from naflex import naflex_batch, naflex_like
from spread import add_ratio, interleaved_times
from spread import medians as median_of

VIT_SIZES = {128: 5, 160: 17, 192: 32, 224: 49}  # ViT image size -> fine regions giving its tokens at 224px
HALF_FINE = 25  # ~50% fine regions, where the GPU targets are stated


class CpuSeconds:
    """``runs`` whose every call also appends its process CPU seconds to ``seconds[name]``."""

    def __init__(self, runs):
        self.seconds = {name: [] for name in runs}
        self.runs = {name: self._timed(name, fn) for name, fn in runs.items()}

    def _timed(self, name, fn):
        def call():
            start = time.process_time()
            out = fn()
            self.seconds[name].append(time.process_time() - start)
            return out

        return call

    def after_warmup(self):
        """The seconds of the timed repetitions (``interleaved_times`` calls every run once first)."""
        return {name: seconds[1:] for name, seconds in self.seconds.items()}


def one_cpu_thread(device) -> bool:
    """CPU seconds measure a forward's work only where one thread does it (more add up their seconds)."""
    return device == "cpu" and torch.get_num_threads() == 1


def spread_masks(batch: int, mean_fine: int, n_regions: int = 49, seed: int = 0) -> torch.Tensor:
    """Masks whose fine-region counts spread uniformly around ``mean_fine`` (exact mean)."""
    generator = torch.Generator().manual_seed(seed)
    spread = min(mean_fine, n_regions - mean_fine, 10)
    offsets = torch.linspace(-spread, spread, batch).round().long() if batch > 1 else torch.zeros(1, dtype=torch.long)
    counts = (mean_fine + offsets - offsets.sum() // batch).clamp(0, n_regions)
    order = torch.rand(batch, n_regions, generator=generator).argsort(1)
    return order < counts[:, None]


@pytest.fixture(scope="module")
def msvit_s(device, timed, bench_options, bench_dtype):
    """(MSViT with random weights, dtype, batch, plain-ViT factory) for this device and mode."""
    cuda = device == "cuda"
    dtype = bench_dtype
    batch = (bench_options["batch"] or (256 if cuda else 32)) if timed else 2
    name = bench_options["model"]
    torch.manual_seed(0)
    model = msvit.from_timm(name, attention_backend=bench_options["backend"]).eval().to(device, dtype)

    def plain_vit(size):
        return timm.create_model(name, pretrained=False, img_size=size).eval().to(device, dtype)

    return model, dtype, batch, plain_vit


def test_inference_latency_vs_tokens(benchmark, timed, summary, device, msvit_s, bench_options):
    model, dtype, batch, plain_vit = msvit_s
    sizes = list(VIT_SIZES) if timed else [160]
    repeats = 7 if timed else 1  # 7 interleaved repetitions, as the peer suite's batch 32
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    points, medians, times, cpu_times = [], {}, {}, {}
    naflex = naflex_like(model).eval().to(device, dtype)  # the peer: padded + masked at MSViT's token counts
    with torch.inference_mode():
        for size in sizes + ([None] if timed else []):
            fine = VIT_SIZES[size] if size else HALF_FINE
            mask = spread_masks(batch, fine).to(device)
            tokens = model.tokens_per_image(mask).double()
            runs = {
                "packed": lambda: model(images, mask=mask),
                "masked": lambda: model(images, mask=mask, mode="masked"),
                "trimmed": lambda: model(images, mask=mask, mode="trimmed"),
                "naflex": lambda batch=naflex_batch(images, tokens): naflex(batch),
            }
            if size:
                vit = plain_vit(size)
                small = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
                runs["vit"] = lambda: vit(small)
            cpu = CpuSeconds(runs)
            times[fine] = interleaved_times(cpu.runs, repeats, device)
            cpu_times[fine] = cpu.after_warmup()
            medians[fine] = median_of(times[fine])
            counted = {
                "packed": tokens,
                "masked": torch.full_like(tokens, 1 + 49 * 5),
                "trimmed": torch.full_like(tokens, 1 + float((tokens - 1).max())),
                "naflex": torch.full_like(tokens, 1 + float((tokens - 1).max())),  # padded like trimmed
                "vit": 1 + (size or 0) ** 2 / 256,
            }
            for variant, seconds in medians[fine].items():
                n = counted[variant] if variant != "vit" else torch.tensor([counted["vit"]], dtype=torch.float64)
                gated = variant not in ("vit", "naflex")
                gmacs = macs_for_tokens(model, n, 49, include_gate=gated)["total"].mean().item() / 1e9
                points.append(
                    {
                        "variant": variant,
                        "fine_regions": fine,
                        "tokens": float(n.mean()),
                        "ms": seconds * 1e3,
                        "gmacs": gmacs,
                    }
                )
        benchmark.pedantic(lambda: model(images, mask=spread_masks(batch, 17).to(device)), rounds=repeats, iterations=1)
    benchmark.extra_info["points"] = points
    if not timed:
        return
    at_101, at_half = times[17], times[HALF_FINE]
    target_point = at_half if device == "cuda" else at_101  # the GPU targets are stated at ~50% fine
    summary.update(model=f"MSViT from {bench_options['model']}", inference_batch=batch, inference_points=points)
    add_ratio(summary, "packed_over_vit_same_tokens", at_101["packed"], at_101["vit"])
    if one_cpu_thread(device):
        add_ratio(summary, "packed_over_vit_same_tokens_cpu_seconds", cpu_times[17]["packed"], cpu_times[17]["vit"])
    add_ratio(summary, "masked_over_packed", target_point["masked"], target_point["packed"])
    add_ratio(summary, "trimmed_over_packed", target_point["trimmed"], target_point["packed"])


def test_batch1_latency(benchmark, timed, summary, device, msvit_s):
    """Batch-1 latency at ~101 tokens: packed and dense-masked MSViT against ViT-S at 160px, timed
    interleaved as at batch 32, so the batch-1 target ratio is measured here with its spread.
    bench_peers.py times the same three models on the same mask at batch 1 and records the same
    two ratios: a session running both suites keeps the later one (peers)."""
    model, dtype, _, plain_vit = msvit_s
    vit = plain_vit(160)
    x = torch.randn(1, 3, 224, 224, device=device, dtype=dtype)
    small = torch.randn(1, 3, 160, 160, device=device, dtype=dtype)
    mask = spread_masks(1, 17).to(device)
    runs = {
        "packed": lambda: model(x, mask=mask),
        "masked": lambda: model(x, mask=mask, mode="masked"),
        "vit": lambda: vit(small),
    }
    repeats = 21 if timed else 1  # as the peer suite's batch 1: single images are noisier
    cpu = CpuSeconds(runs)
    with torch.inference_mode():
        times = interleaved_times(cpu.runs, repeats, device)
        cpu_times = cpu.after_warmup()
        benchmark.pedantic(runs["packed"], rounds=5 if timed else 1, iterations=1)
    ms = {k: v * 1e3 for k, v in median_of(times).items()}
    benchmark.extra_info["ms"] = ms
    if timed:
        summary["batch1_ms"] = ms
        add_ratio(summary, "packed_over_vit_same_tokens_b1", times["packed"], times["vit"])
        if one_cpu_thread(device):
            add_ratio(summary, "packed_over_vit_same_tokens_b1_cpu_seconds", cpu_times["packed"], cpu_times["vit"])
        add_ratio(summary, "masked_over_packed_b1", times["masked"], times["packed"])


CPU_BACKENDS = ("grouped_sdpa", "reference", "padded_sdpa")  # the packed attentions a dynamic CPU forward can run


def test_cpu_attention_backends_whole_forward(benchmark, timed, summary, device, msvit_s, bench_options):
    """Which packed attention ``auto`` should run on CPU, measured on whole forwards (docs/design.md
    section 13): MSViT-S packed at ~101 tokens (the batch-32 target's masks) with each backend a
    dynamic CPU forward can take, interleaved with ViT-S at 160 px. Records
    ``packed_<backend>_over_vit_same_tokens`` (and its CPU-seconds twin with one thread), no target:
    ``auto`` is meant to pick the smallest."""
    if device != "cpu":
        pytest.skip("the CPU's choice among its packed attentions (on GPUs the varlen kernels run)")
    model, dtype, batch, plain_vit = msvit_s
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    small = torch.randn(batch, 3, 160, 160, device=device, dtype=dtype)
    mask = spread_masks(batch, VIT_SIZES[160]).to(device)
    vit = plain_vit(160)
    runs = {"vit": lambda: vit(small)}
    for name in CPU_BACKENDS:
        twin = msvit.from_timm(bench_options["model"], attention_backend=name).eval().to(device, dtype)
        twin.load_state_dict(model.state_dict())
        runs[name] = lambda twin=twin: twin(images, mask=mask)
    cpu = CpuSeconds(runs)
    with torch.inference_mode():
        times = interleaved_times(cpu.runs, 7 if timed else 1, device)
        benchmark.pedantic(runs[CPU_BACKENDS[0]], rounds=1, iterations=1)
    benchmark.extra_info["ms"] = {k: v * 1e3 for k, v in median_of(times).items()}
    if not timed:
        return
    cpu_times = cpu.after_warmup()
    summary["cpu_backends_batch"] = batch
    for name in CPU_BACKENDS:
        add_ratio(summary, f"packed_{name}_over_vit_same_tokens", times[name], times["vit"])
        if one_cpu_thread(device):
            add_ratio(summary, f"packed_{name}_over_vit_same_tokens_cpu_seconds", cpu_times[name], cpu_times["vit"])
