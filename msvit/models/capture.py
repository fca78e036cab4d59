"""``msvit.compile_packed``: a captured or compiled packed forward, of a ``[B, C, H, W]`` batch
(``packed_runner.PackedRunner``, docs/design.md section 9) or of lists of images of different
sizes (``list_runner.ListRunner``, section 19). Its own module so that the two runners, one
built on the other, import in one direction."""

from typing import Optional, Sequence, Union

from msvit.models.checks import check_batch_size, check_image_size
from msvit.models.gate import Budget
from msvit.models.list_runner import list_runner
from msvit.models.mixed_scale_vit import MSViT
from msvit.models.packed_runner import MODES, PackedRunner, check_bucket_count, default_buckets


def compile_packed(
    model: MSViT,
    batch_size: int,
    image_size: Union[int, Sequence[int], None] = None,
    *,
    max_pixels: Optional[int] = None,
    budget: Budget = None,
    buckets: Optional[Sequence[int]] = None,
    mode: str = "cuda_graphs",
    compile_options: Optional[dict] = None,
) -> PackedRunner:
    """A ``PackedRunner``: ``runner(images)`` gives ``model(images, budget=budget)``'s logits from a
    static, captured (``cuda_graphs``) or compiled (``torch_compile``) packed forward.

    Args:
        model: an ``MSViT`` in eval mode (inference only; training stays eager).
        batch_size: the largest batch the runner takes (smaller ones are padded with zero images).
        image_size: ``H`` or ``(H, W)`` of every batch.
        max_pixels: instead of ``image_size``, serve lists of ``[C, H_b, W_b]`` images of any
            sizes with at most ``batch_size`` images and ``sum H_b * W_b <= max_pixels``
            (a ``ListRunner``, docs/design.md section 19): one graph per bucket for every mix.
        budget: fine regions per image (int) or fraction (float): one bucket, no host read.
        buckets: capacities in packed rows (default: room for 25/50/75/100% fine regions; for
            lists, of the finest patches ``max_pixels`` holds); a batch runs in the smallest that
            holds it, eagerly when none does. Not with a budget, except for lists (whose total
            then follows the size mix; the bucket is chosen on the host).
        mode: ``"cuda_graphs"`` (CUDA only), ``"torch_compile"`` (any device) or ``"eager"``.
        compile_options: extra keywords for ``torch.compile`` (e.g. ``{"backend": "aot_eager"}``).
    """
    if not isinstance(model, MSViT):
        raise TypeError(f"compile_packed takes an msvit.MSViT, got {type(model).__name__}")
    if model.training:
        raise ValueError("compile_packed runs inference: call model.eval() first (training stays eager)")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(map(repr, MODES))}")
    device = next(model.parameters()).device
    if mode == "cuda_graphs" and device.type != "cuda":
        raise RuntimeError(f"mode='cuda_graphs' needs the model on a CUDA device, not {device}; use 'torch_compile'")
    batch_size = check_batch_size(batch_size, 1)
    if buckets is not None and not isinstance(buckets, (list, tuple, range)):
        raise TypeError(f"buckets must be a list of capacities (packed rows per batch), got {buckets!r}")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise TypeError(f"compile_options must be a dict of torch.compile keywords, got {compile_options!r}")
    options = dict(compile_options or {})
    if max_pixels is not None or image_size is None:
        return list_runner(model, batch_size, image_size, max_pixels, budget, buckets, mode, options)
    size = check_image_size(image_size, model.tokenizer.fine_patch, model.tokenizer.patch_sizes[-1])
    if budget is not None:
        if buckets is not None:
            raise ValueError("with a budget every batch has the same token count: leave buckets=None")
        capacities = [model.static_shape(batch_size, size, budget=budget).capacity]
    else:
        requested = default_buckets(model, batch_size, size) if buckets is None else list(buckets)
        capacities = sorted({model.static_shape(batch_size, size, capacity=c).capacity for c in requested})
        check_bucket_count(capacities, mode)
    return PackedRunner(model, batch_size, size, budget, capacities, mode, options)
