"""The varlen contract: packed layout, index maps and unpacking to the fine grid."""

import pytest
import torch

from msvit_kernels import cu_seqlens_from_lengths, mixed_scale_index


def test_layout_of_a_small_batch_by_hand():
    # 2x2 coarse grid, ratio 2 (4x4 fine grid), one prefix token.
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    ix = mixed_scale_index(mask, (2, 2), 2, 1)
    assert ix.cu_seqlens.dtype == torch.int32
    assert ix.cu_seqlens.tolist() == [0, 11, 16] and ix.max_seqlen == 11 and ix.total == 16
    assert ix.prefix_rows.tolist() == [[0], [11]]
    # image 0: region 0 fine (fine cells 0, 1, 4, 5), regions 1, 2 coarse, region 3 fine (10, 11, 14, 15)
    assert ix.rows.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15]
    assert ix.position.tolist() == [0, 1, 4, 5, 16 + 1, 16 + 2, 10, 11, 14, 15, 16, 17, 18, 19]
    assert ix.source.tolist()[:6] == [0, 1, 4, 5, 2 * 16 + 1, 2 * 16 + 2]
    assert ix.source.tolist()[10:] == [2 * 16 + 4, 2 * 16 + 5, 2 * 16 + 6, 2 * 16 + 7]
    assert ix.fine_to_row[0].tolist() == [1, 2, 5, 5, 3, 4, 5, 5, 6, 6, 7, 8, 6, 6, 9, 10]
    assert ix.fine_to_row[1].tolist() == [12, 12, 13, 13, 12, 12, 13, 13, 14, 14, 15, 15, 14, 14, 15, 15]
    assert ix.row_image.tolist() == [0] * 11 + [1] * 5


@pytest.mark.parametrize("batch,grid,ratio,prefix", [(1, (3, 5), 2, 1), (3, (2, 3), 3, 0), (4, (4, 4), 2, 5)])
def test_index_properties_on_random_masks(batch, grid, ratio, prefix):
    torch.manual_seed(batch)
    n_coarse = grid[0] * grid[1]
    mask = torch.rand(batch, n_coarse) < 0.5
    ix = mixed_scale_index(mask, grid, ratio, prefix)
    lengths = prefix + n_coarse + (ratio**2 - 1) * mask.sum(1)
    assert torch.equal(ix.cu_seqlens, cu_seqlens_from_lengths(lengths))
    assert ix.max_seqlen == int(lengths.max()) and ix.total == int(lengths.sum())
    # prefix rows and patch rows partition the packed rows
    all_rows = torch.cat([ix.prefix_rows.flatten(), ix.rows]).sort().values
    assert torch.equal(all_rows, torch.arange(ix.total))
    assert torch.equal(ix.row_image[ix.rows], ix.region // n_coarse)
    assert torch.equal(ix.is_fine, mask.flatten()[ix.region])
    # every fine cell is covered by a row of its own image; fine cells of fine regions by distinct rows
    assert torch.equal(ix.row_image[ix.fine_to_row], torch.arange(batch)[:, None].expand_as(ix.fine_to_row))
    fine_rows = ix.rows[ix.is_fine]
    assert fine_rows.unique().numel() == fine_rows.numel()
    assert set(ix.fine_to_row.flatten().tolist()) == set(ix.rows.tolist())


GOOD = (torch.zeros(2, 6, dtype=torch.bool), (2, 3), 2, 1)


@pytest.mark.parametrize(
    "position,value,error,match",
    [
        (2, 0, ValueError, r"ratio \(coarse patch / fine patch\) must be an integer >= 1, got 0"),
        (2, 2.0, ValueError, "ratio .* must be an integer >= 1, got 2.0"),
        (3, -1, ValueError, r"num_prefix \(prefix tokens per image\) must be an integer >= 0, got -1"),
        (1, (2, 3, 1), ValueError, r"coarse_grid must be \(h, w\), two integers >= 1"),
        (0, torch.zeros(2, 6, dtype=torch.long), TypeError, r"mask must be a bool tensor \[B, 6\].*got torch.int64"),
        (0, torch.zeros(2, 7, dtype=torch.bool), ValueError, r"shape \[B, 6\]: one entry per region of the 2x3 coarse"),
        (0, torch.zeros(12, dtype=torch.bool), ValueError, r"mask must have shape \[B, 6\].*got \(12,\)"),
    ],
)
@pytest.mark.parametrize("build", ["mixed_scale_index", "triton_mixed_scale_index"])
def test_bad_index_arguments_say_what_was_expected(build, position, value, error, match):
    """ratio 0 used to return a layout; the others failed with raw torch errors. The Triton twin
    shares the checks (they run before any kernel, so on CPU too)."""
    import msvit_kernels

    args = list(GOOD)
    args[position] = value
    with pytest.raises(error, match=match):
        getattr(msvit_kernels, build)(*args)
    mixed_scale_index(*GOOD)  # the good arguments build
