"""The scale gate past two scales: one gate per splittable scale of the quadtree (docs/design.md
section 10, ``msvit_kernels.scale_tree``).

A model with ``S`` scales has patch sizes ``p, p*r, ..., p*r**(S-1)``; a node of scale ``s >= 1``
(a ``p*r**s`` px cell) either stays one token or splits into its ``r*r`` children. ``TreeGate``
holds one two-scale gate per splittable scale, ``levels`` (coarsest first: ``levels[i]`` decides
scale ``S - 1 - i``), each a ``MixedScaleGate`` (learned) or an ``EntropyGate`` (APT's entropy)
whose region size is ``p*r**s`` and whose grid is scale ``s``'s. Its outputs are ``[B, D]``
tensors in ``ScaleTree``'s decisions order (scales from the coarsest down to ``s = 1``, raster
order in each): a level's logit > 0 means *split*, as a two-scale gate's means *fine*.

- Learned, training: every level samples its own Gumbel-Sigmoid (independent noise, per-node
  straight-through values); evaluation thresholds the logits at 0. ``ScaleTree.token_weights``
  turns the straight-through values into token weights carrying every level's gradient.
- Entropy: a node splits when the grey-level entropy of its pixels reaches its scale's threshold
  (``H >= tau``, APT's rule; ``>`` with ``binning="continuous"``). The fused path runs
  ``patch_entropy`` with the threshold, one launch per level. A node with a non-finite pixel has
  entropy +inf: it splits at every level down to the finest cells, never merged.
- Budget (eval, both kinds): every image splits exactly ``k`` nodes (``tree_budget_mask``), so
  every image has ``roots + k * (r*r - 1)`` tokens and the packed shape is known in advance.
- A caller's mask: bool ``[B, D]``; entries below a node that does not split are ignored.
- A list of images of different sizes: ``msvit.models.list_gates`` (every level over the whole
  list at once, flat ``[sum D_b]`` decisions; budgets by :func:`list_tree_budget_mask`).

Entropy thresholds follow APT's order (``select_patches_by_threshold`` in APT's
``src/models/entropy_utils.py``): APT sorts the patch sizes ascending and gives patch size
``patch_sizes[i]`` the threshold ``thresholds[i - 1]``, keeping such a patch whole when its
entropy is ``< threshold`` (and dropping every smaller patch under a kept one). So
``thresholds[0]`` belongs to the finest boundary (the ``p*r`` px nodes) and ``thresholds[-1]`` to
the coarsest (the ``p*r**(S-1)`` px nodes): APT's ``num_scales=3, thresholds=[6.0, 4.0]`` (its
docs/entropy_gate.md) at 16/32/64 px keeps a 32 px patch whole below 6.0 bits and a 64 px patch below 4.0 bits.
Here ``thresholds[s - 1]`` is scale ``s``'s, so APT's lists carry over unchanged, and a node splits
when ``H >= tau``, as in APT.

Gate losses past two scales: the losses of ``msvit.losses`` take soft values ``m`` in [0, 1];
with ``S > 2`` they are given :func:`finest_share` (the soft weight of each finest cell), the
"fraction of finest tokens" the paper's losses then constrain.
"""

from itertools import accumulate
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from msvit.data.sample_images import IMAGENET_MEAN, IMAGENET_STD
from msvit.models.entropy_gate import EntropyGate, binning_record
from msvit.models.gate import Budget, GateDecision, MixedScaleGate
from msvit_kernels.dispatch import use_triton
from msvit_kernels.entropy_kernel import DEFAULT_BINS
from msvit_kernels.reference import entropy_levels_reference
from msvit_kernels.scale_tree import ScaleTree
from msvit_kernels.tree_batch import TreeBatch

KINDS = ("learned", "entropy")


