"""APT's zero-initialised aggregation (``from_timm(aggregate="zero_conv")``, msvit/models/aggregation.py):
with zero weights it is the shared embedding exactly; with random weights packed, masked and
trimmed modes agree, static shapes and border cells keep working, gradients reach it, MACs count it
and checkpoints rebuild it."""

import json

import pytest
import torch

import msvit
from msvit.host_reads import count_host_reads
from msvit.io.checkpoint import CONFIG, build_model, load_checkpoint, write_checkpoint
from msvit.models.aggregation import ZeroConvAggregation
from msvit.models.flops import count_macs, macs_for_tokens
from msvit_kernels.varlen import count_border_cells

from helpers import TINY_MODEL, counted_macs, needs_triton, redraw_parameters, rel_err, tiny_vit


def models(img_size=(64, 96), coarse_patch_size=None, **vit_kwargs):
    """(zero_conv MSViT with every parameter re-drawn and the aggregation's linear layer zeroed
    again, the "shared" MSViT with the same other parameters)."""
    vit = tiny_vit(img_size=img_size, **vit_kwargs)
    zero = msvit.from_timm(vit, aggregate="zero_conv", coarse_patch_size=coarse_patch_size).eval()
    redraw_parameters(zero)
    aggregation = zero.tokenizer.aggregation
    with torch.no_grad():
        aggregation.linear.weight.zero_()
        aggregation.linear.bias.zero_()
    shared = msvit.from_timm(vit, coarse_patch_size=coarse_patch_size).eval()
    shared.load_state_dict({k: v for k, v in zero.state_dict().items() if "aggregation" not in k})
    return zero, shared


def randomise(aggregation: ZeroConvAggregation, seed: int = 5) -> None:
    """Non-zero aggregation weights, big enough to change the logits."""
    redraw_parameters(aggregation, seed)


