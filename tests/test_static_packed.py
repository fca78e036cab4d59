"""Static packed shapes (docs/design.md section 9): a forward whose shapes depend only on the batch,
the image size and a capacity gives the dynamic forward's logits, and reads nothing back to the host.

Host reads are counted on the CUDA code path (the Triton kernels, run by the interpreter on CPU; the
counter ignores the interpreter's own copies): 0 with a budget or a capacity, 1 (the token count)
without. Models cover the converted families whose packed paths differ: ViT (cls and avg pooling),
RoPE (Eva), SigLIP ``map`` pooling, distilled DeiT and NaFlexViT; parameters are re-drawn.
"""

import pytest
import timm
import torch

import msvit
from msvit.host_reads import count_host_reads
from msvit_kernels.varlen import mixed_scale_index, static_shape

from helpers import needs_triton, redraw_parameters, tiny_vit

FAMILIES = {
    "vit": lambda: tiny_vit(img_size=(64, 96)),
    "vit_avg": lambda: tiny_vit(img_size=(64, 96), global_pool="avg", class_token=False),
    "rope": lambda: timm.create_model("vit_small_patch16_rope_224", pretrained=False, depth=2, img_size=(64, 96)),
    "map": lambda: timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, depth=1, img_size=(64, 96), embed_dim=48, num_heads=3
    ),
    "distilled": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=(64, 96)
    ),
    "naflex": lambda: timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=48),
}