def budget_splits(budget: Budget, tree: ScaleTree) -> int:
    """The number of splits per image a ``budget`` asks for: an int count, or a float fraction of
    the tree's ``D`` splittable nodes (rounded). Every image of the batch splits exactly that many."""
    n = tree.decisions
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(
            f"budget must be an int (splits per image) or a float fraction of the {n} splittable nodes, got {budget!r}"
        )
    if isinstance(budget, float) and not 0.0 <= budget <= 1.0:  # also refuses NaN
        raise ValueError(
            f"a float budget is a fraction of the {n} splittable nodes and must be in [0, 1], got {budget}"
        )
    k = int(round(budget * n)) if isinstance(budget, float) else budget
    if not 0 <= k <= n:
        raise ValueError(
            f"budget must be between 0 and {n} splits per image (D = {n} splittable nodes of the "
            f"{tree.scales}-scale tree, grids {list(tree.grids)}), got {k}"
        )
    return k


def effective_scores(logits: Tensor, tree: ScaleTree) -> Tensor:
    """``[B, D]``: each node's logit capped by its parent's effective score, ``min(own, parent's)``
    (a root keeps its own), so no node outranks an ancestor. NaN counts as ``-inf`` (never split
    before a real score), which keeps the cap monotone."""
    scores = torch.where(torch.isnan(logits), float("-inf"), logits)
    levels = tree.per_scale(scores)
    out: List[Tensor] = []  # coarsest first, the [B, D] order
    above = None
    for s in range(tree.scales - 1, 0, -1):
        own = levels[s]
        if above is not None:
            parent = tree.parents(s, logits.device)
            own = torch.where(parent >= 0, torch.minimum(own, above[:, parent.clamp_min(0)]), own)
        out.append(own)
        above = own
    return torch.cat(out, 1) if out else scores


def tree_budget_mask(logits: Tensor, tree: ScaleTree, budget: Budget) -> Tensor:
    """bool ``[B, D]``: the ``k`` splits of each image (``budget``: an int, or a float fraction of D).

    Rule: a node's score is its logit; its effective score caps it by its parent's effective score
    (:func:`effective_scores`), so a child never outranks its parent. Each image splits its ``k``
    nodes of highest effective score, ties broken coarse before fine, then by the node's own logit
    (the best of the children a split parent caps), then raster order: one sort of the own logits
    per scale, then a stable sort of the effective scores over the ``[B, D]`` order (coarsest scale
    first). NaN counts as ``-inf``.

    The chosen set is closed under ancestors: a node's parent has an effective score >= the node's
    and, on a tie, ranks first (coarser), so the parent is chosen whenever the node is. Every chosen
    split is therefore effective: each image has exactly ``tree.tokens(k)`` tokens. No host read
    (sorts, gathers, a slice, a scatter): it runs under CUDA graph capture.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != tree.decisions:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"logits must have shape [B, {tree.decisions}] (one per splittable node, coarsest scale first), got {shape}"
        )
    k = budget_splits(budget, tree)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    if k > 0:
        own = torch.where(torch.isnan(logits), float("-inf"), logits)
        starts = tree.decision_offsets
        # coarse before fine, then own logit (descending), then raster: a sort within each scale
        by_own = torch.cat(
            [
                starts[s] + torch.sort(level, dim=1, descending=True, stable=True).indices
                for s, level in zip(range(tree.scales - 1, 0, -1), tree.per_scale(own)[:0:-1])
            ],
            1,
        )
        effective = effective_scores(own, tree).gather(1, by_own)
        order = by_own.gather(1, torch.sort(effective, dim=1, descending=True, stable=True).indices)
        mask.scatter_(1, order[:, :k], True)
    return mask


def list_budget_splits(budget: Budget, batch: TreeBatch) -> List[int]:
    """:func:`budget_splits` of every image of a list (a fraction: each image its own share of its
    ``D_b``); an int budget larger than an image's ``D_b`` is refused naming the image."""
    splits = []
    for b, tree in enumerate(batch.trees):
        try:
            splits.append(budget_splits(budget, tree))
        except ValueError as error:
            raise ValueError(f"images[{b}]: {error}") from None
    return splits


