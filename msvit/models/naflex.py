"""timm's ``NaFlexVit`` as an MSViT: its embedding module (``embeds``) converted.

NaFlexViT's patch embedding is a linear layer on patches flattened in (ph, pw, C) order (its
``patchify_channels_last``) or in (C, ph, pw) order, or a conv; MSViT's shared embedding takes
(C, p, p), so the weight's columns are permuted. Its position embedding (``learned``: a
``[1, gh, gw, d]`` grid; ``factorized``: per-row and per-column tables) is stored at its own grid
and resampled by timm at every forward to the image's grid (bicubic with antialias by default).
The converted tokenizer keeps timm's tables and timm's rule (``NaFlexGridPositions``, the
tokenizer's ``grid_positions``): the fine table of every image grid is timm's own resampling
(cached per grid), so the all-fine MSViT equals NaFlexViT at every image size, for a batch and for
each image of a list of images of different sizes. The prefix tokens (cls, registers) take no
position (``no_embed_class``). ``img_size`` only sets the grid the model is built for (the
gate's grid and the default input size). The trunk (blocks, norms, head, ``map`` pooling) is
converted as for a ViT.
"""

import copy
from typing import Sequence, Tuple, Union

import torch
from torch import nn

from msvit.models.checks import check_image_size
from msvit.models.timm_parts import EmbedParts, conv_as_linear


def is_naflexvit(model: nn.Module) -> bool:
    from timm.models.naflexvit import NaFlexVit

    return isinstance(model, NaFlexVit)


def _linear_embedding(embeds: nn.Module) -> nn.Linear:
    """NaFlexEmbeds' projection as a linear embedding of (C, p, p)-flattened patches."""
    if not embeds.is_linear:
        return conv_as_linear(embeds.proj)
    if embeds.norm_input is not None:
        raise NotImplementedError(
            "NaFlexViT's input_norm_layer (a norm over each patch's raw pixels) is not supported: MSViT embeds "
            "area-averaged coarse patches with the same linear layer and has no per-patch pixel norm"
        )
    ph, pw = embeds.patch_size
    if ph != pw:
        raise NotImplementedError(f"the patch must be square, got {ph}x{pw}")
    proj, c = embeds.proj, embeds.in_chans
    embed = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None)
    embed = embed.to(device=proj.weight.device, dtype=proj.weight.dtype)
    weight = proj.weight.detach()
    if embeds.channels_last:  # columns in (ph, pw, C) order -> (C, ph, pw)
        weight = weight.reshape(-1, ph, pw, c).permute(0, 3, 1, 2).reshape(proj.out_features, -1)
    with torch.no_grad():
        embed.weight.copy_(weight)
        if proj.bias is not None:
            embed.bias.copy_(proj.bias)
    return embed


# what timm's position methods read besides the tables
POSITION_SETTINGS = (
    "pos_embed_interp_mode",
    "pos_embed_ar_preserving",
    "pos_embed_antialias",
    "pos_embed_align_corners",
)


class NaFlexGridPositions(nn.Module):
    """The fine position table ``[h*w, d]`` of any patch grid, by NaFlexViT's own code: its
    ``_apply_learned_pos_embed`` / ``_apply_factorized_pos_embed`` (what it adds to a
    ``[B, C, H, W]`` batch at that grid) run on a copy of its tables and interpolation settings."""

    def __init__(self, embeds: nn.Module):
        super().__init__()
        self.kind = embeds.pos_embed_type
        if self.kind not in ("learned", "factorized"):
            raise NotImplementedError(f"NaFlexViT pos_embed={self.kind!r} is not supported")
        self.embed_dim = embeds.embed_dim
        for name in POSITION_SETTINGS:
            setattr(self, name, getattr(embeds, name))
        for name in ("pos_embed",) if self.kind == "learned" else ("pos_embed_y", "pos_embed_x"):
            self.register_parameter(name, nn.Parameter(getattr(embeds, name).detach().clone()))

    def forward(self, fine_grid: Tuple[int, int]) -> torch.Tensor:
        from timm.models.naflexvit import NaFlexEmbeds

        ref = self.pos_embed if self.kind == "learned" else self.pos_embed_y
        table = ref.new_zeros(1, fine_grid[0] * fine_grid[1], self.embed_dim)
        learned = self.kind == "learned"
        apply = NaFlexEmbeds._apply_learned_pos_embed if learned else NaFlexEmbeds._apply_factorized_pos_embed
        apply(self, table, grid_size=list(fine_grid))  # timm's method reads only the attributes copied here
        return table[0]


def _image_grid(model: nn.Module, patch: int, img_size) -> Tuple[int, int]:
    """The fine grid the model is converted for: ``img_size``, else the model's default image size
    (timm keeps it only when ``pos_embed_grid_size`` is None), else its pretrained_cfg's input size."""
    if img_size is None:
        img_size = model.embeds.default_img_size
    if img_size is None:
        img_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,) * 3)[1:]
        if None in img_size:
            img_size = [n * patch for n in model.embeds.pos_embed_grid_size]
    h, w = check_image_size(img_size, patch, patch, "img_size")
    return h // patch, w // patch


def naflex_parts(model: nn.Module, img_size: Union[int, Sequence[int], None] = None) -> EmbedParts:
    """The embedding parts of a ``NaFlexVit`` for images of ``img_size`` (see the module docstring)."""
    embeds = model.embeds
    if model.rope is not None:
        raise NotImplementedError("NaFlexViT with rotary position embeddings (rope_type) is not supported")
    if embeds.dynamic_img_pad:
        raise NotImplementedError("dynamic_img_pad is not supported: MSViT images must be multiples of the patch size")
    embed = _linear_embedding(embeds)
    patch = embeds.patch_size[0]
    grid = _image_grid(model, patch, img_size)
    prefix = [t for t in (embeds.cls_token, embeds.reg_token) if t is not None]
    return EmbedParts(
        embed,
        patch,
        grid,
        None,
        torch.cat(prefix, 1).detach().clone() if prefix else None,
        True,  # NaFlexViT's position embedding covers the patches only
        copy.deepcopy(embeds.norm),
        nn.Sequential(copy.deepcopy(embeds.pos_drop), copy.deepcopy(model.norm_pre)),
        None if embeds.pos_embed_type == "none" else NaFlexGridPositions(embeds),
    )
