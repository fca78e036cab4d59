"""Token-for-token parity of the entropy gate with APT's released code (github.com/rccchoudhury/apt,
docs/design.md section 15): hand-counted histograms, entropies exactly at a threshold, pixels at
255, and APT's own selection, re-implemented here from its code with ``torch.histc``, giving the
same tokens as the package on the bundled photos at 384 and 512 px, two and three scales.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms import functional as TF

import msvit
from msvit.data import IMAGENET_MEAN, IMAGENET_STD, sample_photos
from msvit.models.entropy_gate import EntropyGate
from msvit.models.tree_gate import TreeGate
from msvit_kernels.entropy_kernel import patch_entropy
from msvit_kernels.reference import entropy_bins_reference, entropy_reference

from helpers import DEVICE, needs_triton, rel_err

# ---- APT's rule, from its code (src/models/entropy_utils.py, src/data/transforms.py) ------------


def apt_entropy_maps(images255: torch.Tensor, patch: int, num_scales: int) -> dict:
    """APT's ``compute_patch_entropy_vectorized``, image by image, as its dataset calls it on
    ``to_tensor(pil) * 255``: grey ``0.2989 r + 0.5870 g + 0.1140 b``, zero padding to whole patches,
    ``torch.histc(bins=512, min=0, max=255)`` per patch, ``-sum(p * log2(p + 1e-10))``, and 1e6 on
    the padded last row and column. Returns ``{patch size: [B, h, w]}``."""
    maps = {}
    for image in images255:
        grey = 0.2989 * image[0] + 0.5870 * image[1] + 0.1140 * image[2] if image.shape[0] == 3 else image[0]
        height, width = grey.shape
        for i, ps in enumerate([patch * 2**i for i in range(num_scales)]):
            rows, cols = (height + ps - 1) // ps, (width + ps - 1) // ps
            if i == 0:  # APT's selection reads only the shape of the finest map: skip its 1000 histc calls
                maps.setdefault(ps, []).append(torch.zeros(rows, cols))
                continue
            pad_h, pad_w = rows * ps - height, cols * ps - width
            padded = F.pad(grey, (0, pad_w, 0, pad_h), mode="constant", value=0)
            patches = padded.unfold(0, ps, ps).unfold(1, ps, ps).reshape(rows * cols, -1)
            histograms = torch.stack([torch.histc(p, bins=512, min=0, max=255) for p in patches])
            probabilities = histograms / (ps * ps)
            entropy = -torch.sum(probabilities * torch.log2(probabilities + 1e-10), dim=1).reshape(rows, cols)
            if pad_h > 0:
                entropy[-1, :] = 1e6
            if pad_w > 0:
                entropy[:, -1] = 1e6
            maps.setdefault(ps, []).append(entropy)
    return {ps: torch.stack(m) for ps, m in maps.items()}


def apt_select(entropy_maps: dict, thresholds) -> dict:
    """APT's ``select_patches_by_threshold``: ``{patch size: [B, h, w]}`` 0/1, 1 = that patch is a token."""
    sizes = sorted(entropy_maps)
    masks = {sizes[0]: torch.ones_like(entropy_maps[sizes[0]])}
    for i in range(len(sizes) - 1, 0, -1):
        masks[sizes[i]] = (entropy_maps[sizes[i]] < thresholds[i - 1]).float()
    for i in range(len(sizes) - 1, 0, -1):
        for j in range(i):
            factor = sizes[i] // sizes[j]
            up = masks[sizes[i]].repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
            h, w = entropy_maps[sizes[j]].shape[1:]
            masks[sizes[j]] = masks[sizes[j]] * (1 - up[:, :h, :w])
    return masks