def converted(family: str, **kwargs):
    torch.manual_seed(0)
    vit = FAMILIES[family]()
    size = (64, 96) if family != "naflex" else (64, 64)
    model = msvit.from_timm(redraw_parameters(vit.eval()), img_size=size if family == "naflex" else None, **kwargs)
    return model.eval(), torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_forward_equals_dynamic(family):
    model, images = converted(family)
    n_regions = model.coarse_grid(images)[0] * model.coarse_grid(images)[1]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for fine_share in (0.0, 0.3, 0.8, 1.0):
            mask = torch.rand(3, n_regions, generator=generator) < fine_share
            dynamic = model(images, mask=mask)
            tokens = int(model.tokens_per_image(mask).sum())
            shape = model.static_shape(3, images.shape[-2:], capacity=tokens)
            most = 3 * (model.tokenizer.num_prefix + n_regions * model.tokenizer.ratio**2)
            for capacity in {tokens, (tokens + most) // 2, most}:
                static = model(images, mask=mask, capacity=capacity)
                assert relative(static, dynamic) <= 1e-6, (fine_share, capacity, shape)
        for budget in (0, 2, 0.5):
            dynamic = model(images, mask=model.gate_mask(images, budget=budget))
            assert relative(model(images, budget=budget), dynamic) <= 1e-6, budget


@needs_triton
@pytest.mark.parametrize("family", ["vit", "vit_avg", "rope", "map", "distilled", "naflex"])
def test_host_reads_zero_with_budget_or_capacity_one_without(family):
    model, images = converted(family, kernels="triton", attention_backend="triton")
    with torch.no_grad():
        model(images)  # compile (interpret) once outside the count
        with count_host_reads() as reads:
            model(images, budget=3)
        assert reads.count == 0, reads.report()
        shape = model.static_shape(3, images.shape[-2:], budget=1.0)
        with count_host_reads() as reads:
            model(images, capacity=shape.capacity)
        assert reads.count == 0, reads.report()
        with count_host_reads() as reads:
            model(images)
        assert reads.count == 1, reads.report()


def test_host_read_counter_sees_every_kind_of_read():
    x = torch.arange(6)
    reads_of = {
        "tolist": lambda: x.tolist(),
        "item": lambda: x[0].item(),
        "int": lambda: int(x[1]),
        "if": lambda: bool(x.sum() > 0),
        "nonzero": lambda: x.nonzero(),
        "boolean index": lambda: x[x > 2],
        "bincount": lambda: torch.bincount(x),
        "repeat_interleave": lambda: torch.repeat_interleave(x, x),
        "unique": lambda: torch.unique(x),
        "masked_select": lambda: x.masked_select(x > 1),
    }
    for name, read in reads_of.items():
        with count_host_reads() as reads:
            read()
        assert reads.count == 1, (name, reads.report())
    with torch.inference_mode():  # inference tensors read scalars without a dispatched op: still seen, once each
        y = x + 1
        for name, read in {
            "item": lambda: y[0].item(),
            "int": lambda: int(y[1]),
            "if": lambda: bool(y.sum() > 0),
            "float": lambda: float(y[2]),
            "index": lambda: [0] * 9 * y[1],
        }.items():
            with count_host_reads() as reads:
                read()
            assert reads.count == 1, (name, reads.report())
    with count_host_reads() as reads:  # these need no value on the host
        torch.repeat_interleave(x, x, output_size=15)
        x[torch.tensor([1, 2])] = 0
        x.topk(2)
    assert reads.count == 0, reads.report()


def test_static_index_pads_after_the_real_rows():
    mask = torch.rand(3, 12, generator=torch.Generator().manual_seed(0)) < 0.5
    exact = mixed_scale_index(mask, (3, 4), 2, 1)
    shape = static_shape(3, 12, 2, 1, capacity=exact.total + 20)
    padded = mixed_scale_index(mask, (3, 4), 2, 1, shape)
    assert padded.static and not exact.static and padded.batch == 3 and padded.total == exact.total + 20
    real = exact.rows.numel()
    for field in ("rows", "source", "position", "region", "is_fine"):
        assert torch.equal(getattr(padded, field)[:real], getattr(exact, field)), field
    assert torch.equal(padded.rows[real:], torch.arange(exact.total, padded.total))  # padding rows, in order
    assert torch.equal(padded.row_image[exact.total :], torch.full((20,), 3))
    cu = padded.cu_seqlens
    assert torch.equal(cu[:4], exact.cu_seqlens) and cu[-1] == padded.total
    assert cu.numel() == 4 + shape.padding_sequences and (cu[1:] - cu[:-1]).max() <= shape.max_seqlen
    assert torch.equal(padded.fine_to_row, exact.fine_to_row)


def test_static_shape_bounds_and_budget_lengths():
    shape = static_shape(4, 49, 2, 1, fine_regions=10)  # a budget: every image 1 + 49 + 3 * 10 rows
    assert shape == (4 * 80, 80, 0)
    full = static_shape(4, 49, 2, 1, capacity=4 * 197)
    assert full.max_seqlen == 197 and full.padding_sequences == 3  # up to 4 * 147 padding rows, <= 197 each
    for capacity, error in ((4 * 50 - 1, ValueError), (4 * 197 + 1, ValueError), (100.0, TypeError)):
        with pytest.raises(error, match="capacity"):
            static_shape(4, 49, 2, 1, capacity=capacity)
    with pytest.raises(ValueError, match="needs a capacity"):
        static_shape(4, 49, 2, 1)


def test_a_batch_larger_than_the_capacity_fails_instead_of_dropping_tokens():
    model, images = converted("vit")
    all_fine = torch.ones(3, 24, dtype=torch.bool)  # 4 x 6 regions of 16 px
    with torch.no_grad(), pytest.raises(RuntimeError, match="exceed the static capacity"):
        model(images, mask=all_fine, capacity=3 * 25 + 1)
    with pytest.raises(ValueError, match="mode='packed' only"):
        model(images, mode="masked", capacity=100)


def test_position_tables_are_built_once_per_grid_and_follow_weight_changes():
    model, images = converted("vit")
    tokenizer = model.tokenizer
    with torch.no_grad():
        first = tokenizer.position_tables((8, 12))
        assert tokenizer.position_tables((8, 12)) is first  # cached: no rebuild per forward
        before = model(images)
        tokenizer.pos_embed.mul_(-2.0)  # an in-place change (an optimizer step, load_state_dict)
        assert tokenizer.position_tables((8, 12)) is not first
        assert not torch.allclose(model(images), before)
    assert tokenizer.position_tables((8, 12)).patches.requires_grad  # training: built in the graph


def test_a_model_built_under_inference_mode_runs_without_a_table_cache():
    with torch.inference_mode():  # its parameters are inference tensors: no version counter to watch
        model, images = converted("vit")
        first = model(images, budget=2)
        assert torch.equal(model(images, budget=2), first)
