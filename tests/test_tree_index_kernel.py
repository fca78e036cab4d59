"""The Triton tree index (msvit_kernels/tree_index_kernel.py) against its oracle ``scale_tree.tree_index``:
every field of the ``MixedScaleIndex``, element for element, for trees of 2 to 4 scales on grids with
border roots at every scale, static shapes with padding sequences, the host-read budget (1 without a
shape, 0 with one), the empty batch and bad arguments. Two scales also match ``mixed_scale_index``.

On a CPU-only machine the kernels run in the Triton interpreter (tests/conftest.py); shapes are tiny.
"""

import pytest
import torch

from msvit.host_reads import count_host_reads
from msvit_kernels import _triton
from msvit_kernels.scale_tree import ScaleTree, tree_index, tree_static_shape
from msvit_kernels.tree_index_kernel import triton_tree_index
from msvit_kernels.varlen import StaticShape, mixed_scale_index

from helpers import DEVICE, needs_triton

pytestmark = needs_triton

FIELDS = (
    "cu_seqlens", "max_seqlen", "total", "rows", "source", "position", "region", "is_fine", "prefix_rows",
    "row_image", "fine_to_row", "padding_sequences", "static", "scale",
)  # fmt: skip


def assert_same(got, expected, fields=FIELDS, where=""):
    for field in fields:
        a, b = getattr(got, field), getattr(expected, field)
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, (where, field, a, b)
            assert torch.equal(a.cpu(), b.cpu()), (where, field, a, b)
        else:
            assert a == b, (where, field, a, b)


def make_mask(kind: str, batch: int, decisions: int, seed: int = 0) -> torch.Tensor:
    if kind in ("split", "none"):
        return torch.full((batch, decisions), kind == "split", dtype=torch.bool, device=DEVICE)
    share = {"random": 0.5, "sparse": 0.2}[kind]
    return (torch.rand(batch, decisions, generator=torch.Generator().manual_seed(seed)) < share).to(DEVICE)


# (finest grid, ratio, scales): border roots at every scale below the top (7x5 with 3 scales: 2x1 top
# regions, one border row of scale 1 and one of scale 0), a whole grid, ratio 3, 4 scales.
TREES = [((7, 5), 2, 3), ((8, 8), 2, 3), ((9, 17), 2, 4), ((10, 20), 3, 3), ((7, 5), 2, 2)]


@pytest.mark.parametrize("grid, ratio, scales", TREES)
def test_equals_tree_index(grid, ratio, scales):
    tree = ScaleTree.of(grid, ratio, scales)
    for batch, prefix in ((1, 0), (2, 1), (3, 2)):
        for seed, kind in enumerate(("random", "sparse", "split", "none")):
            mask = make_mask(kind, batch, tree.decisions, seed)
            where = (grid, ratio, scales, batch, prefix, kind)
            assert_same(triton_tree_index(mask, tree, prefix), tree_index(mask, tree, prefix), where=where)


def test_two_scales_equal_mixed_scale_index():
    tree = ScaleTree.of((7, 9), 2, 2)  # coarse 3x4 regions, border row and column
    coarse, fine = tree.grids[1], tree.grids[0]
    for prefix, kind in ((0, "random"), (1, "split"), (2, "none")):
        mask = make_mask(kind, 3, tree.decisions, prefix)
        got = triton_tree_index(mask, tree, prefix)
        expected = mixed_scale_index(mask, coarse, 2, prefix, fine_grid=fine)
        assert_same(got, expected, FIELDS[:-1], where=(prefix, kind))
        assert torch.equal(got.scale, (~got.is_fine).long())


def test_strided_mask():
    tree = ScaleTree.of((7, 5), 2, 3)
    wide = make_mask("random", 2, 2 * tree.decisions, 3)
    mask = wide[:, ::2]
    assert not mask.is_contiguous()
    assert_same(triton_tree_index(mask, tree, 1), tree_index(mask.contiguous(), tree, 1))


