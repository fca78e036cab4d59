"""``msvit.export``: an MSViT's static packed forward as a deployable AOTInductor package (.pt2).

The forward is exported with ``torch.export`` and compiled ahead of time by AOTInductor
(``torch._inductor.aoti_compile_and_package``). The package runs without Python's msvit: load it
with ``torch._inductor.aoti_load_package(path)`` and call it on a ``[batch_size, C, H, W]`` tensor of
the exported size, dtype and device; it returns the logits ``model(images, budget=budget)`` gives.

Shapes must be static (docs/design.md section 9): a ``budget`` keeps the same number of regions
fine in every image, so every length is known; without one the gate decides and the packed rows are
padded to ``capacity`` (default: room for every region fine, so any decision fits; a smaller
capacity is faster and a batch with more tokens fails on the device).

What the package holds (docs/design.md section 14): by default (``kernels="reference"``) the torch
path of the model, the reference tokenizer and gate and the ``padded_sdpa`` attention, which Inductor
compiles into its own kernels (C++ on CPU, Triton on CUDA). On CUDA, ``kernels="triton"`` puts the
package's fused Triton kernels in instead (the learned gate, the index builders, the pack and the
attention, the entropy gate): they are ``torch.library.triton_op``s, which AOTInductor traces into
and compiles like its own kernels.
"""

import copy
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from msvit.models.gate import Budget
from msvit.models.mixed_scale_vit import MSViT

PORTABLE_KERNELS = "reference"  # the tokenizer and gate in torch ops: traceable, and no Python op in the graph
PORTABLE_ATTENTION = "padded_sdpa"  # one SDPA call over a padded layout: host-free, an aten op
EXPORT_KERNELS = (PORTABLE_KERNELS, "triton")


class StaticForward(nn.Module):
    """``model(images, budget=budget)`` (or ``capacity=capacity`` rows) as a module of one tensor
    argument, the form ``torch.export`` takes."""

    def __init__(self, model: MSViT, budget: Budget, capacity: Optional[int]):
        super().__init__()
        self.model, self.budget, self.capacity = model, budget, capacity

    def forward(self, images: Tensor) -> Tensor:
        if self.budget is not None:
            return self.model(images, budget=self.budget)
        return self.model(images, capacity=self.capacity)


def image_hw(image_size: Union[int, Sequence[int]]) -> tuple:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int H or (H, W), got {image_size!r}")
    return size


def portable_copy(model: MSViT, device: Optional[Union[str, torch.device]], kernels: str = PORTABLE_KERNELS) -> MSViT:
    """The model to export: a copy (the caller's model keeps its device and kernels) on ``device``,
    with the torch tokenizer, gate and attention, or with ``kernels="triton"`` the fused kernels and
    the Triton attention, which are ``triton_op``s."""
    if kernels not in EXPORT_KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, EXPORT_KERNELS))}, got {kernels!r}")
    exported = copy.deepcopy(model)
    if device is not None:
        exported = exported.to(device)
    on = next(exported.parameters()).device
    if kernels == "triton" and on.type != "cuda":
        raise ValueError(f"kernels='triton' exports the fused CUDA kernels: pass device='cuda' (the model is on {on})")
    exported.kernels = kernels  # the gate's too, entropy gates included (MSViT.kernels)
    exported.attention_backend = "triton" if kernels == "triton" else PORTABLE_ATTENTION
    return exported.eval()


def static_capacity(model: MSViT, batch_size: int, size: tuple, budget: Budget, capacity: Optional[int]):
    """``capacity``, or without a budget and a capacity the rows of an all-fine batch (any decision fits)."""
    if budget is not None or capacity is not None:
        return capacity
    from msvit.models.packed_runner import default_buckets

    return default_buckets(model, batch_size, size)[-1]


def export_program(
    model: MSViT,
    batch_size: int,
    image_size: Union[int, Sequence[int]],
    *,
    budget: Budget = None,
    capacity: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    kernels: str = PORTABLE_KERNELS,
) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of the static forward ``export`` packages (arguments as there).
    On a machine without CUDA, fake CUDA tensors export the CUDA program too (``device="cuda"``
    inside a ``FakeTensorMode``); nothing runs."""
    if not isinstance(model, MSViT):
        raise TypeError(f"msvit.export takes an msvit.MSViT, got {type(model).__name__}")
    if model.training:
        raise ValueError("msvit.export exports inference: call model.eval() first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if budget is not None and capacity is not None:
        raise ValueError("pass budget (fixed tokens per image) or capacity (padded rows), not both")
    size = image_hw(image_size)
    exported = portable_copy(model, device, kernels)
    capacity = static_capacity(exported, batch_size, size, budget, capacity)
    parameter = next(exported.parameters())
    example = torch.zeros(batch_size, exported.in_chans, *size, device=parameter.device, dtype=parameter.dtype)
    exported.static_shape(batch_size, size, budget=budget, capacity=capacity)  # refuses a bad budget by name
    return torch.export.export(StaticForward(exported, budget, capacity), (example,), strict=False)


def export(
    model: MSViT,
    path: Union[str, Path],
    batch_size: int,
    image_size: Union[int, Sequence[int]],
    *,
    budget: Budget = None,
    capacity: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    kernels: str = PORTABLE_KERNELS,
) -> Path:
    """Write ``model``'s static packed forward to ``path`` (a ``.pt2`` AOTInductor package).

    Args:
        model: an ``MSViT`` in eval mode (it is copied; the copy takes the torch path of every op).
        path: the package file, ending in ``.pt2``.
        batch_size, image_size: the one input shape the package takes (``H`` or ``(H, W)``); pad a
            smaller batch with images and drop their rows.
        budget: fine regions per image (int) or fraction (float): fixed tokens, the cheapest forward.
        capacity: without a budget, the packed rows (default: every region fine).
        device: where the package runs (default: the model's device); the dtype is the model's.
        kernels: ``"reference"`` (the torch path of every op, any device) or, on CUDA, ``"triton"``
            (the package's fused gate, index, pack and attention kernels; docs/deploy.md).

    Returns the path. The package records its input in its metadata (``loader.get_metadata()``):
    ``msvit_input`` is JSON with the batch size, image size, budget, capacity (packed rows; None
    with a budget) and, when the model has a ``pretrained_cfg``, the mean and std to normalise with.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package is a .pt2 file, got {str(path)!r}")
    program = export_program(
        model, batch_size, image_size, budget=budget, capacity=capacity, device=device, kernels=kernels
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    from torch._inductor import aoti_compile_and_package

    size = image_hw(image_size)
    capacity = static_capacity(model, batch_size, size, budget, capacity)
    metadata = {"msvit_input": json.dumps(input_record(model, batch_size, size, budget, capacity))}
    return Path(
        aoti_compile_and_package(program, package_path=str(path), inductor_configs={"aot_inductor.metadata": metadata})
    )


def input_record(model: MSViT, batch_size: int, size: tuple, budget: Budget, capacity: Optional[int]) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    record = {"batch_size": batch_size, "image_size": list(size), "budget": budget, "capacity": capacity}
    record.update({key: list(cfg[key]) for key in ("mean", "std") if cfg.get(key)})
    return record
