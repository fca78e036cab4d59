"""Image sizes that are not a whole number of coarse regions (issue 21): the fine cells outside
every whole region are border cells, always fine tokens, packed after an image's regions
(msvit_kernels/varlen.py). ViT-B/32 at 224 px (7 x 7 fine cells, 3 x 3 regions, 13 border cells)
and DINOv2 at 518 px (37 x 37, 18 x 18, 73): all-fine equals timm, any mask runs packed ==
masked == trimmed, MACs equal FlopCounterMode; the Triton index and pack kernels equal their
references; every family of the docs/models.md table takes the inputs its own eval_transform builds."""

import pytest
import timm
import torch
from PIL import Image

import msvit
from msvit.host_reads import count_host_reads
from msvit.models.flops import count_macs
from msvit_kernels.index_kernel import triton_mixed_scale_index
from msvit_kernels.pack_kernel import gather_embed_pack
from msvit_kernels.reference import pack_reference
from msvit_kernels.varlen import border_cells, mixed_scale_index

from helpers import check_random_masks, counted_macs, needs_triton, redraw_parameters, rel_err
from model_families import cases

BORDERED = {  # name -> (timm kwargs, image size)
    "vit_base_patch32_224": (dict(depth=2, embed_dim=96, num_heads=3), 224),
    "vit_small_patch14_dinov2": (dict(depth=2, embed_dim=48, num_heads=3, img_size=518, num_classes=10), 518),
}


def bordered(name):
    kwargs, size = BORDERED[name]
    torch.manual_seed(0)
    vit = redraw_parameters(timm.create_model(name, pretrained=False, **kwargs).eval())
    return vit, msvit.from_timm(vit).eval(), torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(BORDERED))
def test_all_fine_equals_timm_and_random_masks_agree_across_modes(name):
    vit, model, images = bordered(name)
    hc, wc = model.coarse_grid(images)
    with torch.no_grad():
        expected = vit(images)
        got = model(images, mask=torch.ones(2, hc * wc, dtype=torch.bool))
    assert expected.std() > 0.05 and rel_err(got, expected) <= 1e-4
    check_random_masks(model, images)  # packed == masked == trimmed, gradients reach the gate


@pytest.mark.parametrize("name", sorted(BORDERED))
def test_macs_equal_the_flop_counter(name):
    vit, model, images = bordered(name)
    hc, wc = model.coarse_grid(images)
    all_fine = torch.ones(1, hc * wc, dtype=torch.bool)
    ours = count_macs(model, images[:1], mask=all_fine, include_gate=False)
    assert abs(ours.item() / counted_macs(vit, images[:1]) - 1) < 1e-3
    mask = torch.rand(1, hc * wc, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        model.gate_mask(images[:1])
    gate_free = count_macs(model, images[:1], mask=mask, include_gate=False).item()
    tokens = int(model.tokens_per_image(mask, images=images[:1]))
    assert tokens == 1 + hc * wc + 3 * int(mask.sum()) + (37 * 37 - 36 * 36 if "dinov2" in name else 13)
    with torch.no_grad():
        packed_counted = counted_macs(lambda x: model(x, mask=mask), images[:1])
    assert abs(gate_free / packed_counted - 1) < 1e-3


def test_border_cells_come_after_the_regions_and_unpack_to_their_own_rows():
    mask = torch.tensor([[True, False, False, True, False, True]])  # 2 x 3 regions of a 5 x 7 fine grid
    index = mixed_scale_index(mask, (2, 3), 2, 1, fine_grid=(5, 7))
    border = border_cells((5, 7), 2)
    assert border.tolist() == [6, 13, 20, 27, 28, 29, 30, 31, 32, 33, 34]
    length = 1 + 3 * 4 + 3 + border.numel()
    assert index.cu_seqlens.tolist() == [0, length]
    last = index.rows[-border.numel() :]
    assert last.tolist() == list(range(length - border.numel(), length))
    assert index.is_fine[-border.numel() :].all() and (index.region[-border.numel() :] == -1).all()
    assert index.fine_to_row[0, border].tolist() == last.tolist()


@needs_triton
@pytest.mark.parametrize("capacity", [None, 2 * (1 + 6 + 11) + 20])
def test_triton_index_and_pack_equal_the_references_with_border_cells(capacity):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 5 * 8, 7 * 8)
    mask = torch.rand(2, 6) < 0.5
    shape = None
    if capacity is not None:
        from msvit_kernels.varlen import static_shape

        shape = static_shape(2, 6, 2, 1, capacity, n_border=11)
    want = mixed_scale_index(mask, (2, 3), 2, 1, shape, fine_grid=(5, 7))
    got = triton_mixed_scale_index(mask, (2, 3), 2, 1, shape, fine_grid=(5, 7))
    for field in want._fields:
        a, b = getattr(got, field), getattr(want, field)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field
    weight, bias = torch.randn(16, 3 * 8 * 8) * 0.1, torch.randn(16)
    table = torch.randn(35 + 6, 16)
    st = torch.ones(2, 6, requires_grad=True)
    prefix = torch.randn(1, 16)
    fused = gather_embed_pack(images, want, weight, bias, table, st, prefix, 8, 2)
    reference = pack_reference(images, want, weight, bias, table, st, prefix, 8, 2)
    assert rel_err(fused, reference) <= 1e-5
    (fused_grad,) = torch.autograd.grad(fused.square().sum(), st)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), st)
    assert rel_err(fused_grad, reference_grad) <= 1e-4


@needs_triton
def test_a_budget_forward_with_border_cells_reads_nothing_back():
    _, model, images = bordered("vit_base_patch32_224")
    model.kernels, model.attention_backend = "triton", "triton"
    with torch.no_grad():
        model(images[:1], budget=4)
        with count_host_reads() as reads:
            static = model(images[:1], budget=4)
        assert reads.count == 0, reads.report()
        assert rel_err(static, model(images[:1], mask=model.gate_mask(images[:1], budget=4))) <= 1e-5


@pytest.mark.parametrize(
    "family, name, kwargs, feature", cases(refused=False), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_family_takes_what_its_eval_transform_builds(family, name, kwargs, feature):
    depth = {} if name.startswith("naflexvit") else dict(depth=1)
    model = msvit.from_timm(name, timm_kwargs=dict(pretrained=False, **depth)).eval()
    x = msvit.eval_transform(model)(Image.new("RGB", (300, 250), (120, 30, 200)))[None]
    with torch.no_grad():
        assert torch.isfinite(model(x)).all(), (name, tuple(x.shape))


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
def test_the_entropy_gate_reads_whole_regions_only(kernels):
    """336 x 512 on 32 px regions: a 16 px border row. The two-scale entropy gate used to reshape the
    whole image into regions and fail; it decides on the whole regions, the border stays fine."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    model = msvit.from_timm(vit, gate="entropy", kernels=kernels).eval()
    images = torch.rand(2, 3, 336, 512)
    whole = images[..., :320, :]
    torch.testing.assert_close(model.gate(images), model.gate(whole))
    with torch.no_grad():
        out = model(images, return_gate=True)
    assert out.gate.hard.shape == (2, 10 * 16)
    assert torch.equal(out.gate.hard, model.gate_mask(whole))
    border = 32  # one row of 32 fine cells, always fine
    assert torch.equal(out.tokens, 1 + border + 160 + 3 * out.gate.hard.sum(1))
