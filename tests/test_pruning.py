"""EViT-style pruning on packed tokens: keep-all is the model, counts drop per image as configured,
the varlen bookkeeping matches per-image runs, and the kept/fused rows are the right ones."""

import math

import pytest
import torch

import msvit
from msvit.models.pruning import PruneConfig, PrunedIndex, PrunedMSViT, cls_attention, prune_tokens
from msvit_kernels.varlen import mixed_scale_index

from helpers import rel_err, tiny_vit


@pytest.fixture(scope="module")
def model():
    return msvit.from_timm(tiny_vit(depth=4, reg_tokens=1)).eval()


def random_mask(batch=3, seed=0):
    return torch.rand(batch, 16, generator=torch.Generator().manual_seed(seed)) < 0.5


def test_keep_all_equals_the_unpruned_model_exactly(model):
    images, mask = torch.randn(3, 3, 64, 64), random_mask()
    pruned = PrunedMSViT(model, keep_ratio=1.0, layers=(0, 2), fuse=True)
    with torch.no_grad():
        out = pruned(images, mask=mask, return_gate=True)
        assert torch.equal(out.logits, model(images, mask=mask))
    assert type(out) is msvit.MSViTOutput  # one output type for every MSViT model
    assert torch.equal(out.tokens, model.tokens_per_image(mask)[None].expand(3, -1))


@pytest.mark.parametrize("fuse", [True, False])
def test_token_counts_per_image_drop_as_configured(model, fuse):
    images, mask = torch.randn(3, 3, 64, 64), random_mask(seed=1)
    config = PruneConfig(keep_ratio=0.7, layers=(2, 1), fuse=fuse)  # order does not matter
    with torch.no_grad():
        tokens = PrunedMSViT(model, config=config)(images, mask=mask, return_gate=True).tokens
    n = model.tokens_per_image(mask) - 2  # two prefix tokens: cls and a register
    expected = [n + 2]
    for _ in config.layers:
        kept = torch.tensor([math.ceil(round(v * 0.7, 9)) for v in n.tolist()])
        n = kept + (fuse & (kept < n)).long()
        expected.append(n + 2)
    assert torch.equal(tokens, torch.stack(expected))
    assert len(set(tokens[-1].tolist())) > 1  # each image keeps its own count


def test_batch_equals_each_image_alone(model):
    """Varlen correctness: pruning is per image, so the batch gives each image's own result."""
    images, mask = torch.randn(3, 3, 64, 64), random_mask(seed=2)
    pruned = PrunedMSViT(model, keep_ratio=0.5, layers=(0, 2))
    with torch.no_grad():
        batch = pruned(images, mask=mask)
        alone = torch.cat([pruned(images[i : i + 1], mask=mask[i : i + 1]) for i in range(3)])
    assert rel_err(batch, alone) <= 1e-5


def test_cls_attention_matches_a_dense_softmax():
    heads, dim = 2, 4
    index = PrunedIndex.from_packed(mixed_scale_index(torch.tensor([[True], [False], [True]]), (1, 1), 2, 1))
    lengths = (index.cu_seqlens[1:] - index.cu_seqlens[:-1]).tolist()
    q, k = torch.randn(2, index.total, heads, dim, dtype=torch.float64).unbind(0)
    got = cls_attention(q, k, 0.5, index)
    for start, n in zip(index.cu_seqlens[:-1].tolist(), lengths):
        scores = torch.einsum("hd,thd->ht", q[start], k[start : start + n]) * 0.5
        assert torch.allclose(got[start : start + n], scores.softmax(-1).mean(0), atol=1e-12)


def test_prune_tokens_keeps_the_top_rows_and_fuses_the_rest():
    mask = torch.tensor([[True, True], [False, True]])
    index = PrunedIndex.from_packed(mixed_scale_index(mask, (1, 2), 2, 1))  # 9 and 6 rows
    x = torch.randn(index.total, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(index.total, dtype=torch.float64)
    out, new = prune_tokens(x, scores, index, keep_ratio=0.5, fuse=True)
    assert new.cu_seqlens.tolist() == [0, 6, 11] and new.max_seqlen == 6 and new.total == 11
    for b, (s, e) in enumerate([(0, 9), (9, 15)]):
        patch = torch.arange(s + 1, e)
        top = patch[scores[patch].argsort(descending=True)[: math.ceil(0.5 * len(patch))]].sort().values
        rest = patch[~torch.isin(patch, top)]
        rows = new.origin[new.row_image == b]
        assert rows.tolist() == [s] + top.tolist() + [-1]
        fused = (x[rest] * scores[rest, None]).sum(0) / scores[rest].sum()
        assert torch.allclose(out[new.cu_seqlens[b + 1] - 1], fused)
    assert new.prefix_rows.flatten().tolist() == [0, 6]
    assert sorted(new.rows.tolist()) == [r for r in range(11) if r not in (0, 6)]
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_gradients_reach_the_backbone_and_the_gate_through_pruning():
    model = msvit.from_timm(tiny_vit(depth=3), init_logit=0.0).train()
    pruned = PrunedMSViT(model, keep_ratio=0.6, layers=(0, 1))
    out = pruned(torch.randn(2, 3, 64, 64), return_gate=True)
    out.logits.square().sum().backward()
    assert model.blocks[2].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.gate.fc4.weight.grad.abs().sum() > 0


def test_bad_configurations_fail_clearly(model):
    for ratio in (0, 1.5, True):
        with pytest.raises(ValueError, match="keep_ratio"):
            PruneConfig(keep_ratio=ratio)
    with pytest.raises(ValueError, match="distinct non-negative"):
        PruneConfig(layers=(1, 1))
    with pytest.raises(ValueError, match="below the model's depth 4"):
        PrunedMSViT(model, layers=(4,))
    no_cls = msvit.from_timm(tiny_vit(class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="no class token"):
        PrunedMSViT(no_cls)
    with pytest.raises(TypeError, match="msvit.MSViT"):
        PrunedMSViT(tiny_vit())