@pytest.mark.parametrize("grid, ratio, scales", [((7, 5), 2, 3), ((9, 17), 2, 4)])
def test_static_shapes_pad_and_read_nothing(grid, ratio, scales):
    tree = ScaleTree.of(grid, ratio, scales)
    for batch, prefix, kind in ((3, 1, "random"), (2, 0, "sparse"), (1, 2, "none")):
        mask = make_mask(kind, batch, tree.decisions, batch)
        exact = tree_index(mask, tree, prefix).total
        most = batch * (prefix + tree.counts[0])
        for capacity in sorted({exact, min(exact + 7, most), most}):
            shape = tree_static_shape(batch, tree, prefix, capacity=capacity)
            with count_host_reads() as reads:
                got = triton_tree_index(mask, tree, prefix, shape)
            assert reads.count == 0, reads.report()
            expected = tree_index(mask, tree, prefix, shape)
            assert_same(got, expected, where=(batch, prefix, kind, capacity))
            if capacity == most and kind != "split":
                assert got.padding_sequences > 0 and got.static
        with count_host_reads() as reads:
            triton_tree_index(mask, tree, prefix)
        assert reads.count == 1, reads.report()  # (T, max_seqlen), once
    budget = tree_static_shape(2, tree, 1, splits=3)  # every image splits 3 nodes: exact length, no padding
    mask = torch.zeros(2, tree.decisions, dtype=torch.bool, device=DEVICE)
    mask[:, :3] = True  # the first 3 entries: each a top node or a child of a split one, so 3 splits
    with count_host_reads() as reads:
        got = triton_tree_index(mask, tree, 1, budget)
    assert reads.count == 0, reads.report()
    assert_same(got, tree_index(mask, tree, 1, budget))


def test_a_batch_over_the_capacity_fails():
    tree = ScaleTree.of((7, 5), 2, 3)
    mask = make_mask("split", 2, tree.decisions)
    shape = tree_static_shape(2, tree, 1, capacity=2 * (1 + tree.roots) + 1)
    with pytest.raises(RuntimeError, match="exceed the static capacity"):
        triton_tree_index(mask, tree, 1, shape)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()


def test_empty_batch():
    tree = ScaleTree.of((7, 5), 2, 3)
    mask = torch.zeros(0, tree.decisions, dtype=torch.bool, device=DEVICE)
    for prefix in (0, 2):
        with count_host_reads() as reads:
            got = triton_tree_index(mask, tree, prefix)
        assert reads.count == 1 and got.total == 0 and got.batch == 0
        assert_same(got, tree_index(mask, tree, prefix))
        shape = tree_static_shape(0, tree, prefix, capacity=0)
        assert_same(triton_tree_index(mask, tree, prefix, shape), tree_index(mask, tree, prefix, shape))


def test_a_grid_without_a_top_node_is_refused():
    """A finest grid narrower than one top patch (9x7 with 4 scales of 2: the top grid would be
    1x0) has no node of the coarsest scale: the tree is refused by name, before any kernel."""
    with pytest.raises(ValueError, match="no node of the coarsest of 4 scales"):
        ScaleTree.of((9, 7), 2, 4)


def test_recorded_launches_get_real_shapes():
    tree = ScaleTree.of((7, 5), 2, 3)
    mask = make_mask("random", 3, tree.decisions, 1)
    expected = tree_index(mask, tree, 1)
    with _triton.record_launches() as launches, count_host_reads() as reads:
        got = triton_tree_index(mask, tree, 1)
    assert [r.kernel.name for r in launches] == ["_tree_counts_kernel", "_tree_index_kernel"]
    assert reads.count == 1, reads.report()
    assert (got.total, got.max_seqlen) == (expected.total, expected.max_seqlen)
    assert torch.equal(got.cu_seqlens, expected.cu_seqlens) and got.rows.shape == expected.rows.shape


def test_bad_arguments_are_clear_errors():
    tree = ScaleTree.of((7, 5), 2, 3)
    good = torch.zeros(2, tree.decisions, dtype=torch.bool, device=DEVICE)
    with pytest.raises(TypeError, match=rf"bool tensor \[B, {tree.decisions}\].*torch.int64"):
        triton_tree_index(good.long(), tree, 1)
    with pytest.raises(TypeError, match="bool tensor"):
        triton_tree_index(good.tolist(), tree, 1)
    with pytest.raises(ValueError, match=rf"shape \[B, {tree.decisions}\].*got \(2, {tree.decisions + 1}\)"):
        triton_tree_index(torch.zeros(2, tree.decisions + 1, dtype=torch.bool, device=DEVICE), tree, 1)
    with pytest.raises(ValueError, match="shape"):
        triton_tree_index(good[0], tree, 1)
    with pytest.raises(ValueError, match="num_prefix"):
        triton_tree_index(good, tree, -1)
    with pytest.raises(TypeError, match="ScaleTree"):
        triton_tree_index(good, ((7, 5), 2, 3), 1)
    with pytest.raises(ValueError, match="ScaleTree.of"):
        triton_tree_index(good, ScaleTree(((7, 5), (3, 3), (1, 1)), 2), 1)
    with pytest.raises(TypeError, match="StaticShape"):
        triton_tree_index(good, tree, 1, (40, 30, 1))
    assert isinstance(tree_static_shape(2, tree, 1, capacity=60), StaticShape)
