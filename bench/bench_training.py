"""A training step (forward + backward + optimizer) of MSViT-S/16,32 in packed, trimmed and
dense-masked modes, with the same gate: initialised at P(fine) = 0.5 and sampled (Gumbel-Sigmoid,
straight-through) as in training, so every mode sees masks from one distribution.

Target (docs/design.md section 7): packed >= 1.3x faster than trimmed. CPU: float32, batch 16;
GPU: bf16 autocast, batch 256. Peak GPU memory per mode is recorded too.
"""

import statistics

import torch
import torch.nn.functional as F

import msvit
from msvit.losses import l0_loss
from msvit.timing import measure

from spread import add_ratio

MODES = ("packed", "trimmed", "masked")


def test_training_step_packed_vs_trimmed_vs_masked(benchmark, timed, summary, device, bench_options):
    cuda = device == "cuda"
    batch = (bench_options["batch"] or (256 if cuda else 16)) if timed else 2
    repeats = 5 if timed else 1
    torch.manual_seed(0)
    model = msvit.from_timm(bench_options["model"], init_logit=0.0, attention_backend=bench_options["backend"])
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step(mode):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            out = model(images, mode=mode, return_gate=True)
            loss = F.cross_entropy(out.logits.float(), labels) + l0_loss(out.gate.soft.float(), 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times, peak = {m: [] for m in MODES}, {}
    for mode in MODES:
        step(mode)  # warm-up
    for _ in range(repeats):
        for mode in MODES:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[mode] += measure(lambda: step(mode), repeats=1, warmup=0, device=device)
            if cuda:
                peak[mode] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.pedantic(lambda: step("packed"), rounds=repeats, iterations=1)
    median = {m: statistics.median(t) for m, t in times.items()}
    benchmark.extra_info.update({f"{m}_ms": v * 1e3 for m, v in median.items()})
    if timed:
        summary.setdefault("train_step_ms", {}).update({m: v * 1e3 for m, v in median.items()})
        summary["train_batch"] = batch
        if peak:
            summary["train_peak_gib"] = peak
        add_ratio(summary, "train_trimmed_over_packed", times["trimmed"], times["packed"])
        add_ratio(summary, "train_masked_over_packed", times["masked"], times["packed"])
