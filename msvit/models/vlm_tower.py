"""The vision towers of VLMs (timm's ``qwen3_vit_*``, ``deepseek_vit_*``, ``gemma4_vit_*``) as MSViTs.

One adapter per family (``msvit.models.qwen3_vit``, ``deepseek_vit``, ``gemma4_vit``) reads the
timm model into ``TowerParts``; ``tower_from_timm`` builds a ``VLMTower`` from them: the gate and
tokenizer as ``from_timm`` builds them for a ViT, the family's blocks run packed, and the family's
projector (Qwen's 2x2 merger, DeepSeek's 3x3 aligner, Gemma 4's 3x3 soft-token pool) on the fine
grid. docs/design.md section 17 states the projector semantics; in short:

- **replicate** (default, ``llm_tokens="replicate"``): the packed encoder tokens are unpacked to
  the fine grid, each coarse token copied over the cells it covers, and the projector runs on that
  grid as it does in the VLM. The LLM gets the same number of tokens in the same layout; only the
  encoder's compute shrinks. No training is needed for the interface.
- **merged** (``llm_tokens="merged"``, ``VLMTower.encode``): a coarse token that covers several
  whole projector windows (three scales, or a coarse patch that is a multiple of the window) is
  handed to the LLM once, not once per window; each token comes with its first window and its
  span in windows. The projector's output for such a window is the same either way (its input is
  the coarse token copied over every cell); what changes is that the LLM receives one token for an
  area it was trained to receive several for: it never saw such input.
"""

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvit.models.checks import MODES, check_choice, check_mask_list, is_image_list
from msvit.models.gate import Budget
from msvit.models.layers import dense_blocks
from msvit.models.mixed_scale_vit import MSViT, MSViTOutput, PackedFeatures, take_tokens, trim_order, unpack_to_grid
from msvit.models.tokenizer import MixedScaleTokenizer, region_of_fine_cells
from msvit_kernels.varlen import host_offsets

LLM_TOKENS = ("replicate", "merged")