def eight_bit_photos(size: int) -> torch.Tensor:
    """The bundled photos as the 8-bit images APT's dataset reads: uint8 ``[8, H, W, 3]``."""
    return (sample_photos(size)[1] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def apt_inputs(photos8: torch.Tensor):
    """(APT's entropy input ``to_tensor(pil) * 255``, the normalised model input APT's
    ``post_transform`` gives: ``Normalize(to_tensor(pil))``), from uint8 photos."""
    tensors = torch.stack([TF.to_tensor(p.numpy()) for p in photos8])
    return tensors * 255.0, TF.normalize(tensors, IMAGENET_MEAN, IMAGENET_STD)


def entropy_vit(size: int, scales, thresholds, **kwargs):
    vit = VisionTransformer(img_size=size, patch_size=16, embed_dim=24, depth=1, num_heads=2, num_classes=3)
    return msvit.from_timm(
        vit, gate="entropy", scales=scales, entropy_thresholds=thresholds, kernels="reference", **kwargs
    ).eval()


def package_tokens(model, mask: torch.Tensor, images: torch.Tensor) -> dict:
    """``{patch size: [B, h, w]}`` bool: which nodes of each scale are tokens under ``mask``."""
    tok = model.tokenizer
    fine_grid = tok.grids(images)[0]
    if tok.scales == 2:
        coarse = ~mask
        return {32: coarse.view(-1, fine_grid[0] // 2, fine_grid[1] // 2), 16: None}
    tree = tok.tree(fine_grid)
    return {tok.patch_sizes[s]: w.view(-1, *tree.grids[s]) for s, w in enumerate(tree.token_weights(mask)) if s > 0}


PARITY_PHOTOS = [0, 2, 3]  # astronaut, chelsea, rocket: in each setting one of them drifts under the old binning


@pytest.mark.parametrize("size", [384, 512])
@pytest.mark.parametrize("scales, thresholds", [((16, 32), (5.5,)), ((16, 32, 64), (6.0, 4.0))])
def test_apt_thresholds_keep_apts_tokens_on_the_bundled_photos(size, scales, thresholds):
    images255, normalised = apt_inputs(eight_bit_photos(size)[PARITY_PHOTOS])
    apt = apt_select(apt_entropy_maps(images255, 16, len(scales)), thresholds)
    apt_tokens = 1 + sum(m.flatten(1).sum(1) for m in apt.values()).long()
    model = entropy_vit(size, scales, thresholds)
    mask = model.gate_mask(normalised)
    assert torch.equal(model.tokens_per_image(mask, images=normalised), apt_tokens)
    for ps, tokens in package_tokens(model, mask, normalised).items():
        if tokens is not None:
            assert torch.equal(tokens, apt[ps].bool()), f"{ps} px tokens differ from APT's"
    assert (apt_tokens > 1 + (size // 16) ** 2 // 4 ** (len(scales) - 1)).all()  # the photos split somewhere
    # the binning the package had before keeps other tokens on some photo: this test can tell them apart
    before = entropy_vit(size, scales, thresholds, entropy_binning="continuous")
    assert not torch.equal(before.tokens_per_image(before.gate_mask(normalised), images=normalised), apt_tokens)


# ---- hand-computed histograms ------------------------------------------------------------------


def grey_cell(values, counts, side=16) -> torch.Tensor:
    """A one-channel ``[1, 1, side, side]`` image in [0, 1]: ``counts[i]`` pixels of 8-bit level
    ``values[i]`` (x = level / 255), in raster order."""
    pixels = torch.cat([torch.full((c,), v / 255.0) for v, c in zip(values, counts)])
    assert pixels.numel() == side * side
    return pixels.view(1, 1, side, side)


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
def test_a_histogram_counted_by_hand(kernels):
    """128 pixels at level 0 (bin 0), 64 at 100 (bin trunc(100 * 512 / 255) = 200) and 64 at 255
    (bin trunc(512) = 512, which histc puts in the last bin, 511): p = 1/2, 1/4, 1/4, H = 1.5 bits."""
    image = grey_cell([0, 100, 255], [128, 64, 64]).to(DEVICE)
    levels = entropy_bins_reference(image, bins=512)
    assert levels.unique().tolist() == [0, 200, 511]
    assert torch.equal(
        torch.histc(image.flatten() * 255, 512, 0, 255), torch.bincount(levels.flatten(), minlength=512).float()
    )
    entropy = entropy_of(image, 16, kernels)
    assert entropy.tolist() == [[1.5]]


def entropy_of(images, patch, kernels, **options):
    if kernels == "triton":
        return patch_entropy(images, patch, **options).entropy
    return entropy_reference(
        images, patch, options.get("mean"), options.get("std"), options.get("bins", 512), options.get("binning", "apt")
    )


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
def test_eight_bit_rounding_and_the_bins_differ_from_the_continuous_binning(kernels):
    """Half the pixels at intensity 99.6, half at 100.4 (of 255): APT's input is 8-bit, both are
    level 100, one bin: 0 bits. The continuous binning puts them in half-level bins 199 and 200: 1
    bit. A pixel at 255 is APT's last bin (511) and the continuous binning's bin 510."""
    half = torch.full((128,), 99.6 / 255.0), torch.full((128,), 100.4 / 255.0)
    image = torch.cat(half).view(1, 1, 16, 16).to(DEVICE)
    assert entropy_of(image, 16, kernels).tolist() == [[0.0]]
    assert entropy_of(image, 16, kernels, binning="continuous").tolist() == [[1.0]]
    white = torch.ones(1, 1, 16, 16, device=DEVICE)
    assert entropy_bins_reference(white).unique().tolist() == [511]
    assert entropy_bins_reference(white, binning="continuous").unique().tolist() == [510]
    rgb_white = torch.ones(1, 3, 16, 16)  # grey 0.9999 * 255 = 254.97: bin 511 without the edge rule
    assert entropy_bins_reference(rgb_white).unique().tolist() == [511]


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
def test_an_entropy_exactly_at_the_threshold_splits(kernels):
    """16 levels, 16 pixels each: H = 4 bits exactly. APT keeps a patch whole when H < tau, so at
    tau = 4.0 it splits (the package's rule before: only when H > tau); +-1e-6 either side decides
    as expected, two scales (gate) and three (the 4.0 of APT's (6.0, 4.0) at the coarsest level)."""
    image = grey_cell(range(0, 256, 16), [16] * 16).to(DEVICE)
    assert entropy_of(image, 16, kernels).tolist() == [[4.0]]
    for tau, fine in ((4.0, True), (4.0 - 1e-6, True), (4.0 + 1e-6, False)):
        gate = EntropyGate(16, (1, 1), (tau,), mean=(0.0,), std=(1.0,), in_chans=1)
        gate.kernels = kernels
        assert gate.decide(image).hard.tolist() == [[fine]]
    old = EntropyGate(16, (1, 1), (4.0,), mean=(0.0,), std=(1.0,), in_chans=1, binning="continuous")
    old.kernels = kernels
    assert old.decide(image).hard.tolist() == [[False]]
    # three scales of 4/8/16 px: the 16 px node at H = 4.0 exactly against the coarsest threshold
    tree = TreeGate.entropy(4, 2, 3, (4, 4), (9.0, 4.0), mean=(0.0,), std=(1.0,), in_chans=1)
    tree.kernels = kernels
    assert tree.decide(image).hard[0, 0].item() is True


@needs_triton
@pytest.mark.parametrize("binning", ["apt", "continuous"])
@pytest.mark.parametrize("budget", [None, 4])
def test_the_kernel_decides_as_the_reference_at_two_and_three_scales(binning, budget):
    """Odd sizes (96x160 and 80x112: border cells and nodes at every scale), grey and RGB photos."""
    photos = sample_photos((96, 160))[1][[0, 6, 7]]  # astronaut, coins, camera
    images = TF.normalize(photos, IMAGENET_MEAN, IMAGENET_STD).to(DEVICE)
    options = {"binning": binning}
    for x, gates in (
        (
            images,
            [EntropyGate(32, (3, 5), (6.0,), **options), TreeGate.entropy(16, 2, 3, (6, 10), (6.0, 4.0), **options)],
        ),
        (images[..., :80, :112], [TreeGate.entropy(8, 2, 3, (10, 14), (5.0, 4.5), **options)]),
    ):
        for gate in gates:
            gate.kernels = "reference"
            expected = gate.decide(x, budget=budget)
            gate.kernels = "triton"
            got = gate.decide(x, budget=budget)
            assert (got.logits - expected.logits).abs().max() <= 1e-5
            assert torch.equal(got.hard, expected.hard)


# ---- non-finite pixels (issue 26 item 4) ---------------------------------------------------------


def photos_with_a_nan(size=(96, 160)) -> torch.Tensor:
    images = TF.normalize(sample_photos(size)[1][[0, 3, 7]], IMAGENET_MEAN, IMAGENET_STD).to(DEVICE)
    images[1, 2, 40, 70] = math.nan  # image 1, blue channel: the 16 px cell (2, 4), 32 px (1, 2), 64 px (0, 1)
    images[2, 0, 5, 5] = math.inf  # image 2: the 16 px cell (0, 0)
    return images


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("binning", ["apt", "continuous"])
def test_a_non_finite_pixel_makes_its_cells_entropy_infinite_and_nothing_else(kernels, binning):
    images = photos_with_a_nan()
    clean = images.clone()
    clean[1, 2, 40, 70], clean[2, 0, 5, 5] = 0.0, 0.0
    options = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "binning": binning}
    for patch, bad in ((16, [(1, 2 * 10 + 4), (2, 0)]), (32, [(1, 1 * 5 + 2), (2, 0)])):
        entropy, expected = entropy_of(images, patch, kernels, **options), entropy_of(clean, patch, kernels, **options)
        for b, cell in bad:
            assert entropy[b, cell] == math.inf
            expected[b, cell] = math.inf
        assert torch.equal(entropy, expected)


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("budget", [None, 3])
def test_a_non_finite_region_stays_fine_at_every_scale_and_other_images_keep_their_decisions(kernels, budget):
    """Two scales (the 32 px region of the NaN is fine, first in a budget) and three (16/32/64 px: the
    NaN's 64 px and 32 px nodes split, down to its 16 px cell); the clean image decides as alone."""
    images = photos_with_a_nan()
    for gate in (
        EntropyGate(32, (3, 5), (6.0,)),
        TreeGate.entropy(16, 2, 3, (6, 10), (6.0, 4.0)),
    ):
        gate.kernels = kernels
        hard = gate.decide(images, budget=budget).hard
        alone = gate.decide(images[:1], budget=budget).hard
        assert torch.equal(hard[:1], alone)
        if isinstance(gate, EntropyGate):
            assert hard[1, 1 * 5 + 2] and hard[2, 0]
        else:
            tree = gate.tree_of(images)
            tokens = tree.token_weights(hard)
            assert tokens[0].view(3, 6, 10)[1, 2, 4] and tokens[0].view(3, 6, 10)[2, 0, 0]  # 16 px tokens
        if budget is not None:
            assert hard.sum(1).tolist() == [budget] * 3


@pytest.mark.parametrize("scales", [None, (8, 16, 32)])
@pytest.mark.parametrize("budget", [None, 4])
def test_a_nan_pixel_reaches_only_its_images_logits(scales, budget):
    """The whole model, two and three scales, with and without a budget: before, one NaN pixel
    crashed the batch ("index -9223372036854775808 is out of bounds"). Now the other images get
    their tokens and (dynamic forward, reference attention) their logits as without the NaN; a
    budget forward is static, whose attention is another matter (issue 26 item 1)."""
    from helpers import tiny_vit

    options = {"scales": scales} if scales else {}
    thresholds = (6.0,) if scales is None else (6.0, 4.0)
    backend = "reference" if budget is None else "auto"
    model = msvit.from_timm(
        tiny_vit(), gate="entropy", entropy_thresholds=thresholds, attention_backend=backend, **options
    ).eval()
    images = TF.normalize(sample_photos(64)[1][:3], IMAGENET_MEAN, IMAGENET_STD).to(DEVICE)
    with torch.no_grad():
        clean = model(images, budget=budget, return_gate=True)
        images[1, 0, 20, 30] = math.nan
        out = model(images, budget=budget, return_gate=True)
    assert torch.equal(out.gate.hard[[0, 2]], clean.gate.hard[[0, 2]])
    assert torch.equal(out.tokens[[0, 2]], clean.tokens[[0, 2]])
    region = (20 // 16) * 4 + 30 // 16 if scales is None else (20 // 32) * 2 + 30 // 32
    assert out.gate.hard[1, region] and out.gate.logits[1, region] == math.inf
    assert out.logits[1].isnan().all()
    if budget is None:
        assert rel_err(out.logits[[0, 2]], clean.logits[[0, 2]]) <= 1e-5  # other token counts: other roundings


# ---- the budget's order (issue 26 item 4, the learned gate) ------------------------------------


def test_a_budget_ranks_nan_last_and_ties_in_raster_order():
    from msvit.models.gate import budget_mask
    from msvit.models.tree_gate import tree_budget_mask
    from msvit_kernels.scale_tree import ScaleTree

    nan, inf = math.nan, math.inf
    logits = torch.tensor([[nan, 1.0, 1.0, 0.5], [1.0, nan, 1.0, 1.0], [nan, nan, nan, nan], [0.0, inf, nan, inf]])
    expected = [
        [False, True, True, False],
        [True, False, True, False],
        [True, True, False, False],
        [False, True, False, True],
    ]
    assert budget_mask(logits, 2).tolist() == expected
    tree = ScaleTree.of((4, 4), 2, 2)  # two scales: 4 regions, the same order
    assert torch.equal(tree_budget_mask(logits, tree, 2), budget_mask(logits, 2))


# ---- APT's coarse position resampling ------------------------------------------------------------


def test_coarse_pos_apt_resamples_as_apts_code():
    """APT's ``TokenizedZeroConvPatchAttn.forward``: ``resample_abs_pos_embed(base_pos_embed,
    new_size=(img_size // patch,) * 2, old_size=(base_grid,) * 2, num_prefix_tokens=1)`` for every
    coarser patch size (timm's defaults: bicubic, antialiased), called here as APT calls it."""
    from timm.layers import resample_abs_pos_embed

    from helpers import redraw_parameters

    vit = redraw_parameters(VisionTransformer(img_size=64, patch_size=8, embed_dim=24, depth=1, num_heads=2))
    for scales in ((8, 16), (8, 16, 32)):
        apt = msvit.from_timm(vit, scales=scales, coarse_pos="apt").eval()
        ours = msvit.from_timm(vit, scales=scales).eval()
        table = apt.tokenizer.position_tables((8, 8)).patches
        offset = 64
        for ps in scales[1:]:
            grid = 64 // ps
            expected = resample_abs_pos_embed(
                vit.pos_embed, new_size=(grid, grid), old_size=(8, 8), num_prefix_tokens=1
            )
            assert torch.equal(table[offset : offset + grid * grid], expected[0, 1:])
            offset += grid * grid
        bilinear = ours.tokenizer.position_tables((8, 8)).patches
        assert torch.equal(table[:64], bilinear[:64]) and not torch.allclose(table[64:], bilinear[64:])
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            mask = apt.gate_mask(x)
            assert rel_err(apt(x, mask=mask, mode="masked"), apt(x, mask=mask)) <= 1e-5


def test_coarse_pos_is_recorded_and_checked(tmp_path):
    import json

    from msvit.io.checkpoint import CONFIG, load_checkpoint, save_checkpoint

    from helpers import TINY_MODEL

    config = {
        "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 64}},
        "msvit": {},
    }
    model = msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=config["timm"]["kwargs"], coarse_pos="apt")
    save_checkpoint(tmp_path, model, config)  # the recipe does not name it: the record does
    assert json.loads((tmp_path / CONFIG).read_text())["architecture"]["coarse_pos"] == "apt"
    assert load_checkpoint(tmp_path).tokenizer.coarse_pos == "apt"
    with pytest.raises(ValueError, match="unknown coarse_pos 'bicubic'; expected one of: 'bilinear', 'apt'"):
        msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=config["timm"]["kwargs"], coarse_pos="bicubic")
    with pytest.raises(NotImplementedError, match="coarse_pos applies to ViT models"):
        msvit.from_timm("swin_tiny_patch4_window7_224", coarse_pos="apt")
