"""The gather-embed-pack kernel on layouts of more than two scales (``scale_tree.tree_index``,
docs/design.md section 10) against ``reference.pack_reference(..., scales)``: fp32 kernel vs a
float64 oracle, forward and every gradient (weight, bias, position table, prefix, and the split
decisions behind the token weights) within 1e-5 relative. Grids leave border roots at every scale;
shapes are tiny because the tests run in the Triton interpreter on CPU."""

import pytest
import torch

from msvit_kernels import gather_embed_pack, mixed_scale_index
from msvit_kernels.pack_kernel import MAX_SCALES
from msvit_kernels.reference import pack_reference
from msvit_kernels.scale_tree import ScaleTree, tree_index, tree_static_shape

from helpers import DEVICE, needs_triton, rel_err

pytestmark = needs_triton


def split_mask(kind: str, batch: int, decisions: int, seed: int) -> torch.Tensor:
    if kind == "all":
        return torch.ones(batch, decisions, dtype=torch.bool, device=DEVICE)
    if kind == "none":
        return torch.zeros(batch, decisions, dtype=torch.bool, device=DEVICE)
    return (torch.rand(batch, decisions, generator=torch.Generator().manual_seed(seed)) < 0.5).to(DEVICE)


def tree_inputs(tree: ScaleTree, batch: int, patch: int, prefix: int, dim: int, seed: int, chans: int = 3):
    """float64 leaves (random, no zero init): images, weight, bias, pos_table, prefix, decisions."""
    gen = torch.Generator().manual_seed(seed)

    def param(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()

    h, w = tree.grids[0]
    images = torch.randn(batch, chans, h * patch, w * patch, generator=gen, dtype=torch.float64).to(DEVICE)
    leaves = dict(
        weight=param(dim, chans * patch * patch),
        bias=param(dim),
        pos_table=param(tree.offsets[-1], dim),
        prefix=param(prefix, dim) if prefix else None,
        # soft split values in (0, 1): every token weight is a distinct product, so a wrong entry shows
        decisions=torch.rand(batch, tree.decisions, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(),
    )
    return images, leaves


def pack_and_grads(fn, images, index, leaves, tree, patch, upstream):
    """``fn`` (kernel or reference) on ``leaves``; returns the output and the gradient of every leaf."""
    st = torch.cat(tree.token_weights(leaves["decisions"]), 1)
    tensors = {k: v for k, v in leaves.items() if k != "decisions"}
    out = fn(images, index, **tensors, st=st, fine_patch=patch, ratio=tree.ratio, scales=tree.scales)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), [leaves[k] for k in names])
    return out, dict(zip(names, grads))


