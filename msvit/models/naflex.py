"""timm's ``NaFlexVit`` as an MSViT: its embedding module (``embeds``) converted for fixed-size images.

NaFlexViT's patch embedding is a linear layer on patches flattened in (ph, pw, C) order (its
``patchify_channels_last``) or in (C, ph, pw) order, or a conv; MSViT's shared embedding takes
(C, p, p), so the weight's columns are permuted. Its position embedding (``learned``: a
``[1, gh, gw, d]`` grid; ``factorized``: per-row and per-column tables) is stored at its own grid
and resampled by timm at every forward to the image's grid (bicubic with antialias by default).
MSViT keeps one table at one fine grid, so the conversion evaluates timm's own resampling once, at
the grid of the image size the model is converted for; the prefix tokens (cls, registers) take no
position (``no_embed_class``). At that image size the all-fine MSViT equals NaFlexViT's output
on the same images; other sizes resample the converted table (MSViT's bilinear rule), not timm's.
The trunk (blocks, norms, head, ``map`` pooling) is converted as for a ViT.
"""

import copy
from typing import Optional, Sequence, Tuple, Union

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


def naflex_position_table(embeds: nn.Module, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
    """``[1, h*w, d]``: the position embedding NaFlexViT adds to the patches of an image whose
    patch grid is ``grid``, computed by timm's own code (``_apply_*_pos_embed``); None without one."""
    kind = embeds.pos_embed_type
    if kind == "none":
        return None
    weight = embeds.proj.weight
    table = torch.zeros(1, grid[0] * grid[1], embeds.embed_dim, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():  # the methods add in place; the table becomes the MSViT's own parameter
        if kind == "learned":
            embeds._apply_learned_pos_embed(table, grid_size=list(grid))
        elif kind == "factorized":
            embeds._apply_factorized_pos_embed(table, grid_size=list(grid))
        else:
            raise NotImplementedError(f"NaFlexViT pos_embed={kind!r} is not supported")
    return table


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
        naflex_position_table(embeds, grid),
        torch.cat(prefix, 1).detach().clone() if prefix else None,
        True,  # NaFlexViT's position embedding covers the patches only
        copy.deepcopy(embeds.norm),
        nn.Sequential(copy.deepcopy(embeds.pos_drop), copy.deepcopy(model.norm_pre)),
    )