class GridProjector(nn.Module):
    """A VLM projector on the fine grid: ``forward(grid [B, h, w, C]) -> [B, windows, D]``.

    module: timm's projector (or a family's own pooling), called on the ``[B, h, w, C]`` grid;
    window: the side of the cell window that becomes one LLM token; pads: the projector zero-pads a
    grid that is not a whole number of windows (DeepSeek), else such a grid is refused (Qwen, Gemma).
    """

    def __init__(self, module: nn.Module, window: int, pads: bool, name: str):
        super().__init__()
        self.module = module
        self.window = window
        self.pads = pads
        self.name = name

    def window_grid(self, fine_grid: Tuple[int, int]) -> Tuple[int, int]:
        h, w = fine_grid
        k = self.window
        if not self.pads and (h % k or w % k):
            raise ValueError(
                f"{self.name} merges {k}x{k} patches: the patch grid must be a multiple of {k} on both sides, "
                f"got {h}x{w} patches; resize the images to multiples of {k} patches"
            )
        return -(-h // k), -(-w // k)

    def macs_per_window(self) -> int:
        return sum(m.in_features * m.out_features for m in self.module.modules() if isinstance(m, nn.Linear))

    def forward(self, grid: Tensor) -> Tensor:
        self.window_grid(tuple(grid.shape[1:3]))
        return self.module(grid)


class TowerParts(NamedTuple):
    """What a family adapter reads from a timm tower (``msvit.models.qwen3_vit`` and the others).

    embed: the patch embedding as a linear one ((C, p, p) order); fine: its patch; grid: the fine
    grid of the model's nominal image size; grid_positions: the tokenizer's fine-table module (or
    None); blocks, norm (the encoder's final norm, or Identity); rope: ``rope(ratio, scales)`` -> the
    rotary module (``rotary(grid, positions)``) or None; projector: a ``GridProjector`` or None;
    encoder: True for an ``_enc`` tower (its output is the projector's, or the pooled features);
    fc_norm, head_drop, head: the classifier's (Identity for an encoder); ratio: the default
    coarse ratio (the projector's window); in_chans; mean, std: what the pixels are normalised with.
    """

    embed: nn.Linear
    fine: int
    grid: Tuple[int, int]
    grid_positions: Optional[nn.Module]
    blocks: nn.ModuleList
    norm: nn.Module
    rope: Callable[[int, int], Optional[nn.Module]]
    projector: Optional[GridProjector]
    encoder: bool
    fc_norm: nn.Module
    head_drop: nn.Module
    head: nn.Module
    ratio: int


class LLMTokens(NamedTuple):
    """What ``VLMTower.encode`` hands the LLM: tokens ``[T, D]`` of all images, ``cu_seqlens``
    int32 ``[B+1]``, ``window`` int64 ``[T]`` (each token's first projector window, raster index
    on ``window_grid``), ``span`` int64 ``[T]`` (windows per side it stands for: 1 unless merged)."""

    tokens: Tensor
    cu_seqlens: Tensor
    window: Tensor
    span: Tensor
    window_grid: Tuple[int, int]


class VLMTower(MSViT):
    """An MSViT of a VLM vision tower. ``forward`` returns what timm's model returns: logits
    ``[B, K]`` (a classifier), projected tokens ``[B, N, D]`` (an ``_enc`` tower with a projector;
    with ``llm_tokens="merged"`` a list of ``[N_i, D]``). ``forward_features`` gives the packed
    encoder tokens; ``encode`` the LLM's tokens with their windows.

    Args (beyond ``MSViT``'s): projector: the ``GridProjector`` (None: the classifier pools the
    encoder tokens as MSViT does); encoder: an ``_enc`` tower (no classifier head).
    """

    def __init__(self, *args, projector: Optional[GridProjector] = None, encoder: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector = projector
        self.encoder = encoder
        self.llm_tokens = "replicate"

    @property
    def llm_tokens(self) -> str:
        """``"replicate"`` (default) or ``"merged"``: see the module docstring."""
        return self._llm_tokens

    @llm_tokens.setter
    def llm_tokens(self, value: str) -> None:
        check_choice("llm_tokens", value, LLM_TOKENS)
        if value == "merged" and self.projector is None:
            raise ValueError("llm_tokens='merged' needs a tower with a projector (an _enc, _merge or _align model)")
        self._llm_tokens = value

    def forward(
        self,
        images: Tensor,
        *,
        mask: Optional[Tensor] = None,
        mode: str = "packed",
        budget: Budget = None,
        capacity: Optional[int] = None,
        return_gate: bool = False,
    ):
        if self.encoder and self.projector is not None and self.llm_tokens == "merged":
            if mode != "packed" or capacity is not None or return_gate:
                raise ValueError("llm_tokens='merged' runs packed, without capacity or return_gate; use encode()")
            out = self.encode(images, mask=mask, budget=budget)
            # a list of [N_b, D]: its lengths are host values, a second host read after the index's
            # (the merged layout is new); encode() returns the packed tokens and cu_seqlens without it
            offsets = host_offsets(out.cu_seqlens)
            return list(out.tokens.split([b - a for a, b in zip(offsets, offsets[1:])]))
        if is_image_list(images) and self.projector is not None:
            return self._projected_list(images, mask, mode, budget, capacity, return_gate)
        if self.projector is None or (mode == "packed" and images.shape[0] > 0):
            return super().forward(
                images, mask=mask, mode=mode, budget=budget, capacity=capacity, return_gate=return_gate
            )
        check_choice("mode", mode, MODES)
        if capacity is not None:
            raise ValueError(f"capacity pads the packed rows and applies to mode='packed' only, got mode={mode!r}")
        decision = self.decide(images, mask=mask, budget=budget)
        grid, tokens = self._dense_grid(images, decision, mode)
        out = self._from_grid(grid)
        return MSViTOutput(out, decision, tokens) if return_gate else out

    def _projected_list(self, images, mask, mode: str, budget: Budget, capacity, return_gate: bool):
        """A list of images of different sizes (native resolution, docs/design.md section 17): one
        packed forward, then the projector on each image's own fine grid (replicate). An encoder
        returns a list of ``[windows_b, D]``, a classifier logits ``[B, K]``. The dense baselines
        run image by image, as MSViT's do."""
        batch = self.batch_of(images)  # checks the list, naming the image
        check_choice("mode", mode, MODES)
        if mask is not None:  # one bool mask per image, of its own length (the dense loop zips them)
            mask = check_mask_list(mask, self._decision_names(batch))
        for b, image in enumerate(images):  # each grid must be whole windows (or padded): refused up front
            try:
                self.projector.window_grid(self.tokenizer.grids(image[None])[0])
            except ValueError as error:
                raise ValueError(f"images[{b}]: {error}") from None
        if mode != "packed":
            if capacity is not None:
                raise ValueError(f"capacity pads the packed rows and applies to mode='packed' only, got mode={mode!r}")
            masks = [None] * len(images) if mask is None else mask
            outs = [
                self.forward(
                    image[None], mask=None if m is None else m[None], mode=mode, budget=budget, return_gate=True
                )
                for image, m in zip(images, masks)
            ]
            return self._list_output(
                [o.logits[0] for o in outs], None, torch.cat([o.tokens for o in outs]), return_gate
            )
        features = self.forward_features(images, mask=mask, budget=budget, capacity=capacity)
        grids = unpack_to_grid(features).grid
        outs = [self.projector(grid[None])[0] for grid in grids]  # each image's own window grid
        index = features.index
        tokens = (index.cu_seqlens[1 : index.batch + 1] - index.cu_seqlens[: index.batch]).long()
        return self._list_output(outs, features.gate, tokens, return_gate)

    def _list_output(self, projected, gate, tokens: Tensor, return_gate: bool):
        out = projected if self.encoder else self._head(torch.stack([p.mean(0) for p in projected]))
        return MSViTOutput(out, gate, tokens) if return_gate else out

    def forward_head(self, features: PackedFeatures, pre_logits: bool = False) -> Tensor:
        """The tower's output from ``forward_features``' packed tokens: MSViT's pooled head (no
        projector), or the projector on the unpacked fine grid (then, for a classifier, timm's mean
        over the projected tokens, norm and head)."""
        if self.projector is None:
            return super().forward_head(features, pre_logits)
        if not isinstance(features, PackedFeatures):
            raise TypeError(f"forward_head takes the PackedFeatures of forward_features, got {type(features).__name__}")
        return self._from_grid(unpack_to_grid(features).grid, pre_logits)

    def _from_grid(self, grid: Tensor, pre_logits: bool = False) -> Tensor:
        out = self.projector(grid)
        return out if self.encoder else self._head(out.mean(1), pre_logits)

    @torch.no_grad()
    def encode(
        self, images: Tensor, *, mask: Optional[Tensor] = None, budget: Budget = None, llm_tokens: Optional[str] = None
    ) -> LLMTokens:
        """The LLM's tokens of a batch (packed mode), under ``llm_tokens`` (default: the model's).
        "merged" reads the token count back to the host (it depends on the gate)."""
        if self.projector is None:
            raise ValueError("encode needs a tower with a projector (an _enc, _merge or _align model)")
        if is_image_list(images):
            raise ValueError(
                "encode and llm_tokens='merged' take a [B, C, H, W] batch; a list of images of different "
                "sizes runs with llm_tokens='replicate' (model(images): a list of [windows_b, D])"
            )
        llm_tokens = self.llm_tokens if llm_tokens is None else llm_tokens
        check_choice("llm_tokens", llm_tokens, LLM_TOKENS)
        features = self.forward_features(images, mask=mask, budget=budget)
        out = self.projector(unpack_to_grid(features).grid)  # [B, W, D]
        batch, windows = out.shape[:2]
        window_grid = self.projector.window_grid(features.fine_grid)
        window = torch.arange(windows, device=out.device).repeat(batch)
        if llm_tokens == "replicate":
            cu = torch.arange(batch + 1, device=out.device, dtype=torch.int32) * windows
            return LLMTokens(out.flatten(0, 1), cu, window, torch.ones_like(window), window_grid)
        owner = window_owner(features.index.fine_to_row, features.fine_grid, self.projector.window)
        keep, span = first_windows(owner)
        counts = keep.view(batch, windows).sum(1)
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        return LLMTokens(out.flatten(0, 1)[keep], cu, window[keep], span[keep], window_grid)

    def _dense_grid(self, images: Tensor, decision, mode: str) -> Tuple[Tensor, Tensor]:
        """Masked / trimmed modes: the final-normed fine grid ``[B, h, w, C]`` (coarse tokens
        copied over their cells, as ``unpack_to_grid`` does) and the tokens computed per image."""
        x, weights = self.tokenizer.dense(images, decision.st)
        positions = self._dense_positions(images)
        order = None
        if mode == "trimmed":
            order = trim_order(weights, self.tokenizer.num_prefix)
            x, weights = take_tokens(x, order), torch.gather(weights, 1, order)
            positions = positions[order] if positions is not None else None
        x = self.norm(dense_blocks(self.blocks, self.norm_pre(x), weights, self._rotary(images, positions)))
        tokens = torch.full((images.shape[0],), x.shape[1], device=images.device)
        if order is not None:  # back to the full dense layout; the trimmed tokens were inactive
            x = x.new_zeros(x.shape[0], self._dense_length(images), x.shape[2]).scatter(
                1, order[..., None].expand_as(x), x
            )
            weights = weights.new_zeros(x.shape[:2]).scatter(1, order, weights)
        start = self.tokenizer.num_prefix
        grid = dense_to_grid(x[:, start:], weights[:, start:], self.tokenizer.grids(images)[0], self.tokenizer)
        return grid, tokens

    def _dense_length(self, images: Tensor) -> int:
        (h, w), (hc, wc) = self.tokenizer.grids(images)
        if self.tokenizer.scales > 2:
            return self.tokenizer.num_prefix + self.tokenizer.tree((h, w)).offsets[-1]
        return self.tokenizer.num_prefix + h * w + hc * wc

    def projector_macs(self, fine_grid: Tuple[int, int]) -> int:
        """The projector's MACs per image of this fine grid (its linear layers, once per window)."""
        if self.projector is None:
            return 0
        rows, cols = self.projector.window_grid(fine_grid)
        return rows * cols * self.projector.macs_per_window()


def dense_to_grid(x: Tensor, weights: Tensor, fine_grid: Tuple[int, int], tokenizer: MixedScaleTokenizer) -> Tensor:
    """Dense patch tokens ``[B, N, C]`` (fine, then every coarser scale, raster order each) ->
    ``[B, h, w, C]``: each cell takes the one active token (weight > 0.5) that covers it."""
    h, w = fine_grid
    batch, _, channels = x.shape
    grid = x[:, : h * w] * (weights[:, : h * w] > 0.5)[..., None]
    offset = h * w
    for s in range(1, tokenizer.scales):
        r = tokenizer.ratio**s
        nodes = (h // r, w // r)
        node = region_of_fine_cells(nodes, r, x.device, fine_grid)  # -1: a border cell, in no node
        index = offset + node.clamp_min(0)
        active = (weights[:, index] > 0.5) & (node >= 0)
        grid = grid + x[:, index] * active[..., None]
        offset += nodes[0] * nodes[1]
    return grid.view(batch, h, w, channels)


def window_owner(fine_to_row: Tensor, fine_grid: Tuple[int, int], k: int) -> Tensor:
    """int64 ``[B, windows]``: the packed row of the one coarse token that covers every cell of
    each ``k x k`` projector window, or -1 (cells of several tokens, or padding past the grid)."""
    h, w = fine_grid
    rows = F.pad(fine_to_row.view(-1, 1, h, w).double(), (0, -w % k, 0, -h % k), value=-1.0)
    low, high = -F.max_pool2d(-rows, k), F.max_pool2d(rows, k)
    return torch.where((low == high) & (low >= 0), low, -1.0).flatten(1).long()


def first_windows(owner: Tensor) -> Tuple[Tensor, Tensor]:
    """(keep bool ``[B*W]``, span int64 ``[B*W]``): keep one window per owning coarse token (its
    first, in raster order) and every window without one; span: windows per side the kept one
    stands for (1 for windows without an owner)."""
    flat = owner.flatten()
    order = torch.arange(flat.numel(), device=flat.device)
    owned = flat >= 0
    slots = int(flat.max().clamp_min(0)) + 1
    first = torch.full((slots,), flat.numel(), device=flat.device).scatter_reduce(
        0, flat.clamp_min(0), torch.where(owned, order, flat.numel()), "amin"
    )
    count = torch.zeros(slots, dtype=torch.long, device=flat.device).scatter_add(0, flat.clamp_min(0), owned.long())
    keep = ~owned | (first[flat.clamp_min(0)] == order)
    span = torch.where(owned, count[flat.clamp_min(0)].double().sqrt().round().long(), 1)
    return keep, span