def check_against_reference(tree, index, batch, patch, prefix, dim, seed):
    images, oracle = tree_inputs(tree, batch, patch, prefix, dim, seed)
    leaves = {k: v.detach().float().requires_grad_() if v is not None else None for k, v in oracle.items()}
    upstream = torch.randn(index.total, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    upstream = upstream.to(DEVICE)
    ref, expected = pack_and_grads(pack_reference, images, index, oracle, tree, patch, upstream)
    out, got = pack_and_grads(gather_embed_pack, images.float(), index, leaves, tree, patch, upstream)
    assert out.shape == ref.shape and out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    assert expected.keys() == got.keys()
    for name, e in expected.items():
        assert e.abs().max() > 0 and rel_err(got[name], e) <= 1e-5, name


@pytest.mark.parametrize(
    "scales, grid, ratio, patch, batch, prefix, dim",
    [
        (3, (6, 10), 2, 2, 3, 1, 20),  # grids 6x10, 3x5, 1x2: border roots at scales 0 and 1
        (3, (7, 5), 2, 2, 2, 0, 17),  # 7x5, 3x2, 1x1
        (3, (5, 5), 2, 4, 2, 2, 33),  # 5x5, 2x2, 1x1 with 4 px fine patches (K = 48)
        (4, (17, 9), 2, 2, 2, 1, 20),  # 17x9, 8x4, 4x2, 2x1: 8 x 8 taps for the 16 px tokens
        (3, (9, 10), 3, 2, 2, 1, 12),  # ratio 3: 9x10, 3x3, 1x1 (9 x 9 taps)
    ],
)
@pytest.mark.parametrize("kind", ["random", "all", "none"])
def test_tree_pack_matches_reference(scales, grid, ratio, patch, batch, prefix, dim, kind):
    tree = ScaleTree.of(grid, ratio, scales)
    index = tree_index(split_mask(kind, batch, tree.decisions, seed=dim), tree, prefix)
    seen = index.scale.unique().tolist()
    assert seen == [0] if kind == "all" else (seen[-1] == scales - 1 if kind == "none" else len(seen) > 1)
    check_against_reference(tree, index, batch, patch, prefix, dim, seed=dim)


def test_tree_pack_static_shape_fills_padding_rows_like_the_reference():
    tree, batch, prefix = ScaleTree.of((6, 10), 2, 3), 3, 1
    mask = split_mask("random", batch, tree.decisions, seed=4)
    exact = tree_index(mask, tree, prefix).total
    shape = tree_static_shape(batch, tree, prefix, capacity=exact + 7)
    index = tree_index(mask, tree, prefix, shape)
    assert index.total == exact + 7 and index.static
    check_against_reference(tree, index, batch, 2, prefix, 24, seed=4)


def test_tree_pack_without_optional_inputs_in_eager_inference_and_strided_images():
    tree, patch = ScaleTree.of((7, 5), 2, 3), 2
    index = tree_index(split_mask("random", 2, tree.decisions, seed=2), tree, 0)
    images, leaves = tree_inputs(tree, 2, patch, 0, 16, seed=2)
    strided = images.float().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
    weight = leaves["weight"].detach()
    with torch.no_grad():  # the launcher without the custom op (skips_custom_op)
        out = gather_embed_pack(strided, index, weight.float(), None, None, None, None, patch, 2, scales=3)
    ref = pack_reference(images, index, weight, None, None, None, None, patch, 2, scales=3)
    assert rel_err(out, ref) <= 1e-5


def test_tree_pack_rejects_unsupported_scales_and_a_two_scale_st():
    tree = ScaleTree.of((4, 4), 2, 3)
    index = tree_index(split_mask("random", 1, tree.decisions, seed=0), tree, 0)
    images, leaves = tree_inputs(tree, 1, 2, 0, 8, seed=0)
    weight = leaves["weight"].detach().float()
    for scales in (1, MAX_SCALES + 1, True, 3.0):
        with pytest.raises(ValueError, match=f"2 to {MAX_SCALES} scales"):
            gather_embed_pack(images.float(), index, weight, None, None, None, None, 2, 2, scales=scales)
    with pytest.raises(ValueError, match=r"token-weight table \[B, n_nodes\] = \[1, 21\]"):
        gather_embed_pack(images.float(), index, weight, None, None, torch.ones(1, 4), None, 2, 2, scales=3)


def test_two_scales_through_the_new_signature_is_the_old_call_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    batch, patch, dim, grid = 2, 4, 24, (3, 5)
    mask = torch.rand(batch, grid[0] * grid[1], generator=gen) < 0.5
    index = mixed_scale_index(mask.to(DEVICE), grid, 2, 1)
    images = torch.randn(batch, 3, grid[0] * 8 + 4, grid[1] * 8, generator=gen).to(DEVICE)  # a border row

    def leaves():
        g = torch.Generator().manual_seed(5)
        shapes = dict(
            weight=(dim, 3 * patch * patch),
            bias=(dim,),
            pos_table=(index.fine_to_row.shape[1] + 15, dim),
            st=(batch, 15),
            prefix=(1, dim),
        )
        return {k: torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for k, s in shapes.items()}

    upstream = torch.randn(index.total, dim, generator=gen).to(DEVICE)
    results = []
    for extra in ({}, {"scales": 2}):
        tensors = leaves()
        out = gather_embed_pack(images, index, **tensors, fine_patch=patch, ratio=2, **extra)
        grads = torch.autograd.grad((out * upstream).sum(), list(tensors.values()))
        with torch.no_grad():
            eager = gather_embed_pack(images, index, **tensors, fine_patch=patch, ratio=2, **extra)
        results.append([out.detach(), eager, *grads])
    for old, new in zip(*results):
        assert torch.equal(old, new)


def test_the_custom_op_with_scales_passes_opcheck():
    """Schema, fake tensor (register_fake) and autograd registration with the ``scales`` argument."""
    from msvit_kernels.pack_kernel import _pack_op

    tree = ScaleTree.of((6, 10), 2, 3)
    index = tree_index(split_mask("random", 2, tree.decisions, seed=1), tree, 1)
    images, leaves = tree_inputs(tree, 2, 2, 1, 8, seed=1)
    f32 = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    st = torch.cat(tree.token_weights(f32["decisions"]), 1).detach().flatten().requires_grad_()
    args = (images.float(), f32["weight"], f32["bias"], f32["pos_table"], st, f32["prefix"], index.rows, index.source)
    args += (index.position, index.region, index.prefix_rows, index.total, 2, 2, 3)
    torch.library.opcheck(_pack_op, args)