def list_tree_budget_mask(logits: Tensor, batch: TreeBatch, budget: Budget) -> Tensor:
    """:func:`tree_budget_mask` of a list of images of different sizes at once: logits flat
    ``[sum D_b]`` (``TreeBatch``'s decision order) -> bool ``[sum D_b]``, image ``b`` splitting its
    ``budget_splits(budget, tree_b)`` nodes by the same rule and ties (effective score, coarse before
    fine, own logit, raster order). The effective scores are capped scale by scale over the global
    node table; the order is four stable sorts of the flat entries (own logit, scale, effective
    score, image: the last sort's key is the most significant). No loop over images, no host read."""
    splits = list_budget_splits(budget, batch)
    device = logits.device
    layout, nodes = batch.layout(device), batch.decision_nodes(device)
    starts = batch.scale_starts
    own = torch.where(torch.isnan(logits), float("-inf"), logits.detach())
    by_node = own[layout.decision[starts[1] :]]  # global node order, scales 1 .. S-1
    capped: List[Tensor] = []
    above = None
    for s in range(batch.scales - 1, 0, -1):  # the coarsest scale first: a node is capped by its parent
        level = by_node[starts[s] - starts[1] : starts[s + 1] - starts[1]]
        if above is not None:
            parent = layout.parent[starts[s] : starts[s + 1]]
            level = torch.where(parent >= 0, torch.minimum(level, above[parent.clamp_min(0)]), level)
        capped.insert(0, level)
        above = level
    effective = torch.cat(capped)[nodes - starts[1]]
    image, scale = layout.image[nodes], layout.scale[nodes]
    order = torch.sort(own, descending=True, stable=True).indices
    for key, descending in ((scale, True), (effective, True), (image, False)):
        order = order[torch.sort(key[order], descending=descending, stable=True).indices]
    first = torch.tensor([0, *accumulate(batch.decisions)][:-1], device=device)
    rank = torch.arange(order.numel(), device=device) - first[image[order]]
    keep = torch.tensor(splits, device=device)
    return torch.zeros_like(logits, dtype=torch.bool).index_put_((order,), rank < keep[image[order]])


def finest_share(decision_soft: Tensor, tree: ScaleTree) -> Tensor:
    """float ``[B, N_0]``: the soft token weight of every finest cell, ``tree.token_weights(soft)[0]``.

    The product of the soft split values along the cell's path (1 for a cell without ancestors):
    the relaxed "this cell is a finest token", whose mean over cells is the expected fraction of the
    image covered by finest tokens. With ``S > 2`` scales the gate losses (``msvit.losses``: L0,
    BaS, GBaS over the finest grid ``tree.grids[0]``) are applied to this, the paper's losses on the
    fraction of finest tokens; with two scales they keep taking the gate's soft values ``[B, Nc]``.
    decision_soft: ``[B, D]`` soft split values (``GateDecision.soft``, or ``sigmoid(logits)``)."""
    if not isinstance(decision_soft, Tensor) or not decision_soft.is_floating_point():
        raise TypeError(f"decision_soft must be a float tensor [B, {tree.decisions}] of soft split values")
    return tree.token_weights(decision_soft)[0]


def check_tree_mask(mask, batch: int, tree: ScaleTree) -> None:
    """A caller's split mask must be bool ``[B, D]`` for the tree of the batch's images."""
    shape = f"[B, D] = [{batch}, {tree.decisions}]"
    where = (
        "one entry per splittable node, scales from the coarsest down to s = 1 ("
        + ", ".join(f"{h}x{w}" for h, w in reversed(tree.grids[1:]))
        + " grids), raster order in each"
    )
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor {shape} ({where}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = split), got {mask.dtype}; use mask > 0.5 or mask.bool()")
    if tuple(mask.shape) != (batch, tree.decisions):
        raise ValueError(f"mask must have shape {shape} ({where}), got {tuple(mask.shape)}")


