"""The fused tokenizer (gate kernel + index kernels + gather-embed-pack kernel, ``kernels="triton"``)
against the torch tokenizer (``kernels="reference"``) and timm's conv patch embedding alone (what a
plain ViT pays to tokenize: the conv of ``patch_embed``, no gate, no packing), and the tokenizer's
share of a full MSViT-S forward.

"Tokenizer" = eval-mode gate decisions (logits, threshold) + packed index + packed embedded tokens:
``MSViT.gate.decide`` then ``MSViT.tokenizer.pack``. The gate's last bias is set per image size
so that half the regions are fine (the ~50% point where docs/design.md states the GPU targets).

GPU (``--benchmark``): bf16 (fp16 before sm_80), batch 1, 64 and 256 at 224px and 384px; the share
at batch 256, 224px. Ratios: ``tokenizer_share`` (fused tokenizer / MSViT-S forward, target <= 5%),
``fused_tokenizer_over_torch`` (the worst point over all sizes: < 1 means faster everywhere) and
``tokenizer_share_torch``. CPU (``--benchmark``): fp32, the torch tokenizer and the conv only (the
Triton interpreter is not a timing target), batch 1 and 16; ``tokenizer_share_torch`` at batch 16.
Smoke mode (no flag): batch 1 at 64px, once, the fused path too where it can run.

Each point reports medians of interleaved runs, TFLOP/s (2 x the gate MACs + the embedding MACs of
the surviving tokens) and GB/s (image bytes read once + packed tokens written).
"""

import pytest
import timm
import torch

import msvit
from msvit_kernels import dispatch

from spread import add_ratio, interleaved_times, medians

SIZES = (224, 384)


@pytest.fixture(scope="module")
def tokenizer_setup(device, timed, bench_options, bench_dtype):
    """(MSViT-S, timm ViT-S, dtype, image sizes, batches, share batch) for this device and mode."""
    dtype = bench_dtype
    torch.manual_seed(0)
    model = msvit.from_timm(bench_options["model"], init_logit=0.0, attention_backend=bench_options["backend"])
    vit = timm.create_model(bench_options["model"], pretrained=False)
    model, vit = model.eval().to(device, dtype), vit.eval().to(device, dtype)
    cuda = device == "cuda"
    sizes = SIZES if timed else (64,)
    batches = ((1, 64, 256) if cuda else (1, 16)) if timed else (1,)
    share_batch = (bench_options["batch"] or (256 if cuda else 16)) if timed else 1
    return model, vit, dtype, sizes, batches, share_batch


def half_fine(model, images) -> float:
    """Shift the gate's last bias so that the median region logit of ``images`` is 0 (half fine)."""
    with torch.no_grad():
        model.gate.fc4.bias -= model.gate(images).float().median().to(model.gate.fc4.bias.dtype)
        return model.gate_mask(images).float().mean().item()


def tokenize_batch(model, images):
    decision = model.gate.decide(images, sample=False)
    return model.tokenizer.pack(images, decision.hard, decision.st)


def kernel_choices(images) -> list:
    """the reference always; triton where it runs (CUDA; timed CPU runs never use the interpreter)."""
    return ["reference"] + (["triton"] if not dispatch.triton_support(images) else [])


def rates(model, images, index, seconds: float) -> dict:
    """TFLOP/s and GB/s of one tokenizer call that produced ``index``."""
    n_regions = images.shape[0] * model.coarse_grid(images)[0] * model.coarse_grid(images)[1]
    embed = model.tokenizer.embed
    n_patch = index.total - images.shape[0] * model.tokenizer.num_prefix
    macs = n_regions * model.gate.macs_per_region() + n_patch * embed.in_features * embed.out_features
    moved = images.numel() * images.element_size() + index.total * embed.out_features * images.element_size()
    return {"tflops": 2 * macs / seconds / 1e12, "gbps": moved / seconds / 1e9}


def test_tokenizer_fused_vs_torch_vs_conv(benchmark, timed, summary, device, tokenizer_setup):
    model, vit, dtype, sizes, batches, _ = tokenizer_setup
    repeats = 10 if timed else 1
    points, fused_over_torch = [], []
    with torch.inference_mode():
        for size in sizes:
            for batch in batches:
                images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
                fine = half_fine(model, images)
                choices = kernel_choices(images)
                runs = {"conv": lambda: vit.patch_embed.proj(images).flatten(2).transpose(1, 2)}
                for kernels in choices:
                    runs[kernels] = lambda k=kernels: (setattr(model, "kernels", k), tokenize_batch(model, images))
                timed_ms = medians(interleaved_times(runs, repeats, device))
                model.kernels = "reference"
                index = tokenize_batch(model, images)[1]
                for name, seconds in timed_ms.items():
                    point = {"variant": name, "size": size, "batch": batch, "fine": fine, "ms": seconds * 1e3}
                    if name != "conv":
                        point.update(rates(model, images, index, seconds))
                    points.append(point)
                if "triton" in timed_ms:
                    fused_over_torch.append(timed_ms["triton"] / timed_ms["reference"])
        model.kernels = choices[-1]
        benchmark.pedantic(lambda: tokenize_batch(model, images), rounds=repeats, iterations=1)
    model.kernels = "auto"
    benchmark.extra_info["points"] = points
    if timed:
        summary["tokenizer_points"] = points
        if fused_over_torch:
            summary["ratios"]["fused_tokenizer_over_torch"] = max(fused_over_torch)


def test_tokenizer_share_of_msvit_forward(benchmark, timed, summary, device, tokenizer_setup):
    """Tokenizer time / MSViT-S forward time (same kernels, ~50% fine regions, 224px)."""
    model, _, dtype, sizes, _, batch = tokenizer_setup
    images = torch.randn(batch, 3, sizes[0], sizes[0], device=device, dtype=dtype)
    repeats = 5 if timed else 1
    shares = {}
    with torch.inference_mode():
        half_fine(model, images)
        for kernels in kernel_choices(images):
            model.kernels = kernels
            shares[kernels] = interleaved_times(
                {"tokenizer": lambda: tokenize_batch(model, images), "forward": lambda: model(images)}, repeats, device
            )
            benchmark.extra_info[f"{kernels}_ms"] = {k: v * 1e3 for k, v in medians(shares[kernels]).items()}
        benchmark.pedantic(lambda: model(images), rounds=repeats, iterations=1)
    model.kernels = "auto"
    benchmark.extra_info["shares"] = {k: medians(t)["tokenizer"] / medians(t)["forward"] for k, t in shares.items()}
    if timed:
        summary["tokenizer_batch"] = batch
        add_ratio(summary, "tokenizer_share_torch", shares["reference"]["tokenizer"], shares["reference"]["forward"])
        if "triton" in shares and device == "cuda":
            add_ratio(summary, "tokenizer_share", shares["triton"]["tokenizer"], shares["triton"]["forward"])
