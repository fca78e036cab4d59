"""EViT-style token pruning on top of the gate (Section 4.2.2): MSViT-S/16,32 packed forward with and
without pruning (keep 70% of each image's patch tokens after blocks 3, 6 and 9, pruned tokens fused),
at one fixed mask of ~50% fine regions (spread per image, as a gate's masks are).

CPU: float32, batch 32. GPU: bfloat16, batch 256. Both variants are timed interleaved, medians
reported; ``pruned_over_unpruned`` (time pruned / time unpruned, < 1 = time saved) goes into the
summary next to the ratio of the transformer trunk's MACs, the bound the saving should approach.
"""

import torch

import msvit
from msvit.models.pruning import PruneConfig, PrunedMSViT

from bench_inference import HALF_FINE, spread_masks
from spread import add_ratio, interleaved_times, medians

CONFIG = PruneConfig(keep_ratio=0.7, layers=(3, 6, 9), fuse=True)


def trunk_macs(model: msvit.MSViT, tokens: torch.Tensor, layers) -> float:
    """Mean MACs per image of the blocks (linear layers and the two attention products), given the
    tokens ``[len(layers) + 1, B]`` entering the first block and after each pruning."""
    total, stage = 0.0, 0
    for i, block in enumerate(model.blocks):
        n = tokens[stage].double()
        linear = sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear))
        total += (n * linear + 2 * n.square() * (block.attn.qkv.out_features // 3)).mean().item()
        stage += i in layers
    return total


def test_pruned_vs_unpruned_forward(benchmark, timed, summary, device, bench_options, bench_dtype):
    cuda = device == "cuda"
    dtype = bench_dtype
    batch = (bench_options["batch"] or (256 if cuda else 32)) if timed else 2
    repeats = 7 if timed else 1
    torch.manual_seed(0)
    model = msvit.from_timm(bench_options["model"], attention_backend=bench_options["backend"]).eval().to(device, dtype)
    pruned = PrunedMSViT(model, config=CONFIG)
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    mask = spread_masks(batch, HALF_FINE).to(device)
    with torch.inference_mode():
        tokens = pruned(images, mask=mask, return_gate=True).tokens.cpu()
        runs = {"unpruned": lambda: model(images, mask=mask), "pruned": lambda: pruned(images, mask=mask)}
        times = interleaved_times(runs, repeats, device)
        benchmark.pedantic(runs["pruned"], rounds=repeats, iterations=1)
    macs = {"unpruned": trunk_macs(model, tokens[:1], ()), "pruned": trunk_macs(model, tokens, CONFIG.layers)}
    info = {
        "tokens_per_stage": tokens.double().mean(1).tolist(),
        "keep_ratio": CONFIG.keep_ratio,
        "layers": list(CONFIG.layers),
        "fuse": CONFIG.fuse,
        "batch": batch,
        "ms": {k: v * 1e3 for k, v in medians(times).items()},
        "trunk_gmacs": {k: v / 1e9 for k, v in macs.items()},
    }
    benchmark.extra_info.update(info)
    if timed:
        summary["pruning"] = info
        add_ratio(summary, "pruned_over_unpruned", times["pruned"], times["unpruned"])
        summary["ratios"]["pruned_over_unpruned_trunk_macs"] = macs["pruned"] / macs["unpruned"]
