"""``msvit visualize --model TIMM_NAME IMAGE...``: a timm ViT with APT's training-free entropy gate on
your own photos, each at its own aspect ratio.

The timm model is built with ``pretrained=False`` (random weights: nothing is downloaded) unless
``--pretrained FILE`` names its weights; the entropy gate has no weights, so its masks are the real
ones either way. Each photo is resized (never cropped) to the nearest size whose sides are
multiples of the coarsest patch (every region whole: the entropy gate measures whole regions),
keeping its aspect ratio, within ``--max-side`` and ``--max-tokens``, with a line per photo saying
how. The photos then run as lists of different sizes (native resolution,
docs/native_resolution.md): one packed forward per group of photos of at most ``LIST_TOKENS``
finest-scale tokens (greedy in argument order, ``TokenBudgetBatchSampler``).
"""

import math
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F

from msvit.data.native import TokenBudgetBatchSampler, image_tokens
from msvit.data.sample_images import normalize

MAX_SIDE = 1024  # px: a 4000x3000 phone photo becomes 1024x768 (3072 tokens of 16 px)
MAX_TOKENS = 4096  # finest-scale tokens of the resized photo: bounds the forward's memory and time
LIST_TOKENS = 4 * MAX_TOKENS  # finest-scale tokens of one packed forward (a photo over it runs alone)


def fitted_size(height: int, width: int, step: int, max_side: int, max_tokens: int, fine: int) -> Tuple[int, int]:
    """(h, w): multiples of ``step`` near ``height`` x ``width`` scaled down (never up) to fit
    ``max_side`` and ``max_tokens`` tokens of ``fine`` px, at least one step each; of the sides
    rounded down or up, the pair within the limits whose aspect ratio is closest to the photo's."""
    scale = min(1.0, max_side / max(height, width), math.sqrt(max_tokens * fine * fine / (height * width)))

    def sides(length: float) -> List[int]:
        return sorted({max(step, math.floor(length / step) * step), max(step, math.ceil(length / step) * step)})

    def fits(h: int, w: int) -> bool:
        return max(h, w) <= max_side and (h // fine) * (w // fine) <= max_tokens

    aspect = width / height
    candidates = [(h, w) for h in sides(height * scale) for w in sides(width * scale) if fits(h, w)]
    if not candidates:  # limits below one step: the smallest size there is
        return step, step
    return min(candidates, key=lambda hw: (abs(math.log(hw[1] / hw[0] / aspect)), -hw[0] * hw[1]))


def how_resized(name: str, height: int, width: int, size: Tuple[int, int], step: int, limited: bool) -> str:
    h, w = size
    if (h, w) == (height, width):
        return f"{name}: {width}x{height} px, used as it is (sides are multiples of {step} px)"
    why = f"sides rounded to multiples of {step} px, the coarsest patch"
    if limited:
        why = "scaled down to fit --max-side / --max-tokens, " + why
    return (
        f"{name}: {width}x{height} px resized to {w}x{h} px ({why}; aspect {width / height:.2f} -> {w / h:.2f}, "
        "nothing cropped)"
    )


def build_model(args):
    """The MSViT of ``--model`` with the entropy gate, and the timm model's preprocessing cfg."""
    import timm

    import msvit

    kwargs = {"pretrained": False}
    if args.pretrained:
        if not Path(args.pretrained).is_file():
            raise SystemExit(f"msvit visualize: --pretrained {args.pretrained}: no such file")
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(args.pretrained)}}
    try:
        vit = timm.create_model(args.model, **kwargs)
    except Exception as error:  # timm raises many types for an unknown name or an unreadable file
        what = f"--pretrained {args.pretrained} as its weights" if args.pretrained else "it"
        raise SystemExit(
            f"msvit visualize: --model {args.model}: cannot build {what} ({type(error).__name__}: {str(error)[:300]})"
        ) from None
    options = {"gate": "entropy"}
    if args.entropy_threshold:
        options["entropy_thresholds"] = tuple(args.entropy_threshold)
    if args.scales:
        options["scales"] = tuple(args.scales)
    try:
        model = msvit.from_timm(vit, **options)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise SystemExit(f"msvit visualize: --model {args.model}: {error}") from None
    return model.eval().to(args.device)


def read_photo(path: Path, read_array) -> torch.Tensor:
    """float ``[3, H, W]`` in [0, 1] at the file's own size."""
    import numpy as np

    array = read_array(path)
    image = torch.from_numpy(np.asarray(array, dtype=np.float32) / (1.0 if array.dtype == bool else 255.0))
    image = image[..., None].expand(-1, -1, 3) if image.dim() == 2 else image[..., :3]
    return image.permute(2, 0, 1).contiguous()


def resize(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def top_class(model, logits: torch.Tensor) -> str:
    """'top-1: <class>' from the timm model's label names, or ImageNet's descriptions for 1000 classes."""
    index = int(logits.argmax())
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names:
        return f"top-1: {names[index]}"
    if logits.numel() == 1000:
        from timm.data import ImageNetInfo

        return f"top-1: {ImageNetInfo().index_to_description(index)} ({index})"
    return f"top-1: class {index}"


@torch.no_grad()
def run(args, paths: List[Path], stems: List[str], read_array, fine_percent) -> Tuple[list, list, list, object]:
    """(photos, masks, titles, model): every photo at its own size, in lists of different sizes."""
    model = build_model(args)
    cfg = model.pretrained_cfg
    tok = model.tokenizer
    step = tok.patch_sizes[-1] if tok.scales > 2 else tok.coarse_patch
    fine = tok.fine_patch
    print(
        f"MSViT from {args.model} ({'weights ' + str(args.pretrained) if args.pretrained else 'random weights'}), "
        f"entropy gate {model.gate.from_timm_kwargs()['entropy_thresholds']} bits, patch sizes "
        f"{list(tok.patch_sizes) if tok.scales > 2 else [fine, tok.coarse_patch]}"
    )
    photos = []
    for path in paths:
        photo = read_photo(path, read_array)
        height, width = photo.shape[-2:]
        size = fitted_size(height, width, step, args.max_side, args.max_tokens, fine)
        unlimited = fitted_size(height, width, step, 10**9, 10**12, fine)
        print(how_resized(path.name, height, width, size, step, size != unlimited))
        photos.append(resize(photo, size))
    tokens = image_tokens([photo.shape[-2:] for photo in photos], fine)
    groups = TokenBudgetBatchSampler(tokens, max(LIST_TOKENS, *tokens), shuffle=False, num_replicas=1, rank=0)
    masks, titles = [], []
    for group in groups:
        images = [normalize(photos[i][None].to(args.device), cfg["mean"], cfg["std"])[0] for i in group]
        output = model(images, budget=args.budget, return_gate=True)  # the gate decides inside the forward
        decisions = output.gate.hard.split(model.batch_of(images).decisions)
        for b, i in enumerate(group):
            every = tok.num_prefix + tokens[i]
            share = fine_percent(model, decisions[b][None], images[b][None])
            title = f"{stems[i]}: {int(output.tokens[b])} of {every} tokens, {share:.0%} fine"
            print(f"  {title}" + (f"; {top_class(model, output.logits[b])}" if args.pretrained else ""))
            masks.append(decisions[b].cpu())
            titles.append(title)
    return photos, masks, titles, model
