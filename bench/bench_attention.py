"""Packed varlen attention: every available backend against padded SDPA with a key mask.

Shapes (``pytest bench/ --benchmark``): H=6, D=64, and
  ``vit``:  batch 256, lengths uniform in 50..260 per image (MSViT-S token counts),
  ``577``:  batch 64 of 577 tokens (ViT at 384px), ``1024``: batch 32 of 1024 tokens.
Without the flag (smoke mode) each case shrinks to batch 2 with short lengths and runs once.

Modes: ``fwd`` (under no_grad, inference) and ``fwd_bwd`` (forward, then dq, dk, dv through q, k, v
viewed from one packed ``[T, 3, H, D]`` leaf, as a fused qkv projection yields them).
FLOPs are the useful ones: forward ``4 * sum(L^2) * H * D``, backward 2.5x that, so the padded
baseline's TFLOP/s is an *effective* rate (it also computes on padding). The padded baseline times
SDPA on already padded ``[B, H, Lmax, D]`` tensors (the dense-masked model's layout), not the
padding itself.

Numbers in ``extra_info`` come from one interleaved measurement of all candidates per (case, mode):
synchronized medians (CUDA events on GPU, perf_counter on CPU), so every ratio compares backends
measured side by side in the same run. ``ratio_to_best_other`` = best other backend's time / this
one's (> 1: this backend is faster). The pytest-benchmark row times the same call with a
synchronize at its end. At the ViT shapes, forward+backward, the Triton backend's ratios to the best
other varlen backend and to padded SDPA go into the run's summary (``bench/results/<device>/``).
"""

import functools
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import msvit_kernels as mk
from msvit_kernels import attention, cu_seqlens_from_lengths

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS, HEAD_DIM = 6, 64
BACKEND_NAMES = ["triton", "flash_attn", "torch_varlen", "reference", "sdpa_padded"]


def _dtype() -> torch.dtype:
    if DEVICE.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(DEVICE) >= (8, 0) else torch.float16  # V100: fp16


def _lengths(case: str, timed: bool):
    if not timed:
        return {"vit": [5, 11], "577": [17, 17], "1024": [33, 33]}[case]
    if case == "vit":
        return torch.randint(50, 261, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    return {"577": [577] * 64, "1024": [1024] * 32}[case]


def _shape(timed: bool):
    return (HEADS, HEAD_DIM) if timed else (2, 16)


def _runnable(timed: bool):
    """Candidate names for this device and dtype. Timed runs skip backends auto would not use
    here (the Triton interpreter on CPU); smoke runs exercise everything that can run."""
    dtype = _dtype()
    names = []
    for name in BACKEND_NAMES[:-1]:
        backend = attention.BACKENDS.get(name)
        if backend is None:
            continue
        check = (backend.auto_support or backend.support) if timed else backend.support
        if check(DEVICE, dtype, _shape(timed)[1]) is None:
            names.append(name)
    return names + ["sdpa_padded"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_call(name: str, mode: str, lengths, heads: int, dim: int):
    """A zero-argument callable running one forward (or forward+backward) of backend ``name``."""
    dtype = _dtype()
    gen = torch.Generator().manual_seed(1)
    total, max_len = sum(lengths), max(lengths)
    grad_needed = mode == "fwd_bwd"
    if name == "sdpa_padded":
        batch = len(lengths)
        q, k, v = (
            torch.randn(batch, heads, max_len, dim, generator=gen).to(DEVICE, dtype).requires_grad_(grad_needed)
            for _ in range(3)
        )
        valid = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
        mask = valid[:, None, None, :].to(DEVICE)  # [B, 1, 1, Lmax]: keys past an image's end are off
        leaves = (q, k, v)
        forward = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    else:
        qkv = torch.randn(total, 3, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_(grad_needed)
        q, k, v = qkv.unbind(1)
        cu = cu_seqlens_from_lengths(torch.tensor(lengths, device=DEVICE))
        leaves = (qkv,)
        forward = lambda: mk.packed_attention(q, k, v, cu, max_len, backend=name, check_values=False)  # noqa: E731

    if not grad_needed:

        def call():
            with torch.no_grad():
                return forward()

        return call
    grad_out = torch.randn(forward().shape, generator=gen).to(DEVICE, dtype)

    def call():
        return torch.autograd.grad(forward(), leaves, grad_out)

    return call


def _rounds(timed: bool):
    """(warm-up, timed) calls: GPU calls take ms; full-size CPU calls take seconds (2-core runners)."""
    if not timed:
        return 0, 1
    return (5, 30) if DEVICE.type == "cuda" else (1, 3)


def median_ms(fn, timed: bool) -> float:
    """Median wall time of ``fn`` in ms, synchronized; warm-up calls absorb compilation/autotuning."""
    warmup, reps = _rounds(timed)
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def all_medians(case: str, mode: str, timed: bool):
    """{backend: median ms} for every runnable candidate, measured one after another in this run."""
    heads, dim = _shape(timed)
    lengths = _lengths(case, timed)
    return {name: median_ms(make_call(name, mode, lengths, heads, dim), timed) for name in _runnable(timed)}


def useful_flops(lengths, heads: int, dim: int, mode: str) -> float:
    forward = 4.0 * sum(n * n for n in lengths) * heads * dim
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", ["vit", "577", "1024"])
def test_packed_attention_speed(benchmark, timed, summary, case, mode, backend):
    if backend not in _runnable(timed):
        reason = (
            attention.BACKENDS[backend].support(DEVICE, _dtype(), _shape(timed)[1])
            if backend in attention.BACKENDS
            else None
        )
        pytest.skip(reason or f"{backend} is not timed on {DEVICE.type} (the Triton interpreter is for tests)")
    heads, dim = _shape(timed)
    lengths = _lengths(case, timed)
    call = make_call(backend, mode, lengths, heads, dim)

    def synced():
        call()
        _sync()

    warmup, reps = _rounds(timed)
    benchmark.pedantic(synced, rounds=reps, warmup_rounds=warmup)

    medians = all_medians(case, mode, timed)
    own = medians[backend]
    others = {name: ms for name, ms in medians.items() if name != backend}
    best_other = min(others, key=others.get) if others else None
    flops = useful_flops(lengths, heads, dim, mode)
    benchmark.extra_info.update(
        timed=timed,
        case=case,
        mode=mode,
        backend=backend,
        device=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        dtype=str(_dtype()).replace("torch.", ""),
        batch=len(lengths),
        heads=heads,
        head_dim=dim,
        total_tokens=sum(lengths),
        max_seqlen=max(lengths),
        flops=flops,
        median_ms=own,
        tflops=flops / (own * 1e-3) / 1e12,
        best_other=best_other,
        best_other_median_ms=others.get(best_other),
        ratio_to_best_other=(others[best_other] / own) if best_other else None,
        all_median_ms=medians,
        torch_version=torch.__version__,
    )
    assert own > 0
    if timed and backend == "triton" and case == "vit" and mode == "fwd_bwd":  # the docs/design.md target's shape
        varlen = [medians[n] for n in ("flash_attn", "torch_varlen") if n in medians]
        if varlen:
            summary["ratios"]["triton_attn_over_best_varlen"] = own / min(varlen)
        summary["ratios"]["triton_attn_over_padded_sdpa"] = own / medians["sdpa_padded"]
