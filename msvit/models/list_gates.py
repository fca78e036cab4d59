"""The gate's decisions for a list of images of different sizes in one pass (docs/design.md
section 11): every gate (learned or entropy, two scales or more) computes its logits over the
list's global node table (``tree_batch.TreeBatch``), scale by scale and never image by image, and
returns flat ``[sum D_b]`` decisions (image after image, each image's ``D_b`` entries coarsest scale
first), equal entry by entry to the gate's decisions for each image alone.

- Pixels: one flat buffer (each ``[C, H_b, W_b]`` image flattened in turn) read through
  ``TreeBatch.node_pixels``, as the pack kernel reads it.
- Learned levels (``MixedScaleGate``): per scale, with Triton (the gate's ``kernels`` resolve to it
  on the pixels) the fused gate kernel's LIST mode (``gate_kernel.list_fused_gate``: one launch per
  layer for every image, region pixels read through ``node_pixels``, the Gumbel-Sigmoid in its last
  launch); in torch one gather of the nodes' pixels (``reference.flat_cells``: rows of fine-patch
  width) and one MLP call (``list_logits``). Both add each image's position table at its own grid
  and draw one Gumbel-Sigmoid noise per scale in training.
- Entropy levels (``EntropyGate``): ``entropy_gate.list_entropies``, one Triton launch for every
  scale (or the torch reference binning the pixels once).
- Global node order -> flat decisions: one gather (``TreeBatch.decision_nodes``).
- Budgets: two scales, ``gate.list_budget_mask``; more, ``tree_gate.list_tree_budget_mask``; each
  image its own share (a fraction), an int larger than an image's ``D_b`` refused naming it.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from msvit.models.entropy_gate import EntropyGate, list_entropies
from msvit.models.gate import (
    Budget,
    GateDecision,
    MixedScaleGate,
    gumbel_sigmoid,
    list_budget_mask,
    logistic_noise,
    straight_through,
)
from msvit.models.tree_gate import TreeGate, list_tree_budget_mask
from msvit_kernels.dispatch import compute_dtype
from msvit_kernels.gate_kernel import list_fused_gate
from msvit_kernels.reference import flat_cells
from msvit_kernels.tree_batch import TreeBatch


def gate_levels(gate: nn.Module) -> List[Tuple[int, nn.Module]]:
    """``(scale, two-scale gate)`` for every splittable scale of ``gate``, scales ascending."""
    if isinstance(gate, TreeGate):
        return sorted(zip(gate.level_scales, gate.levels), key=lambda level: level[0])
    if isinstance(gate, (MixedScaleGate, EntropyGate)):
        return [(1, gate)]
    raise NotImplementedError(f"a list of images of different sizes with a {type(gate).__name__} gate")


def list_decision(
    gate: nn.Module, images: Sequence[Tensor], batch: TreeBatch, fine_patch: int, sample: bool, budget: Budget
) -> GateDecision:
    """The gate's decisions for ``images`` (a checked list, ``batch`` its layout): flat
    ``GateDecision`` fields ``[sum D_b]``. ``sample``: training (learned gates sample, a budget
    wins); entropy gates are deterministic, their ``soft`` is None."""
    levels = gate_levels(gate)
    pixels = torch.cat([image.reshape(-1) for image in images])
    chans = images[0].shape[0]
    flat = batch.decision_nodes(pixels.device) - batch.scale_starts[1]
    entropy = isinstance(levels[0][1], EntropyGate)
    if entropy:
        entropies = list_entropies(levels, pixels, batch, fine_patch, chans)
        logits = [e - level.thresholds[0] for e, (_, level) in zip(entropies, levels)]
    else:
        sampled = sample and budget is None
        parts = [_learned_level(level, s, pixels, batch, fine_patch, chans, sampled) for s, level in levels]
        if sampled:  # (logits, soft, hard, st) per scale
            return GateDecision(*(torch.cat(field)[flat] for field in zip(*parts)))
        logits = [part[0] for part in parts]
    if budget is None:
        hard = torch.cat([level.fine(x) if entropy else x > 0 for x, (_, level) in zip(logits, levels)])[flat]
    logits = torch.cat(logits)[flat]
    if budget is not None and batch.scales == 2:
        image, local = batch.nodes_of_images(1, logits.device)
        hard = list_budget_mask(logits, image, local, batch.nodes_at(1), budget)
    elif budget is not None:
        hard = list_tree_budget_mask(logits, batch, budget)
    if entropy:
        return GateDecision(logits, None, hard, hard.to(images[0].dtype))
    return GateDecision(logits, torch.sigmoid(logits), hard, hard.to(logits.dtype))


def _learned_level(
    gate: MixedScaleGate, s: int, pixels: Tensor, batch: TreeBatch, fine_patch: int, chans: int, sample: bool
) -> Tuple[Tensor, ...]:
    """``(logits,)`` ``[N_s]`` of the scale-``s`` nodes in global order, with ``sample`` ``(logits,
    soft, hard, st)`` (one Gumbel-Sigmoid draw for the scale). Triton (``use_triton`` on the pixels,
    the batch gate's fallbacks): ``list_fused_gate``, one launch per layer over every image, the
    sample in its last launch. Torch: the nodes' full-resolution pixels gathered from the flat
    buffer (``flat_cells``), one MLP call over every image (``list_logits``)."""
    starts = batch.scale_starts
    node_pixels = batch.node_pixels(fine_patch, chans, pixels.device)
    grids = [tree.grids[s] for tree in batch.trees]
    if gate._fused(pixels):
        dtype = compute_dtype(pixels)  # autocast's, as the batch gate's kernel path
        weights = (w.to(dtype) for w in gate._weights_at(gate.list_positions(grids)))
        noise = logistic_noise(pixels.new_empty(starts[s + 1] - starts[s], dtype=dtype)) if sample else None
        nodes = range(starts[s], starts[s + 1])
        out = list_fused_gate(
            pixels.to(dtype),
            node_pixels,
            nodes,
            gate.region_size,
            fine_patch,
            *weights,
            noise=noise,
            temperature=gate.temperature,
        )
        return (out.logits, out.soft, out.hard, straight_through(out.soft, out.hard)) if sample else (out.logits,)
    nodes = torch.arange(starts[s], starts[s + 1], device=pixels.device)
    region_pixels = flat_cells(pixels, node_pixels, nodes, gate.region_size, chans, fine_patch).flatten(1)
    logits = gate.list_logits(region_pixels, grids)
    return (logits, *gumbel_sigmoid(logits, gate.temperature)) if sample else (logits,)
