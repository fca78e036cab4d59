"""MSViT against its peers on equal work: timm NaFlexViT fed the same per-image token counts as
MSViT's packed batches (padding + attention masks, its own variable-token path), a plain timm ViT at
the same mean tokens (160px = 101 tokens), and MSViT packed / trimmed / masked.

All models have ViT-S's width / depth / heads (384 / 12 / 6), random weights, float32 on CPU
(bf16 on GPU). Image i of MSViT keeps T_i tokens (class token included); NaFlexViT gets T_i - 1
valid patches plus its class token, padded to the batch's longest image. Its patches are cut from
the image before timing, as its data loader does; MSViT's tokenizer runs inside the timed forward.
Inference at batch 1 and 32, a training step (forward + backward + AdamW) at batch 32; every
variant timed in interleaved repetitions (bench/spread.py), ratios with their spread in the summary.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import msvit

from bench_inference import VIT_SIZES, spread_masks
from naflex import naflex_batch, naflex_like
from spread import add_ratio, interleaved_times, medians

FINE = VIT_SIZES[160]  # 17 fine regions of 49: 101 tokens per image on average, as ViT-S at 160px


@pytest.fixture(scope="module")
def peers(device, timed, bench_options, bench_dtype):
    """(MSViT, NaFlexViT, ViT-S at 160px, dtype) with random weights; ViT-S is the converted model."""
    dtype = bench_dtype
    torch.manual_seed(0)
    model = msvit.from_timm(bench_options["model"], attention_backend=bench_options["backend"]).to(device)
    naflex = naflex_like(model).to(device)
    vit = timm.create_model(bench_options["model"], pretrained=False, img_size=160).to(device)
    return model, naflex, vit, dtype


def inputs(batch: int, device: str, dtype, model: msvit.MSViT) -> dict:
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    mask = spread_masks(batch, FINE).to(device)
    tokens = model.tokens_per_image(mask)
    return {
        "images": images,
        "mask": mask,
        "tokens": tokens,
        "naflex": naflex_batch(images, tokens),
        "small": torch.randn(batch, 3, 160, 160, device=device, dtype=dtype),
    }


@pytest.mark.parametrize("batch", [1, 32])
def test_peer_inference(benchmark, timed, summary, device, peers, batch):
    model, naflex, vit, dtype = peers
    batch = batch if timed else min(batch, 2)
    repeats = (21 if batch == 1 else 7) if timed else 1
    for m in (model, naflex, vit):
        m.eval().to(dtype)
    x = inputs(batch, device, dtype, model)
    runs = {
        "packed": lambda: model(x["images"], mask=x["mask"]),
        "trimmed": lambda: model(x["images"], mask=x["mask"], mode="trimmed"),
        "masked": lambda: model(x["images"], mask=x["mask"], mode="masked"),
        "naflex": lambda: naflex(x["naflex"]),
        "vit": lambda: vit(x["small"]),
    }
    with torch.inference_mode():
        times = interleaved_times(runs, repeats, device)
        benchmark.pedantic(runs["naflex"], rounds=repeats if timed else 1, iterations=1)
    report(benchmark, summary, timed, f"b{batch}", times, x["tokens"], x["naflex"]["patch_valid"].shape[1] + 1)
    if timed:
        add_ratio(summary, f"naflex_over_packed_b{batch}", times["naflex"], times["packed"])
        add_ratio(summary, f"packed_over_vit_same_tokens_b{batch}", times["packed"], times["vit"])
        add_ratio(summary, f"masked_over_packed_b{batch}", times["masked"], times["packed"])
        add_ratio(summary, f"trimmed_over_packed_b{batch}", times["trimmed"], times["packed"])


def test_peer_training_step(benchmark, timed, summary, device, peers):
    """forward + backward + AdamW step at batch 32, same masks / token counts as at inference."""
    model, naflex, vit, _ = peers
    batch, repeats = (32, 5) if timed else (2, 1)
    cuda = device == "cuda"
    for m in (model, naflex, vit):
        m.train().float()
    x = inputs(batch, device, torch.float32, model)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (model, naflex, vit)}

    def step(net, forward):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(forward().float(), labels)
        optimizers[net].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[net].step()

    runs = {
        "packed": lambda: step(model, lambda: model(x["images"], mask=x["mask"])),
        "trimmed": lambda: step(model, lambda: model(x["images"], mask=x["mask"], mode="trimmed")),
        "naflex": lambda: step(naflex, lambda: naflex(x["naflex"])),
        "vit": lambda: step(vit, lambda: vit(x["small"])),
    }
    times = interleaved_times(runs, repeats, device)
    benchmark.pedantic(runs["naflex"], rounds=repeats, iterations=1)
    report(benchmark, summary, timed, "train", times, x["tokens"], x["naflex"]["patch_valid"].shape[1] + 1)
    if timed:
        add_ratio(summary, "train_naflex_over_packed", times["naflex"], times["packed"])
        add_ratio(summary, "train_packed_over_vit_same_tokens", times["packed"], times["vit"])
        add_ratio(summary, "train_trimmed_over_packed_peers", times["trimmed"], times["packed"])


def report(benchmark, summary, timed, name, times, tokens, padded) -> None:
    """Medians per variant (ms) and the token counts into the benchmark record and the summary."""
    info = {
        "ms": {k: v * 1e3 for k, v in medians(times).items()},
        "mean_tokens": float(tokens.double().mean()),
        "naflex_padded_tokens": padded,
    }
    benchmark.extra_info.update(info)
    if timed:
        summary.setdefault("peers", {})[name] = {**info, "batch": len(tokens)}
