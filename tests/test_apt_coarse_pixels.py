"""``coarse_pixels="apt"``: coarser patches brought down to the fine size as APT's released code
does it (``PatchTokenizer.construct_patch_groups``: ``F.interpolate(images, scale_factor=0.5 ** i,
mode="bilinear")`` then 16 px patches of the resized image; docs/design.md section 15), against
hand-computed pixels and APT's rule re-implemented from its code."""

import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import msvit
from msvit.io.checkpoint import CONFIG, load_checkpoint, save_checkpoint
from msvit_kernels.reference import area_pool, downsample, pack_reference, scale_patches

from helpers import TINY_MODEL, redraw_parameters, rel_err


def test_quarter_scale_is_the_mean_of_each_blocks_centre_2x2():
    """Bilinear at 1/4 (align_corners=False) samples at 4i + 1.5: half of pixel 4i+1, half of 4i+2
    on each axis; counted by hand on a 4x4 block, then on every block of an 8x12 image."""
    block = torch.arange(16.0).view(1, 1, 4, 4)  # centre 2x2: 5, 6, 9, 10
    assert downsample(block, 4, "apt").item() == (5 + 6 + 9 + 10) / 4
    assert area_pool(block, 4).item() == sum(range(16)) / 16
    image = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    centre = (image[..., 1::4, 1::4] + image[..., 1::4, 2::4] + image[..., 2::4, 1::4] + image[..., 2::4, 2::4]) / 4
    assert torch.allclose(downsample(image, 4, "apt"), centre, atol=1e-6)
    assert not torch.allclose(downsample(image, 4, "area"), centre, atol=1e-3)
    # at 1/2 both rules are the 2x2 mean, up to rounding
    assert torch.allclose(downsample(image, 2, "apt"), area_pool(image, 2), atol=1e-6)


def apt_resized_patches(images: torch.Tensor, base_patch: int, idx: int) -> torch.Tensor:
    """APT's ``construct_patch_groups`` for scale index ``idx``, as its code calls it:
    ``F.interpolate(images, scale_factor=0.5 ** idx, mode="bilinear")``, then
    ``rearrange("b c (h p1) (w p2) -> b h w c p1 p2")``; flattened to ``[B, h*w, C*p*p]``."""
    scale_img = F.interpolate(images, scale_factor=0.5**idx, mode="bilinear") if idx > 0 else images
    b, c, h, w = scale_img.shape
    p = base_patch
    patches = scale_img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


@pytest.mark.parametrize("idx", [1, 2, 3])
def test_patches_equal_apts_construct_patch_groups_bit_for_bit(idx):
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(idx))
    ours = scale_patches(images, 16, 2**idx, "apt")
    assert torch.equal(ours, apt_resized_patches(images, 16, idx))
    if idx > 1:  # the area average differs from APT's at 64 px and beyond
        assert not torch.allclose(scale_patches(images, 16, 2**idx), ours, atol=1e-3)


def tiny_three_scale(coarse_pixels: str, **kwargs):
    vit = redraw_parameters(VisionTransformer(img_size=64, patch_size=8, embed_dim=24, depth=2, num_heads=2))
    return msvit.from_timm(vit, scales=(8, 16, 32), coarse_pixels=coarse_pixels, **kwargs).eval()


def all_coarsest(model, images):
    """The ``[B, D]`` split decisions that keep every 32 px node whole."""
    return torch.zeros_like(model.gate_mask(images))


def test_model_uses_apts_pixels_for_its_coarsest_tokens():
    """All-coarsest forwards: an image constant on every 4x4 block gives both rules the same
    pixels (equal logits); a random image gives them different ones (the option reaches the
    tokens); packed equals dense-masked under the APT rule."""
    apt, area = tiny_three_scale("apt"), tiny_three_scale("area")
    area.load_state_dict(apt.state_dict())
    generator = torch.Generator().manual_seed(1)
    blocky = torch.randn(2, 3, 16, 16, generator=generator).repeat_interleave(4, 2).repeat_interleave(4, 3)
    noisy = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        mask = all_coarsest(apt, blocky)
        assert rel_err(apt(blocky, mask=mask), area(blocky, mask=mask)) <= 1e-5
        assert rel_err(apt(noisy, mask=mask), area(noisy, mask=mask)) > 1e-3
        random = torch.rand(mask.shape, generator=generator) > 0.5
        assert rel_err(apt(noisy, mask=random, mode="masked"), apt(noisy, mask=random)) <= 1e-5