def images(batch, size, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def random_mask(model, x, seed=2, share=0.5):
    hc, wc = model.coarse_grid(x)
    return torch.rand(x.shape[0], hc * wc, generator=torch.Generator().manual_seed(seed)) < share


def test_zero_weights_give_the_shared_embedding_exactly():
    zero, shared = models()
    assert isinstance(zero.tokenizer.aggregation, ZeroConvAggregation) and shared.tokenizer.aggregation is None
    x = images(3, (64, 96))
    mask = random_mask(zero, x)
    with torch.no_grad():
        for mode in ("packed", "masked", "trimmed"):
            assert torch.equal(zero(x, mask=mask, mode=mode), shared(x, mask=mask, mode=mode)), mode
        assert torch.equal(zero(x), shared(x))  # the gate decides: it is the same gate
        assert torch.equal(zero(x, budget=0.5), shared(x, budget=0.5))  # static shapes, with and
        assert torch.equal(zero(x, capacity=3 * 96), shared(x, capacity=3 * 96))  # without padding rows


def test_default_is_shared_with_unchanged_parameters():
    vit = tiny_vit()
    default = msvit.from_timm(vit)
    assert default.tokenizer.aggregate == "shared" and default.tokenizer.aggregation is None
    assert not any("aggregation" in k for k in default.state_dict())
    with pytest.raises(ValueError, match="unknown aggregate 'conv'"):
        msvit.from_timm(vit, aggregate="conv")


@pytest.mark.parametrize(
    "img_size,size,coarse",
    [((64, 96), (64, 96), None), ((64, 96), (72, 104), None), ((72, 72), (72, 72), 24)],
    ids=["64x96", "bordered-72x104", "ratio-3"],
)
def test_random_weights_agree_across_modes_on_random_masks(img_size, size, coarse):
    zero, shared = models(img_size, coarse_patch_size=coarse)
    randomise(zero.tokenizer.aggregation)
    x = images(3, size)
    with torch.no_grad():
        for seed, share in ((2, 0.5), (3, 0.2), (4, 0.0), (5, 1.0)):
            mask = random_mask(zero, x, seed, share)
            packed = zero(x, mask=mask)
            for mode in ("masked", "trimmed"):
                assert rel_err(zero(x, mask=mask, mode=mode), packed) <= 1e-5, (mode, share)
            if share < 1:  # a coarse token changes the logits; without one nothing does
                assert rel_err(packed, shared(x, mask=mask)) > 1e-3
            else:
                assert torch.equal(packed, shared(x, mask=mask))


def test_static_shapes_with_border_cells_equal_the_dynamic_forward():
    zero, _ = models((64, 96))
    randomise(zero.tokenizer.aggregation)
    x = images(3, (72, 104))  # fine grid 9 x 13: a border row and column
    n_regions = zero.coarse_grid(x)[0] * zero.coarse_grid(x)[1]
    with torch.no_grad():
        for share in (0.0, 0.4, 1.0):
            mask = random_mask(zero, x, 7, share)
            dynamic = zero(x, mask=mask)
            tokens = int(zero.tokens_per_image(mask, images=x).sum())
            most = 3 * (1 + n_regions * 4 + count_border_cells((9, 13), 2))
            for capacity in {tokens, (tokens + most) // 2, most}:  # with and without padding rows
                assert rel_err(zero(x, mask=mask, capacity=capacity), dynamic) <= 1e-6, (share, capacity)
        budget_mask = zero.gate_mask(x, budget=3)
        assert rel_err(zero(x, budget=3), zero(x, mask=budget_mask)) <= 1e-6


def test_all_fine_model_is_unaffected_by_the_aggregation():
    vit = redraw_parameters(tiny_vit())
    zero = msvit.from_timm(vit, aggregate="zero_conv").eval()
    randomise(zero.tokenizer.aggregation)
    x = images(2, (64, 64))
    with torch.no_grad():
        logits = zero(x, mask=torch.ones(2, 16, dtype=torch.bool))
        assert rel_err(logits, vit(x)) <= 1e-4  # the all-fine MSViT is the timm ViT
        shared = msvit.from_timm(vit).eval()
        assert torch.equal(logits, shared(x, mask=torch.ones(2, 16, dtype=torch.bool)))


def test_gradients_reach_the_aggregation_in_packed_training():
    zero, _ = models()
    x = images(3, (64, 96))
    aggregation = zero.tokenizer.aggregation
    zero.train()
    zero(x, mask=random_mask(zero, x)).square().mean().backward()
    assert aggregation.linear.weight.grad.abs().sum() > 0  # zero-initialised: the linear layer learns first
    assert aggregation.conv.weight.grad is not None and not aggregation.conv.weight.grad.any()
    zero.zero_grad()
    randomise(aggregation)
    zero(x, mask=random_mask(zero, x)).square().mean().backward()
    for name, p in aggregation.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_macs_count_the_aggregation_per_coarse_token():
    zero, shared = models()
    randomise(zero.tokenizer.aggregation)
    x = images(1, (64, 96))
    mask = random_mask(zero, x)
    coarse = int((~mask).sum())
    d, r, k = 48, 2, 3 * 8 * 8
    per_token = r * r * k * d + r * r * d * d + d * d  # sub-patch embeddings, 2x2 conv, linear
    ours = count_macs(zero, x, mask=mask, include_gate=False)
    assert ours.item() - count_macs(shared, x, mask=mask, include_gate=False).item() == coarse * per_token
    counted = counted_macs(lambda im: zero(im, mask=mask), x)
    assert counted - counted_macs(lambda im: shared(im, mask=mask), x) == coarse * per_token
    assert abs(ours.item() / counted - 1) < 1e-3
    # without a mask (a training run's evaluation) the coarse count comes from the token count
    tokens = zero.tokens_per_image(mask)
    assert torch.equal(macs_for_tokens(zero, tokens, 24)["total"], count_macs(zero, mask=mask))


@needs_triton
def test_triton_kernels_warn_and_take_the_torch_path():
    zero, _ = models()
    randomise(zero.tokenizer.aggregation)
    x = images(2, (64, 96))
    mask = random_mask(zero, x)
    with torch.no_grad():
        expected = zero(x, mask=mask)
        zero.kernels = "triton"
        with pytest.warns(UserWarning, match="does not aggregate sub-patch embeddings"):
            got = zero(x, mask=mask)
    assert torch.equal(got, expected)


CHECKPOINT = {
    "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 32, "num_classes": 10}},
    "msvit": {"coarse_patch_size": 16, "hidden": 16},
}


def test_checkpoint_rebuilds_the_aggregation_from_its_record(tmp_path):
    torch.manual_seed(0)
    model = msvit.from_timm(
        "vit_tiny_patch16_224", timm_kwargs=CHECKPOINT["timm"]["kwargs"], aggregate="zero_conv", **CHECKPOINT["msvit"]
    ).eval()
    randomise(model.tokenizer.aggregation)
    write_checkpoint(tmp_path, model, CHECKPOINT)  # the recipe does not name the aggregation
    assert json.loads((tmp_path / CONFIG).read_text())["architecture"]["aggregate"] == "zero_conv"
    loaded = load_checkpoint(tmp_path)
    assert loaded.tokenizer.aggregate == "zero_conv"
    x = images(2, (32, 32))
    mask = random_mask(model, x)
    with torch.no_grad():
        assert torch.equal(loaded(x, mask=mask), model(x, mask=mask))
        assert loaded.tokenizer.aggregation.linear.weight.abs().sum() > 0
    assert build_model(CHECKPOINT).tokenizer.aggregate == "shared"  # without a record: today's model


def test_checkpoint_whose_recipe_contradicts_the_record_is_refused_at_save_time(tmp_path):
    model = msvit.from_timm(
        "vit_tiny_patch16_224", timm_kwargs=CHECKPOINT["timm"]["kwargs"], aggregate="zero_conv", **CHECKPOINT["msvit"]
    )
    config = {**CHECKPOINT, "msvit": {**CHECKPOINT["msvit"], "aggregate": "shared"}}
    with pytest.raises(ValueError, match="aggregate: recorded 'zero_conv', rebuilt '<absent>'"):
        write_checkpoint(tmp_path, model, config)
    assert not (tmp_path / "config.json").exists()


def test_aggregation_adds_no_host_read():
    zero, shared = models()
    randomise(zero.tokenizer.aggregation)
    x = images(3, (64, 96))
    counts = []
    with torch.no_grad():
        for call in (lambda: zero(x, budget=3), lambda: zero(x, capacity=3 * 96), lambda: zero(x), lambda: shared(x)):
            with count_host_reads() as reads:
                call()
            counts.append(reads.count)
    assert counts[:2] == [0, 0]  # static shapes read nothing back (docs/design.md section 9)
    assert counts[2] == counts[3]  # the dynamic forward reads what the shared model's reads
