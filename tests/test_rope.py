"""RoPE models (timm ``Eva``: EVA02, DINOv3, PE, RoPE-ViT) on packed tokens (msvit.models.rope): all-fine
equals timm on re-drawn parameters, fine positions are timm's own, coarse ones the mean of their fine
cells, the three execution modes agree, and the all-coarse DINOv3 equals timm on the pooled image.

PE core is built with ``global_pool='avg'``: its attention pooling is refused on this branch
(tests/model_families.py), the rotary part is what is tested here."""

import pytest
import timm
import torch
import torch.nn.functional as F

import msvit
from msvit.models.rope import PackedRope

from helpers import needs_triton, redraw_parameters, rel_err

MODELS = {  # name: (timm kwargs, image size)
    "eva02_tiny_patch14_224": (dict(img_size=112), 112),  # axial RoPE, index grid rescaled to ref_feat_shape
    "vit_small_patch16_dinov3": ({}, 64),  # centred-coordinate RoPE, 4 registers, no abs. position
    "vit_pe_core_small_patch16_384": (dict(img_size=64, global_pool="avg"), 64),  # axial RoPE + abs. position
    "vit_base_patch16_rope_mixed_ape_224": (dict(img_size=64), 64),  # learned mixed frequencies
}


def build(name, **overrides):
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, depth=2, **{**kwargs, **overrides}).eval()
    return redraw_parameters(vit), size


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    vit, size = build(request.param)
    return vit, msvit.from_timm(vit).eval(), size


def regions(model, size):
    h, w = model.coarse_grid(torch.empty(1, 3, size, size))
    return h * w


def test_all_fine_equals_timm(pair):
    vit, model, size = pair
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    fine = torch.ones(2, regions(model, size), dtype=torch.bool)
    with torch.no_grad():
        expected = vit(images)
        got = model(images, mask=fine)
        rope, model.rope = model.rope, None
        without_rope = model(images, mask=fine)
        model.rope = rope
    assert rel_err(got, expected) <= 1e-4
    assert rel_err(without_rope, expected) > 1e-2, "the test must see the rotary embedding"


def test_modes_agree_and_gradients_are_finite_on_random_masks(pair):
    _, model, size = pair
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, regions(model, size), generator=torch.Generator().manual_seed(2)) < 0.5
    with torch.no_grad():
        packed = model(images, mask=mask)
        masked = model(images, mask=mask, mode="masked")
        trimmed = model(images, mask=mask, mode="trimmed")
    assert torch.isfinite(packed).all()
    assert rel_err(masked, packed) <= 1e-4
    assert rel_err(trimmed, packed) <= 1e-4
    model.zero_grad()
    model(images, mask=mask).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if model.rope.mixed:  # the learned frequencies train
        assert model.rope.rope.freqs.grad.abs().sum() > 0
    model.zero_grad()


