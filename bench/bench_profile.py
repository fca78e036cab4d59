"""Where one packed MSViT-S forward spends its time: a torch.profiler table, next to a plain ViT-S
with the same tokens, and the tile configs the Triton autotuners chose.

The inference study gives totals; this file says which kernels make them, so a GPU session sees
at once whether a regression sits in attention, the tokenizer kernels, the linear layers or the
host (launch overhead shows as CPU time far above CUDA time). Timed runs write
``profile_packed.txt`` into the run's results folder (bench/results_io.py); without ``--benchmark``
it runs once, tiny, as a smoke test.
"""

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import msvit
from msvit_kernels import attention_kernel, gate_kernel, pack_kernel

from bench_inference import spread_masks

FINE_REGIONS = 17  # ~101 tokens per image: ViT-S at 160px has the same


def chosen_configs() -> list:
    """'kernel: config' for every autotuner that has run in this process."""
    lines = []
    for kernel in (
        gate_kernel._GATE,
        pack_kernel._PACK,
        attention_kernel._fwd,
        attention_kernel._bwd_dkdv,
        attention_kernel._bwd_dq,
    ):
        for tuner in kernel._tuners.values() if kernel is not None else ():
            for key, config in getattr(tuner, "cache", {}).items():
                lines.append(f"{kernel.name} {key}: {config}")
    return lines


def profile_table(fn, device: str, rounds: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def test_profile_packed_forward(benchmark, timed, device, bench_options, bench_dtype, results_folder):
    cuda = device == "cuda"
    dtype = bench_dtype
    batch = (bench_options["batch"] or (256 if cuda else 32)) if timed else 2
    rounds = 5 if timed else 1
    torch.manual_seed(0)
    name = bench_options["model"]
    model = msvit.from_timm(name, attention_backend=bench_options["backend"]).eval().to(device, dtype)
    vit = timm.create_model(name, pretrained=False, img_size=160).eval().to(device, dtype)
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    small = torch.randn(batch, 3, 160, 160, device=device, dtype=dtype)
    mask = spread_masks(batch, FINE_REGIONS).to(device)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: compile and autotune outside the profile
            model(images, mask=mask)
            vit(small)
        packed = profile_table(lambda: model(images, mask=mask), device, rounds)
        plain = profile_table(lambda: vit(small), device, rounds)
        benchmark.pedantic(lambda: model(images, mask=mask), rounds=rounds, iterations=1)
    assert "aten::" in packed and "aten::" in plain
    if not timed:
        return
    tokens = float(model.tokens_per_image(mask).double().mean())
    text = "\n".join(
        [
            f"# packed MSViT-S forward, batch {batch}, {dtype}, {tokens:.1f} tokens/image, {rounds} calls",
            packed,
            "# plain ViT-S at 160px (101 tokens/image), same batch",
            plain,
            "# autotuner choices",
            *chosen_configs(),
        ]
    )
    results_folder.mkdir(parents=True, exist_ok=True)
    (results_folder / "profile_packed.txt").write_text(text + "\n")
    print(text)