def test_a_list_of_images_equals_each_image_alone():
    model = tiny_three_scale("apt")
    generator = torch.Generator().manual_seed(2)
    images = [torch.randn(3, 64, 96, generator=generator), torch.randn(3, 32, 64, generator=generator)]
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(image[None]) for image in images])
    assert rel_err(together, alone) <= 1e-5


def test_triton_kernels_are_declined_by_name_and_the_torch_path_runs():
    model = tiny_three_scale("apt")
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
        model.kernels = "triton"
        with pytest.warns(UserWarning, match="coarse_pixels='apt'"):
            got = model(images)
    assert torch.equal(got, expected)


def test_recorded_in_the_checkpoint_and_rebuilt(tmp_path):
    config = {
        "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 64}},
        "msvit": {},
    }
    kwargs = config["timm"]["kwargs"]
    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=kwargs, scales=(8, 16, 32), coarse_pixels="apt")
    save_checkpoint(tmp_path, model, config)
    assert json.loads((tmp_path / CONFIG).read_text())["architecture"]["coarse_pixels"] == "apt"
    loaded = load_checkpoint(tmp_path).eval()
    assert loaded.tokenizer.coarse_pixels == "apt"
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(images), model.eval()(images))


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match="unknown coarse_pixels 'bicubic'"):
        tiny_three_scale("bicubic")
    with pytest.raises(NotImplementedError, match="coarse_pixels applies to ViT models"):
        msvit.from_timm("swin_tiny_patch4_window7_224", coarse_pixels="apt")
    with pytest.raises(ValueError, match="coarse_pixels"):
        downsample(torch.zeros(1, 1, 4, 4), 2, "nearest")
    model = tiny_three_scale("apt")
    with pytest.raises(ValueError, match="flat pixel buffer"):
        index = None  # refused before the index is read
        pack_reference(
            torch.zeros(48),
            index,
            torch.zeros(4, 192),
            None,
            None,
            None,
            None,
            8,
            2,
            node_pixels=torch.zeros(4, 1, dtype=torch.long),
            coarse_pixels="apt",
        )
    two_scale = msvit.from_timm(
        redraw_parameters(VisionTransformer(img_size=64, patch_size=8, embed_dim=24, depth=1, num_heads=2)),
        coarse_pixels="apt",
    ).eval()
    with pytest.raises(NotImplementedError, match="coarse_pixels='apt'"):
        msvit.compile_packed(two_scale, 2, max_pixels=64 * 64 * 2, budget=0.5, mode="eager")
    assert model.tokenizer.coarse_pixels == "apt"


def test_coarse_pos_is_refused_where_there_is_no_position_table():
    """Before, ``coarse_pos="apt"`` on a model without an absolute position table did nothing."""
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=24, depth=1, num_heads=2, pos_embed="none")
    with pytest.raises(ValueError, match="has none"):
        msvit.from_timm(vit, coarse_pos="apt")
    assert msvit.from_timm(vit).tokenizer.pos_embed is None


def test_a_nan_in_one_image_leaves_the_others_bit_equal():
    """APT's resize runs image by image: a NaN pixel reaches only its own image's tokens. The pixel
    is one the resize samples (row 37, column 10: the centre 2x2 of its 4x4 block); one it skips,
    such as column 11, reaches no coarse token at all."""
    model = tiny_three_scale("apt")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        clean = model(images)
        images[1, 0, 37, 10] = float("nan")
        poisoned = model(images)
    assert poisoned[1].isnan().any()
    assert torch.equal(poisoned[0], clean[0]) and torch.equal(poisoned[2], clean[2])
