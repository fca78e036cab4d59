"""Mixed-scale Swin (msvit.models.swin): all-fine = timm's Swin, packed = dense-masked for any mask, the
window attention = timm's WindowAttention with absent keys masked, gradients reach the gate.
Parameters are re-drawn first (helpers.redraw_parameters), relative position tables included."""

import pytest
import torch
from timm.models.swin_transformer import window_partition, window_reverse

import msvit
from msvit.models.swin import MixedScaleSwin
from msvit.models.swin.attention import window_attention, window_mask
from msvit.models.swin.blocks import shift_mask
from msvit.models.swin.layout import dense_coords, fine_token_coords, morton_offsets
from msvit.models.swin.windows import window_layout

from helpers import redraw_parameters, rel_err, tiny_swin


@pytest.fixture(scope="module")
def pair():
    swin = redraw_parameters(tiny_swin())
    return swin, msvit.from_timm(swin).eval()


def random_masks(batch, n_regions, rate, seed=0):
    return torch.rand(batch, n_regions, generator=torch.Generator().manual_seed(seed)) < rate


def test_from_timm_dispatches_swin_and_enters_at_the_stage_of_scale_s_c(pair):
    _, model = pair
    assert isinstance(model, MixedScaleSwin)
    # scales 4, 8, 16, 32 (stages 0..3): S_c = 32 joins the dense flow at the last stage
    assert model.tokenizer.coarse_patch == 32 and model.entry == 3
    assert model.coarse_grid(torch.zeros(1, 3, 224, 224)) == (7, 7)
    assert msvit.from_timm(tiny_swin(), coarse_patch_size=16).entry == 2


def test_tokens_per_image_checks_the_mask_against_the_coarse_grid(pair):
    _, model = pair
    assert model.tokens_per_image(torch.zeros(2, 49, dtype=torch.bool)).tolist() == [49, 49]
    with pytest.raises(ValueError, match=r"\[B, Nc\] = \[2, 49\] \(one entry per coarse region of the 7x7"):
        model.tokens_per_image(torch.zeros(2, 48, dtype=torch.bool))


def test_all_fine_equals_timm_swin(pair):
    swin, model = pair
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = swin(images)
        fine = torch.ones(2, 49, dtype=torch.bool)
        packed, masked = model(images, mask=fine), model(images, mask=fine, mode="masked")
    assert expected.std() > 0.1  # the re-drawn weights make the logits depend on the image
    assert rel_err(packed, expected) <= 1e-4
    assert rel_err(masked, expected) <= 1e-4


def test_all_fine_equals_timm_with_entry_at_stage_2():
    swin = redraw_parameters(tiny_swin())
    model = msvit.from_timm(swin, coarse_patch_size=16).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(model(images, mask=torch.ones(1, 196, dtype=torch.bool)), swin(images)) <= 1e-4


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_packed_equals_masked_on_random_masks(pair, rate):
    _, model = pair
    images = torch.randn(3, 3, 224, 224)
    mask = random_masks(3, 49, rate, seed=int(rate * 10))
    with torch.no_grad():
        packed = model(images, mask=mask)
        masked = model(images, mask=mask, mode="masked")
    assert rel_err(packed, masked) <= 1e-5
    assert packed.std() > 0.1


@pytest.mark.parametrize("block_index", [0, 1])  # unshifted, shifted
def test_window_attention_equals_timm_window_attention_with_absent_keys(pair, block_index):
    """Oracle: timm's own WindowAttention on the dense (shifted) windows, with its mask argument
    extended by -inf for absent keys; ours runs only the windows holding present tokens."""
    swin, _ = pair
    block = swin.layers[0].blocks[block_index]
    grid, window, shift = (56, 56), tuple(block.window_size), tuple(block.shift_size)
    assert any(shift) == bool(block_index)
    torch.manual_seed(2)
    batch = 2
    x = torch.randn(batch, *grid, 16)
    present = torch.rand(batch, *grid) < 0.5  # partial windows, including those the shift wraps around
    present[0, 7:42, 7:42] = False  # and empty ones
    present[1, :28] = False
    rows = present.flatten()
    coords = type(dense_coords(1, grid))(*(c[rows] for c in dense_coords(batch, grid)))
    with torch.no_grad():
        layout = window_layout(coords, grid, window, shift)
        mask = window_mask(layout, shift_mask(block, x.device, x.dtype), x.dtype)
        ours = window_attention(block.attn, x.flatten(0, 2)[rows], layout, mask)
    n = window[0] * window[1]
    rolled = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
    keys = torch.roll(present, (-shift[0], -shift[1]), (1, 2))
    xw = window_partition(rolled, window).view(-1, n, 16)
    kw = window_partition(keys[..., None].float(), window).view(-1, n)
    per_window = torch.zeros(xw.shape[0], n, n)
    if any(shift):
        per_window = per_window + block.attn_mask.repeat(batch, 1, 1)
    per_window = per_window.masked_fill(kw[:, None, :] == 0, float("-inf"))
    filled = kw.sum(1) > 0
    with torch.no_grad():
        out = block.attn(xw[filled], mask=per_window[filled])
    dense = torch.zeros_like(xw)
    dense[filled] = out
    back = torch.roll(window_reverse(dense.view(-1, *window, 16), window, *grid), shift, (1, 2))
    assert rel_err(ours, back.flatten(0, 2)[rows]) <= 1e-5