def test_fine_embedding_is_timms_and_coarse_position_is_the_mean_of_its_cells(pair):
    vit, model, size = pair
    rope = model.rope
    grid = vit.patch_embed.grid_size if not vit.dynamic_img_size else (size // 16, size // 16)
    expected = vit.rope.get_embed(shape=list(grid)) if vit.dynamic_img_size or rope.mixed else vit.rope.get_embed()
    fine = rope.fine_coords(grid)
    assert torch.allclose(rope.embed(fine), expected, atol=1e-6, rtol=0)
    coords = rope.coords(grid)
    h, w = grid
    pooled = F.avg_pool2d(fine.T.reshape(2, h, w), 2).reshape(2, -1).T
    assert torch.allclose(coords[h * w :], pooled, atol=1e-6)
    table = rope.table(grid)
    assert torch.equal(
        table[..., 0, :],
        torch.cat([torch.zeros(table.shape[-1] // 2), torch.ones(table.shape[-1] // 2)]).expand_as(table[..., 0, :]),
    )


def test_forward_features_unpack_to_the_timm_grid_all_fine(pair):
    vit, model, size = pair
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model.forward_features(images, mask=torch.ones(2, regions(model, size), dtype=torch.bool))
        grid = msvit.unpack_to_grid(features)
        expected = vit.forward_features(images)
    p = vit.num_prefix_tokens
    h, w = features.fine_grid
    assert grid.grid.shape == (2, h, w, vit.embed_dim) and grid.prefix.shape == (2, p, vit.embed_dim)
    assert rel_err(grid.grid.reshape(2, h * w, -1), expected[:, p:]) <= 1e-4
    assert rel_err(grid.prefix, expected[:, :p]) <= 1e-4


def test_dinov3_all_coarse_equals_timm_on_the_pooled_image():
    """DINOv3's coordinates are cell centres normalised by the grid size, so a coarse token's mean
    position is exactly timm's position of that cell on the half-size grid."""
    vit, size = build("vit_small_patch16_dinov3")
    model = msvit.from_timm(vit).eval()
    images = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(images, mask=torch.zeros(2, 4 * 3, dtype=torch.bool))
        expected = vit(F.avg_pool2d(images, 2))
    assert rel_err(got, expected) <= 1e-4


def test_dinov3_training_coordinate_augmentation_matches_timm():
    """One shift / jitter / rescale draw per forward, applied to fine and coarse positions alike."""
    vit, size = build("vit_small_patch16_dinov3", rope_shift_coords=0.5, rope_jitter_coords=1.5)
    model = msvit.from_timm(vit).train()
    vit.train()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.manual_seed(7)
        expected = vit(images)
        torch.manual_seed(7)
        got = model(images, mask=torch.ones(2, regions(model, size), dtype=torch.bool))
        torch.manual_seed(8)
        other_draw = model(images, mask=torch.ones(2, regions(model, size), dtype=torch.bool))
    assert rel_err(got, expected) <= 1e-4
    assert rel_err(other_draw, expected) > 1e-3


def test_unsupported_rope_module_and_pruning_are_refused():
    with pytest.raises(NotImplementedError, match="RoPE module Linear"):
        PackedRope(torch.nn.Linear(2, 2), 2, False)
    vit, _ = build("vit_small_patch16_dinov3", global_pool="token")
    with pytest.raises(NotImplementedError, match="RoPE models"):
        msvit.PrunedMSViT(msvit.from_timm(vit), layers=(0,))


def test_checkpoint_round_trip_keeps_the_learned_frequencies(tmp_path):
    """A RoPE MSViT saves and reloads (the architecture record names its RoPE), with the mixed
    variant's trained frequencies; another rotation layout in the config is refused."""
    from msvit.io.checkpoint import CONFIG, build_model, load_checkpoint, write_checkpoint

    kwargs, size = MODELS["vit_base_patch16_rope_mixed_ape_224"]
    config = {"timm": {"name": "vit_small_patch16_rope_mixed_224", "kwargs": {**kwargs, "depth": 1}}, "msvit": {}}
    model = redraw_parameters(build_model(config)).eval()
    write_checkpoint(tmp_path, model, config)
    loaded = load_checkpoint(tmp_path)
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert torch.equal(loaded.rope.rope.freqs, model.rope.rope.freqs)
    recorded = (tmp_path / CONFIG).read_text()
    assert '"RotaryEmbeddingMixed"' in recorded
    (tmp_path / CONFIG).write_text(
        recorded.replace('"vit_small_patch16_rope_mixed_224"', '"vit_small_patch16_rope_224"')
    )
    with pytest.raises(ValueError, match="no longer matches the weights"):
        load_checkpoint(tmp_path)


@needs_triton
@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_pe_core_small_patch16_384"])
def test_fused_tokenizer_gives_the_same_rotations(name):
    """The Triton index / pack kernels lay rows out as the reference does, so the rows' positions
    (read from the index) and their rotations agree (no abs. position for DINOv3, one for PE)."""
    vit, size = build(name)
    model = msvit.from_timm(vit, kernels="reference").eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    with torch.no_grad():
        expected = model(images, mask=mask)
        model.kernels = "triton"
        got = model(images, mask=mask)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_base_patch16_rope_mixed_ape_224"])
def test_unfused_q_k_v_projections_equal_timm(name):
    """EvaAttention / AttentionRope with separate q_proj, k_proj, v_proj (qkv_fused=False)."""
    vit, size = build(name, qkv_fused=False)
    assert vit.blocks[0].attn.qkv is None
    model = msvit.from_timm(vit).eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = model(images, mask=torch.ones(2, regions(model, size), dtype=torch.bool))
        expected = vit(images)
    assert rel_err(got, expected) <= 1e-4
