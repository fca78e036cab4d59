"""Evaluation: top-1, tokens and GMACs per image, fine rate, and (with digit boxes) where the fine
tokens go."""

from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from msvit.data.digits import region_overlap
from msvit.data.sample_images import normalize
from msvit.models.flops import macs_for_tokens
from msvit.models.mixed_scale_vit import MSViT


@torch.no_grad()
def evaluate(
    model: MSViT,
    loader,
    mean,
    std,
    device,
    *,
    mode: str = "packed",
    budget=None,
    boxes: Optional[Tensor] = None,
    show: bool = False,
    decide: Optional[Callable[[Tensor], Tensor]] = None,
) -> dict:
    """Metrics of ``model`` (eval mode) on ``loader`` (images in [0, 1], not shuffled).

    boxes: optional int ``[N, 4]`` pixel boxes aligned with the loader; adds ``fine_on_digit`` (the
    share of fine regions that overlap their image's box), ``digit_share`` (the share of all regions
    that do) and their ratio ``fine_digit_ratio`` (1 = no preference, higher = fine on the digit).
    decide: optional ``normalised images -> bool [B, Nc]`` (True = fine) used instead of the model's
    gate (another gate's decisions on the same backbone, ``bench/gate_comparison.py``).
    """
    was_training = model.training
    model.eval()
    correct = seen = fine_regions = fine_on_digit = digit_regions = 0
    tokens, masks = [], []
    n_regions = None
    totals = dict.fromkeys(LIST_TOTALS, 0.0)
    for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not show, leave=False):
        if isinstance(images, list):  # native resolution: images of their own sizes
            native = evaluate_list(model, images, labels, mean, std, device, mode, budget, boxes, seen)
            for key, value in native.items():
                totals[key] += value
            seen += len(labels)
            continue
        images = normalize(images.to(device), mean, std)
        mask = decide(images) if decide is not None else None
        out = model(images, mode=mode, budget=budget, mask=mask, return_gate=True)
        correct += (out.logits.argmax(1).cpu() == labels).sum().item()
        hard = out.gate.hard.cpu()
        tokens.append(model.tokens_per_image(hard, images=images))
        masks.append(hard)
        fine, cell = fine_cells(model, hard, images)
        n_regions = fine.shape[1]
        fine_regions += fine.sum().item()
        if boxes is not None:
            size = tuple(images.shape[-2:])
            overlap = torch.stack([region_overlap(b.tolist(), size, cell) for b in boxes[seen : seen + len(labels)]])
            fine_on_digit += (fine & overlap).sum().item()
            digit_regions += overlap.sum().item()
        seen += len(labels)
    model.train(was_training)
    if totals["images"]:
        return list_metrics(totals, boxes is not None)
    tokens = torch.cat(tokens)
    metrics = {
        "top1": correct / max(seen, 1),
        "tokens_per_image": tokens.double().mean().item(),
        "gmacs_per_image": macs_of(model, tokens, masks, masks[0].shape[1] if masks else 0).mean().item() / 1e9,
        "fine_rate": fine_regions / max(seen * n_regions, 1),
        "images": seen,
    }
    if boxes is not None:
        metrics["fine_on_digit"] = fine_on_digit / max(fine_regions, 1)
        metrics["digit_share"] = digit_regions / max(seen * n_regions, 1)
        metrics["fine_digit_ratio"] = metrics["fine_on_digit"] / max(metrics["digit_share"], 1e-9)
    return metrics


def fine_cells(model, hard: Tensor, images: Tensor):
    """(bool ``[B, N]`` where the fine tokens are, the cell size in pixels): the fine regions of two
    scales, or, with more, the finest cells covered by finest tokens (docs/design.md section 10)."""
    tokenizer = model.tokenizer
    if getattr(tokenizer, "scales", 2) <= 2:  # a mixed-scale Swin has two
        return hard, tokenizer.coarse_patch
    tree = tokenizer.tree(tokenizer.grids(images)[0])
    return tree.token_weights(hard)[0], tokenizer.fine_patch


def macs_of(model, tokens: Tensor, masks: list, n_regions: int) -> Tensor:
    """MACs per image: from the token counts (MSViT), or from the masks for a model whose cost
    depends on where the fine regions are (a mixed-scale Swin fills windows; msvit.models.swin.flops)."""
    if hasattr(model, "mac_parts"):
        return model.mac_parts(torch.cat(masks))["total"]
    return macs_for_tokens(model, tokens, n_regions)["total"]


LIST_TOTALS = ("images", "correct", "tokens", "macs", "regions", "fine", "fine_on_digit", "digit_regions")


def evaluate_list(model, images, labels, mean, std, device, mode, budget, boxes, seen) -> dict:
    """One native-resolution batch (a list of ``[C, H_b, W_b]``, two scales): its sums of
    ``LIST_TOTALS``. MACs and regions are counted per image, since each has its own grid."""
    images = [normalize(image.to(device)[None], mean, std)[0] for image in images]
    out = model(images, mode=mode, budget=budget, return_gate=True)
    decisions = model.batch_of(images).decisions
    sums = dict.fromkeys(LIST_TOTALS, 0.0)
    sums["images"] = len(images)
    sums["correct"] = (out.logits.argmax(1).cpu() == labels).sum().item()
    tokens = out.tokens.cpu()
    sums["tokens"] = tokens.sum().item()
    for b, hard in enumerate(out.gate.hard.cpu().split(list(decisions))):
        sums["macs"] += macs_for_tokens(model, tokens[b : b + 1], int(decisions[b]))["total"].item()
        sums["regions"] += hard.numel()
        sums["fine"] += hard.sum().item()
        if boxes is not None:
            overlap = region_overlap(
                boxes[seen + b].tolist(), tuple(images[b].shape[-2:]), model.tokenizer.coarse_patch
            )
            sums["fine_on_digit"] += (hard & overlap).sum().item()
            sums["digit_regions"] += overlap.sum().item()
    return sums


def list_metrics(totals: dict, with_boxes: bool) -> dict:
    """``evaluate``'s metrics from the sums of native-resolution batches (``evaluate_list``)."""
    n = totals["images"]
    metrics = {
        "top1": totals["correct"] / n,
        "tokens_per_image": totals["tokens"] / n,
        "gmacs_per_image": totals["macs"] / n / 1e9,
        "fine_rate": totals["fine"] / max(totals["regions"], 1),
        "images": int(n),
    }
    if with_boxes:
        metrics["fine_on_digit"] = totals["fine_on_digit"] / max(totals["fine"], 1)
        metrics["digit_share"] = totals["digit_regions"] / max(totals["regions"], 1)
        metrics["fine_digit_ratio"] = metrics["fine_on_digit"] / max(metrics["digit_share"], 1e-9)
    return metrics