class TreeGate(nn.Module):
    """One gate per splittable scale of an ``S``-scale model (module docstring); build it with
    :meth:`learned` or :meth:`entropy`.

    Same interface as ``MixedScaleGate`` / ``EntropyGate``: ``decide``, ``decision``, ``forward``,
    ``grid`` (the coarsest grid of the size the model was built for), ``region_size`` (the
    coarsest patch size), ``kernels`` (forwarded to every level), ``macs_per_region``,
    ``describe_architecture``, ``from_timm_kwargs``; its tensors are ``[B, D]`` in the
    ``ScaleTree`` decisions order.
    """

    def __init__(self, kind: str, levels: Sequence[nn.Module], fine_patch: int, ratio: int, fine_grid: Tuple[int, int]):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown tree gate kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.fine_patch = int(fine_patch)
        self.ratio = int(ratio)
        self.fine_grid = tuple(int(n) for n in fine_grid)
        self.tree = ScaleTree.of(self.fine_grid, self.ratio, len(levels) + 1)
        self.levels = nn.ModuleList(levels)
        for level, s in zip(self.levels, self.level_scales):
            if level.region_size != self.patch_size(s) or tuple(level.grid) != self.tree.grids[s]:
                raise ValueError(
                    f"the level of scale {s} must gate {self.patch_size(s)} px regions on the grid "
                    f"{self.tree.grids[s]}, got {level.region_size} px on {tuple(level.grid)}"
                )
        self.grid = self.tree.grids[-1]
        self.region_size = self.patch_size(self.scales - 1)
        self._kernels = "auto"
        self.kernels = "auto"

    # ---- construction ------------------------------------------------------------------------

    @staticmethod
    def _geometry(fine_patch, ratio, scales, fine_grid) -> ScaleTree:
        if isinstance(fine_patch, bool) or not isinstance(fine_patch, int) or fine_patch < 1:
            raise ValueError(f"fine_patch (the finest patch size) must be a positive int, got {fine_patch!r}")
        return ScaleTree.of(tuple(fine_grid), ratio, scales)  # checks scales and ratio

    @classmethod
    def learned(
        cls, fine_patch: int, ratio: int, scales: int, fine_grid: Tuple[int, int], in_chans: int = 3, **options
    ) -> "TreeGate":
        """A ``MixedScaleGate`` per splittable scale. options: ``MixedScaleGate``'s (hidden,
        init_logit, temperature), the same for every level."""
        tree = cls._geometry(fine_patch, ratio, scales, fine_grid)
        levels = [
            MixedScaleGate(fine_patch * ratio**s, tree.grids[s], in_chans=in_chans, **options)
            for s in range(scales - 1, 0, -1)
        ]
        return cls("learned", levels, fine_patch, ratio, fine_grid)

    @classmethod
    def entropy(
        cls,
        fine_patch: int,
        ratio: int,
        scales: int,
        fine_grid: Tuple[int, int],
        thresholds: Sequence[float],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        bins: int = DEFAULT_BINS,
        in_chans: int = 3,
        binning: str = "apt",
    ) -> "TreeGate":
        """An ``EntropyGate`` per splittable scale. thresholds: ``S - 1`` values in bits, in APT's
        order (module docstring): ``thresholds[s - 1]`` is for the ``p*r**s`` px nodes, the finest
        boundary first; APT's three-scale ``[6.0, 4.0]``: 6.0 at ``p*r``, 4.0 at ``p*r**2``."""
        tree = cls._geometry(fine_patch, ratio, scales, fine_grid)
        if (
            isinstance(thresholds, (str, bytes))
            or not isinstance(thresholds, Sequence)
            or len(thresholds) != scales - 1
        ):
            raise ValueError(
                f"entropy thresholds: one per scale boundary, {scales - 1} for {scales} scales, finest boundary "
                f"first as APT orders them (e.g. [6.0, 4.0] for 16/32/64 px); got {thresholds!r}"
            )
        levels = [
            EntropyGate(
                fine_patch * ratio**s,
                tree.grids[s],
                (thresholds[s - 1],),
                mean=mean,
                std=std,
                bins=bins,
                in_chans=in_chans,
                binning=binning,
            )
            for s in range(scales - 1, 0, -1)
        ]
        return cls("entropy", levels, fine_patch, ratio, fine_grid)

    # ---- geometry ----------------------------------------------------------------------------

    @property
    def scales(self) -> int:
        return self.tree.scales

    @property
    def level_scales(self) -> Tuple[int, ...]:
        """The scale each of ``levels`` decides: ``(S - 1, ..., 1)``."""
        return tuple(range(self.scales - 1, 0, -1))

    @property
    def thresholds(self) -> Optional[Tuple[float, ...]]:
        """The entropy thresholds in APT's order (``thresholds[s - 1]`` is scale ``s``'s), or None."""
        if self.kind != "entropy":
            return None
        return tuple(self.levels[self.scales - 1 - s].thresholds[0] for s in range(1, self.scales))

    def patch_size(self, s: int) -> int:
        """The patch size in px of scale ``s`` (0 = finest)."""
        return self.fine_patch * self.ratio**s

    def tree_of(self, images: Tensor) -> ScaleTree:
        """The tree of this batch's image size (its finest grid is ``(H // p, W // p)``)."""
        return ScaleTree.of(
            (images.shape[-2] // self.fine_patch, images.shape[-1] // self.fine_patch), self.ratio, self.scales
        )

    def _crop(self, images: Tensor, s: int) -> Tensor:
        """The view of ``images`` covered by whole scale-``s`` nodes (what that level sees)."""
        size = self.patch_size(s)
        return images[..., : images.shape[-2] // size * size, : images.shape[-1] // size * size]

    @property
    def kernels(self) -> str:
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        self._kernels = value
        for level in self.levels:
            level.kernels = value

    def macs_per_region(self) -> int:
        """MACs per coarsest region: each level's MACs per node times its nodes per coarsest region,
        ``r**(2 * (S - 1 - s))`` (0 for the entropy gate)."""
        return sum(
            level.macs_per_region() * self.ratio ** (2 * (self.scales - 1 - s))
            for level, s in zip(self.levels, self.level_scales)
        )

    def macs(self, tree: ScaleTree) -> int:
        """MACs per image of ``tree``'s size, border nodes outside the coarsest regions included."""
        return sum(level.macs_per_region() * tree.counts[s] for level, s in zip(self.levels, self.level_scales))

    # ---- decisions ---------------------------------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        """images ``[B, C, H, W]`` -> logits ``[B, D]`` (> 0: split), coarsest scale first."""
        entropies = self._level_entropies(images)
        return torch.cat(
            [level(self._crop(images, s), *e) for level, s, e in zip(self.levels, self.level_scales, entropies)], 1
        )

    def _level_entropies(self, images: Tensor) -> List[Tuple[Tensor, ...]]:
        """Per level, ``()`` (the level computes its own input) or ``(entropy,)``: on the torch path
        of an entropy gate whose levels bin alike, every level's entropies from one binning of the
        pixels (``entropy_levels_reference``; binning twice was a third of the gate's time)."""
        none = [()] * len(self.levels)
        if self.kind != "entropy" or use_triton(self.kernels, images):
            return none
        first = self.levels[0]
        options = lambda level: (level.mean, level.std, level.bins, level.binning)  # noqa: E731
        if any(options(level) != options(first) for level in self.levels):
            return none
        sizes = sorted(level.region_size for level in self.levels)
        levels = entropy_levels_reference(images.detach(), sizes, first.mean, first.std, first.bins, first.binning)
        by_size = dict(zip(sizes, levels))
        return [(by_size[level.region_size],) for level in self.levels]

    def decide(
        self, images: Tensor, sample: bool = False, budget: Budget = None, noise: Optional[Tensor] = None
    ) -> GateDecision:
        """Split decisions ``[B, D]`` for a batch: with ``sample`` (training) each learned level
        samples its Gumbel-Sigmoid (``noise``: logistic noise ``[B, D]``, default a fresh draw per
        level); else each level thresholds (logit > 0), or, with a ``budget``, exactly ``k`` splits
        per image (:func:`tree_budget_mask`; a budget always wins over sampling). The entropy gate
        ignores ``sample`` and ``noise``; its ``soft`` is None and its ``st`` has no gradient."""
        if budget is not None:
            logits = self(images)
            hard = tree_budget_mask(logits, self.tree_of(images), budget)
            if self.kind == "entropy":
                return GateDecision(logits, None, hard, hard.to(images.dtype))
            return GateDecision(logits, torch.sigmoid(logits), hard, hard.to(logits.dtype))
        sample = bool(sample) and self.kind == "learned"
        noises: List[Optional[Tensor]] = [None] * len(self.levels)
        if sample and noise is not None:
            tree = self.tree_of(images)
            if not isinstance(noise, Tensor) or tuple(noise.shape) != (images.shape[0], tree.decisions):
                shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
                raise ValueError(f"noise must have shape [B, D] = [{images.shape[0]}, {tree.decisions}], got {shape}")
            per_scale = tree.per_scale(noise)
            noises = [per_scale[s] for s in self.level_scales]
        entropies = self._level_entropies(images)
        parts = [
            level.decide(self._crop(images, s), sample=sample, noise=n, **({"entropy": e[0]} if e else {}))
            for level, s, n, e in zip(self.levels, self.level_scales, noises, entropies)
        ]
        soft = None if parts[0].soft is None else torch.cat([p.soft for p in parts], 1)
        return GateDecision(
            torch.cat([p.logits for p in parts], 1),
            soft,
            torch.cat([p.hard for p in parts], 1),
            torch.cat([p.st for p in parts], 1),
        )

    def decision(self, images: Tensor, mask: Optional[Tensor], *, sample: bool, budget: Budget = None) -> GateDecision:
        """The caller's ``mask`` (bool ``[B, D]``, checked against the tree of this batch's images)
        as a decision without gate outputs, or, when it is None, the gate's own ``decide``."""
        if mask is None:
            return self.decide(images, sample=sample, budget=budget)
        check_tree_mask(mask, images.shape[0], self.tree_of(images))
        mask = mask.to(images.device)
        return GateDecision(None, None, mask, mask.to(images.dtype))

    # ---- records -----------------------------------------------------------------------------

    def describe_architecture(self) -> dict:
        """What a checkpoint's ``config.json`` records of this gate (``msvit.io.architecture``)."""
        description = {
            "type": "tree",
            "kind": self.kind,
            "scales": self.scales,
            "ratio": self.ratio,
            "fine_patch": self.fine_patch,
            "fine_grid": list(self.fine_grid),
            "grid": list(self.grid),
            "levels": [
                {"scale": s, "region_size": level.region_size, "grid": list(level.grid)}
                for level, s in zip(self.levels, self.level_scales)
            ],
        }
        first = self.levels[0]
        if self.kind == "learned":
            description.update(hidden=first.fc1.out_features, temperature=first.temperature)
        else:
            description.update(
                thresholds=list(self.thresholds),
                bins=first.bins,
                **binning_record(first.binning),
                mean=list(first.mean),
                std=list(first.std),
            )
        return description

    def from_timm_kwargs(self) -> dict:
        """The ``msvit.from_timm`` keywords that rebuild this gate (a checkpoint's ``config["msvit"]``):
        ``scales`` (the patch sizes, finest first) plus the two-scale gate's own keywords (thresholds
        in APT's order)."""
        first = self.levels[0]
        if self.kind == "learned":
            return {
                "gate": "learned",
                "scales": [self.patch_size(s) for s in range(self.scales)],
                "hidden": first.fc1.out_features,
                "temperature": first.temperature,
            }
        return {
            "gate": "entropy",
            "scales": [self.patch_size(s) for s in range(self.scales)],
            "entropy_thresholds": list(self.thresholds),
            "entropy_bins": first.bins,
            "entropy_binning": first.binning,
            "entropy_mean": list(first.mean),
            "entropy_std": list(first.std),
        }

    def extra_repr(self) -> str:
        sizes = "/".join(str(self.patch_size(s)) for s in range(self.scales))
        extra = f", thresholds={self.thresholds}" if self.kind == "entropy" else ""
        return f"kind={self.kind!r}, patch_sizes={sizes}, ratio={self.ratio}, grid={self.grid}{extra}"