def test_empty_windows_are_never_laid_out():
    coords = fine_token_coords(torch.tensor([0, 48]), (7, 7), 8)  # two corner regions of a 56x56 grid
    layout = window_layout(coords, (56, 56), (7, 7), (0, 0))
    # each 32px corner region overlaps 2x2 windows of 28px: 8 of the 64 windows are laid out
    assert layout.windows == 8 and layout.key_present.sum() == 2 * 64


def test_morton_groups_are_2x2_blocks():
    dy, dx = morton_offsets(4)
    assert dy[:4].tolist() == [0, 0, 1, 1] and dx[:4].tolist() == [0, 1, 0, 1]
    assert sorted(zip(dy.tolist(), dx.tolist())) == [(y, x) for y in range(4) for x in range(4)]
    parents = (dy[::4] // 2, dx[::4] // 2)
    assert parents[0].tolist() == morton_offsets(2)[0].tolist() and parents[1].tolist() == morton_offsets(2)[1].tolist()


@pytest.mark.parametrize("mode", ["packed", "masked"])
def test_gate_gradient_reaches_the_gate(mode):
    model = msvit.from_timm(redraw_parameters(tiny_swin()), init_logit=0.0).train()
    images = torch.randn(2, 3, 224, 224)
    out = model(images, mode=mode, return_gate=True)
    assert 0 < out.gate.hard.sum() < out.gate.hard.numel()  # both scales present
    out.logits.square().sum().backward()
    grad = model.gate.fc1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.tokenizer.coarse_embed.weight.grad.abs().sum() > 0
    assert model.tokenizer.embed.weight.grad.abs().sum() > 0


def test_gate_decides_and_token_counts(pair):
    _, model = pair
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(images, return_gate=True, budget=0.25)
    assert out.gate.hard.sum(1).tolist() == [12, 12]
    assert out.tokens.tolist() == [49 + 63 * 12] * 2  # 64 fine tokens per fine region, 1 per coarse
    assert model.gate_mask(images, budget=12).sum().item() == 24


def test_bad_input_is_refused(pair):
    _, model = pair
    with pytest.raises(ValueError, match="built for 224x224"):
        model(torch.randn(1, 3, 192, 192))
    with pytest.raises(ValueError, match="mode"):
        model(torch.randn(1, 3, 224, 224), mode="trimmed")
    with pytest.raises(ValueError, match="mask must have shape"):
        model(torch.randn(1, 3, 224, 224), mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="token scale of a later stage"):
        msvit.from_timm(tiny_swin(), coarse_patch_size=24)
    with pytest.raises(ValueError, match="kernels"):
        msvit.from_timm(tiny_swin(), kernels="cuda")
    with pytest.raises(ValueError, match="attention_backend"):
        msvit.from_timm(tiny_swin(), attention_backend="triton")
    with pytest.raises(NotImplementedError, match="window"):
        msvit.from_timm(tiny_swin(img_size=160, window_size=3))  # stage 0: 40x40 is not whole 3x3 windows


def test_swin_v2_is_refused():
    import timm

    v2 = timm.create_model("swinv2_tiny_window8_256", pretrained=False, depths=(1, 1, 1, 1), embed_dim=16)
    with pytest.raises(NotImplementedError, match="Swin v1"):
        msvit.from_timm(v2)
