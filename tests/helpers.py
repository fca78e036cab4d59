"""Shared test fixtures: the device, the Triton skip marker, tiny timm ViTs and comparison helpers."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from msvit_kernels import _triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The Triton kernels run on CUDA, or on CPU in the interpreter (tests/conftest.py sets it there).
needs_triton = pytest.mark.skipif(
    bool(_triton.triton_support(torch.empty(1, device=DEVICE))),
    reason="triton is not installed (or TRITON_INTERPRET is unset on CPU)",
)

TINY = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
# The same tiny backbone as `msvit train --model-kwargs` takes it
TINY_MODEL = json.dumps({"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2})


def tiny_vit(img_size=64, **overrides) -> VisionTransformer:
    """A small random-weight timm ViT; ``overrides`` are VisionTransformer kwargs."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, **{**TINY, **overrides}).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the acceptance criteria use."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def half_resolution_twin(model: VisionTransformer, img_size, factor: int = 2, **kwargs) -> VisionTransformer:
    """The same ViT for images of 1/factor the size, its position embedding resampled bilinearly
    (align_corners=False, no antialias): what an all-coarse (all-coarsest) MSViT must equal."""
    h, w = img_size
    twin = VisionTransformer(img_size=(h // factor, w // factor), **kwargs).eval()
    state = model.state_dict()
    pos = state["pos_embed"]
    n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size
    grid = pos[:, n_prefix:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    small = F.interpolate(
        grid, size=(gh // factor, gw // factor), mode="bilinear", align_corners=False, antialias=False
    )
    state["pos_embed"] = torch.cat([pos[:, :n_prefix], small.flatten(2).transpose(1, 2)], 1)
    twin.load_state_dict(state)
    return twin


# A depth-reduced swin_tiny_patch4_window7_224: two blocks (one shifted) in the fine stages.
TINY_SWIN = dict(depths=(2, 2, 2, 1), embed_dim=16, num_heads=(1, 2, 2, 4), num_classes=5)


def tiny_swin(**overrides):
    """A small random-weight timm Swin v1 (swin_tiny_patch4_window7_224 with fewer, narrower blocks)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**TINY_SWIN, **overrides}).eval()


def redraw_parameters(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Re-draw every parameter in place (returns the model): timm's init (LayerScale 1e-5, unit
    norms, zero tokens and biases) makes the logits nearly independent of most modules, so an
    equivalence test on it cannot see a wrong attention or norm. LayerScale gammas and norm weights
    ~U(0.5, 1.5); Linear / Conv weights ~N(0, 1/fan_in); everything else (biases, cls / register /
    position tokens, RoPE frequencies) ~N(0, 0.3^2); relative position bias tables ~N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}"
                if p.ndim == 1 and ("gamma" in full or ("norm" in module_name and name == "weight")):
                    value = torch.rand(p.shape, generator=g) + 0.5
                elif "relative_position" in name:  # Swin's bias tables: N(0, 1) so they shape attention
                    value = torch.randn(p.shape, generator=g)
                elif name == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    value = torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5
                else:
                    value = torch.randn(p.shape, generator=g) * 0.3
                p.copy_(value.to(p.dtype))
    return model


def counted_macs(model, images) -> float:
    """MACs per image of a forward pass, as FlopCounterMode counts them (attention via SDPA's math
    backend, whose matrix products it sees)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return counter.get_total_flops() / 2 / images.shape[0]


def attention_oracle(q, k, v, cu_seqlens, grad_out, scale=None, cu_seqlens_k=None):
    """float64 softmax attention, one sequence at a time, and (dq, dk, dv) for ``grad_out``.

    q, grad_out: ``[T, H, D]``; k, v: ``[T_k, H, D]`` in the layout ``cu_seqlens_k`` (default: q's).
    A query whose key sequence is empty gets zeros (packed_attention's convention, flash-attn's).
    Returns out ``[T, H, D]``, dq, dk, dv: float64.
    """
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds_k = (cu_seqlens if cu_seqlens_k is None else cu_seqlens_k).tolist()
    bounds = cu_seqlens.tolist()
    pieces = [q[:0]]
    for (start, end), (start_k, end_k) in zip(zip(bounds, bounds[1:]), zip(bounds_k, bounds_k[1:])):
        qi, ki, vi = (t.transpose(0, 1) for t in (q[start:end], k[start_k:end_k], v[start_k:end_k]))  # [H, L, D]
        if end_k == start_k:
            pieces.append(q[start:end] * 0)
            continue
        probs = torch.softmax(qi @ ki.transpose(-1, -2) * scale, dim=-1)
        pieces.append((probs @ vi).transpose(0, 1))
    out = torch.cat(pieces)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.double(), allow_unused=True)
    return (out.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip((q, k, v), grads)))


def check_random_masks(model, images: torch.Tensor, seed: int = 0) -> None:
    """What every converted family must do on random masks: packed = masked = trimmed logits,
    finite logits and gradients (weights and, through the straight-through gate, the gate's),
    ``forward_features`` and ``msvit.unpack_to_grid`` of its output."""
    import msvit

    coarse = model.coarse_grid(images)
    batch, n_coarse = images.shape[0], coarse[0] * coarse[1]
    mask = torch.rand(batch, n_coarse, generator=torch.Generator().manual_seed(seed)) < 0.5
    with torch.no_grad():
        logits = model(images, mask=mask)
        for mode in ("masked", "trimmed"):
            assert rel_err(model(images, mask=mask, mode=mode), logits) <= 1e-4, mode
        features = model.forward_features(images, mask=mask)
        grid = msvit.unpack_to_grid(features)
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    assert torch.equal(model.forward_head(features), logits)
    fine = features.fine_grid
    assert grid.grid.shape == (batch, fine[0], fine[1], features.tokens.shape[-1])
    assert grid.prefix.shape == (batch, model.tokenizer.num_prefix, features.tokens.shape[-1])
    model.train()
    try:
        model.zero_grad()
        out = model(images)  # the gate samples its own mask; its straight-through values carry gradients
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
    finally:
        model.eval()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert model.gate.fc1.weight.grad is not None and model.head.weight.grad is not None
    assert all(torch.isfinite(g).all() for g in grads)


def cpu_graph_stand_in(monkeypatch) -> None:
    """Stand in for CUDA graph capture in ``msvit.models.packed_runner`` on CPU: "capture" runs the
    stage (after the runner's warm-up calls) and each replay copies a fresh run's results into the
    outputs of the capture, as a CUDA graph writes into its static outputs."""
    from msvit.models import packed_runner

    def stand_in(self, fn, pool):
        for _ in range(packed_runner.WARMUP_CALLS):
            fn()
        outputs = fn()

        def replay(images):
            fresh = fn()
            for static, new in zip(*(t if isinstance(t, tuple) else (t,) for t in (outputs, fresh))):
                static.copy_(new)
            return outputs

        return replay, outputs

    monkeypatch.setattr(packed_runner.PackedRunner, "_graph", stand_in)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def counted_launches(monkeypatch) -> list:
    """The names of the Triton kernels launched from now on, appended as they launch (a list to clear
    and read): a count of launches that does not depend on a GPU."""
    names = []
    launch = _triton.TritonKernel._launch

    @functools.wraps(launch)
    def counting(self, grid, *args, **meta):
        names.append(self.name)
        return launch(self, grid, *args, **meta)

    monkeypatch.setattr(_triton.TritonKernel, "_launch", counting)
    return names
