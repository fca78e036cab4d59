"""Packed inference the host cannot slow down: one captured (or compiled) forward per token bucket.

An eager packed forward is a few hundred small launches whose host cost does not shrink with the
tokens, plus one host read (the batch's token count). On a fast GPU at ViT-S sizes that host
time is the whole forward (docs/design.md section 9). ``compile_packed`` removes it:

- **Static shapes.** Every forward it runs has a ``varlen.StaticShape``: packed rows padded to a
  capacity, padding rows in sequences of their own, ``max_seqlen`` a static bound. Shapes then
  depend on (batch, image size, capacity) only, never on the mask.
- **Buckets.** Without a budget a batch's token count is known only after the gate: the runner
  runs the gate (captured too), reads the count (the one host read), and replays the forward of
  the smallest bucket that holds it (vLLM's ViT encoder graphs do the same). A batch larger than
  every bucket runs eagerly (``runner.fallbacks`` counts them). With a ``budget`` every image has
  the same known length: one bucket, no host read at all.
- **Modes.** ``cuda_graphs``: one CUDA graph per bucket (warm-up and Triton autotuning first, on
  a side stream, as torch's CUDA-graph notes require; one shared memory pool), replayed after
  the images are copied into a static buffer. ``torch_compile``: the static forward under
  ``torch.compile(fullgraph=True, dynamic=False)``, one graph per bucket, on CPU (inductor) too.
  ``eager``: the static forward without capture (debugging, host-time studies).

Training stays eager: a training step differs per batch in more than the token count (Gumbel
noise, dropout masks, optimizer state), autograd's saved tensors would have to live in the graph
pool, and the step's host time is a smaller share of its longer device time.
"""

import math
import warnings
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from msvit.models.checks import check_batch_size, check_image_size
from msvit.models.gate import Budget
from msvit.models.mixed_scale_vit import MSViT
from msvit_kernels.varlen import count_border_cells

MODES = ("cuda_graphs", "torch_compile", "eager")
DEFAULT_FINE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # bucket i holds batches with up to this share of fine regions
WARMUP_CALLS = 3  # autotuners time their configs on the first calls; capture must come after


def default_buckets(model: MSViT, batch_size: int, image_size) -> List[int]:
    """Capacities for batches with up to 25, 50, 75 and 100% of their regions fine (more than two
    scales: of their splittable nodes split); ``image_size``: ``H`` or ``(H, W)``."""
    tokenizer = model.tokenizer
    batch_size = check_batch_size(batch_size, 1)
    image_size = check_image_size(image_size, tokenizer.fine_patch, tokenizer.patch_sizes[-1])
    fine_grid = (image_size[0] // tokenizer.fine_patch, image_size[1] // tokenizer.fine_patch)
    if tokenizer.scales > 2:
        tree = tokenizer.tree(fine_grid)
        regions, unsplit = batch_size * tree.decisions, tree.roots
    else:
        coarse = tokenizer.coarse_patch
        regions = batch_size * (image_size[0] // coarse) * (image_size[1] // coarse)
        unsplit = count_border_cells(fine_grid, tokenizer.ratio)  # always fine, on top of the regions
        unsplit += regions // batch_size
    base = batch_size * (tokenizer.num_prefix + unsplit)  # every region coarse (nothing split)
    extra = tokenizer.ratio**2 - 1  # rows a region adds when it is fine (a node when it splits)
    return sorted({base + extra * math.ceil(f * regions) for f in DEFAULT_FINE_FRACTIONS})


class PackedRunner:
    """``runner(images) -> logits``: the logits of ``model(images, budget=budget)`` from a captured
    or compiled static forward. Build it with :func:`compile_packed`.

    Attributes: ``buckets`` (capacities, packed rows, ascending), ``batch_size``, ``image_size``,
    ``budget``, ``mode``; ``replays`` (calls per bucket) and ``fallbacks`` (eager calls of batches
    larger than every bucket).
    """

    _notice_frames = 5  # _compile, _build, __init__, compile_packed: the notice names the caller's line

    def __init__(
        self,
        model: MSViT,
        batch_size: int,
        image_size: Tuple[int, int],
        budget: Budget,
        buckets: List[int],
        mode: str,
        compile_options: dict,
    ):
        self.model, self.batch_size, self.image_size = model, batch_size, image_size
        self.budget, self.buckets, self.mode = budget, buckets, mode
        self.replays: Dict[int, int] = {capacity: 0 for capacity in buckets}
        self.fallbacks = 0
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._images = torch.zeros(batch_size, model.in_chans, *image_size, device=self.device, dtype=self.dtype)
        self._build(compile_options)

    def _build(self, compile_options: dict) -> None:
        """Capture, compile or wrap the stages over the static inputs ``self._images``."""
        mode, buckets = self.mode, self.buckets
        self._decide = self._forwards = self._mask = None
        with torch.inference_mode():
            if mode == "cuda_graphs":
                self._capture()
            elif mode == "torch_compile":
                self._compile(compile_options)
            else:
                self._decide, self._forwards = self._decide_fn, {c: self._forward_fn(c) for c in buckets}

    def __call__(self, images: Tensor) -> Tensor:
        count = self._check(images)
        with torch.inference_mode():
            if count == 0:  # no packed layout to replay: the model's own empty logits, as it gives them
                return self.model(images, budget=self.budget)
            if self.mode == "cuda_graphs":
                self._images[:count].copy_(images)
                self._images[count:].zero_()
                padded = self._images
            else:
                padded = self._pad(images, count)
            if self.budget is not None:
                capacity, mask = self.buckets[0], None
            else:
                mask, total = self._decide(padded)
                tokens = int(total)  # the forward's one host read: which bucket holds this batch
                capacity = next((c for c in self.buckets if c >= tokens), None)
                if capacity is None:
                    self.fallbacks += 1
                    return self.model(padded, mask=mask.clone())[:count]
            self.replays[capacity] += 1
            logits = self._forwards[capacity](padded, mask)
            return logits[:count].clone()  # a replay overwrites its output buffer

    # -------------------------------------------------------------------------------- the stages

    def _decide_fn(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """The gate's hard decisions ``[B, Nc]`` (``[B, D]``) and the batch's packed rows (a 0-dim tensor)."""
        mask = self.model.gate_mask(images)
        tokens = self.model.tokens_per_image(mask, images=images)
        return mask, tokens.sum()

    def _forward_fn(self, capacity: int):
        model, budget = self.model, self.budget
        if budget is not None:
            return lambda images, mask: model(images, budget=budget)
        return lambda images, mask: model(images, mask=mask, capacity=capacity)

    def _pad(self, images: Tensor, count: int) -> Tensor:
        if count == self.batch_size:
            return images
        return torch.cat([images, images.new_zeros(self.batch_size - count, *images.shape[1:])])

    def _compile(self, options: dict) -> None:
        graphs = len(self.buckets) + (self.budget is None)
        notice = compile_notice(graphs, self.device, options.get("backend", "inductor"))
        warnings.warn(notice, CompileNotice, stacklevel=self._notice_frames)
        options = {"fullgraph": True, "dynamic": False, **options}
        self._decide = torch.compile(self._decide_fn, **options)
        # the capacity is a constant of each bucket's graph: dynamo guards on it and compiles one
        # graph per bucket (compile_packed keeps the buckets within dynamo's recompile limit)
        self._forwards = {c: torch.compile(self._forward_fn(c), **options) for c in self.buckets}

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        mask = None
        if self.budget is None:
            self._decide, (mask, _) = self._graph(lambda: self._decide_fn(self._images), pool)
        self._mask = mask  # the gate graph's mask: every bucket's graph reads it
        self._forwards = {}
        for capacity in self.buckets:
            if mask is not None:  # warm-up runs for real: give it a mask every bucket holds (all coarse);
                mask.zero_()  # replays read whatever the gate's graph wrote there
            forward = self._forward_fn(capacity)
            replay, _ = self._graph(lambda: forward(self._images, mask), pool)
            self._forwards[capacity] = lambda images, mask, replay=replay: replay(images)

    def _graph(self, fn, pool):
        """Warm ``fn`` up on a side stream, capture it, and return (replay(images) -> outputs, outputs)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()

        def replay(images):
            graph.replay()
            return outputs

        return replay, outputs

    def _check(self, images: Tensor) -> int:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
        count = images.shape[0]
        expected = (self.model.in_chans, *self.image_size)
        if tuple(images.shape[1:]) != expected or count > self.batch_size:
            raise ValueError(
                f"this runner was built for up to {self.batch_size} images of shape {list(expected)}, got "
                f"{list(images.shape)}; build another with msvit.compile_packed(model, batch_size, image_size)"
            )
        if images.device != self.device or images.dtype != self.dtype:
            raise TypeError(
                f"images are {images.dtype} on {images.device}; this runner takes {self.dtype} on {self.device}"
            )
        return count


class CompileNotice(UserWarning):
    """What ``mode="torch_compile"`` is about to cost: said once per runner, before the wait."""


# Measured for MSViT-S at batch 32 on 2 shared CPU cores with inductor (issue 29): 40-55 s per graph.
CPU_SECONDS_PER_GRAPH = (40, 55)


def compile_notice(graphs: int, device: torch.device, backend: str) -> str:
    """One line: torch.compile traces and compiles ``graphs`` graphs on their first calls, and roughly how long."""
    if device.type == "cpu" and backend == "inductor":
        low, high = CPU_SECONDS_PER_GRAPH
        cost = f"about {low}-{high} s each on a 2-core CPU (MSViT-S), so {graphs * low}-{graphs * high} s in all"
    else:
        cost = "from seconds to about a minute each, depending on the model, device and backend"
    return (
        f"compile_packed(mode='torch_compile'): the first call of each of {graphs} graphs (the gate's, when "
        f"there is no budget, and one per token bucket) compiles it with torch.compile ({backend}): {cost}; "
        "later calls run the compiled graphs"
    )


def check_bucket_count(capacities: List[int], mode: str) -> None:
    """At least one bucket, and no more than torch.compile compiles graphs per function."""
    if not capacities:
        raise ValueError("buckets must list at least one capacity")
    limit = torch._dynamo.config.recompile_limit
    if mode == "torch_compile" and len(capacities) > limit:
        raise ValueError(
            f"{len(capacities)} buckets exceed torch.compile's recompile limit ({limit} graphs per function): "
            "pass fewer buckets or raise torch._dynamo.config.recompile_limit"
        )
