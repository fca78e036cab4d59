"""APT's zero-initialised aggregation at three scales (``from_timm(scales=(p, 2p, 4p),
aggregate="zero_conv")``): APT's own per-token computation ("Apply twice for 64s" in its
``TokenizedZeroConvPatchAttn.forward``) re-implemented here gives the package's terms; packed, masked
and trimmed agree; static shapes, MACs, host reads and checkpoints."""

import json

import torch

import msvit
from msvit.host_reads import count_host_reads
from msvit.io.checkpoint import CONFIG, load_checkpoint, save_checkpoint
from msvit.models.flops import count_macs

from helpers import TINY_MODEL, counted_macs, redraw_parameters, rel_err, tiny_vit

SCALES = (8, 16, 32)


def models(img_size=(64, 96)):
    """(3-scale zero_conv MSViT with every parameter re-drawn, the aggregation's too; the "shared"
    MSViT with the same other parameters)."""
    vit = tiny_vit(img_size=img_size)
    zero = msvit.from_timm(vit, scales=SCALES, aggregate="zero_conv").eval()
    redraw_parameters(zero)
    shared = msvit.from_timm(vit, scales=SCALES).eval()
    shared.load_state_dict({k: v for k, v in zero.state_dict().items() if "aggregation" not in k})
    return zero, shared


def images(batch, size, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def split_mask(model, x, share, seed=2):
    tree = model.tokenizer.tree(model.tokenizer.grids(x)[0])
    return torch.rand(x.shape[0], tree.decisions, generator=torch.Generator().manual_seed(seed)) < share


def apt_term(model, image, s, y, x):
    """The term APT adds to the scale-s token at node (y, x), as its code computes it: the node's
    (2^s)^2 base sub-patches, each through ``patch_embed.forward_patch`` (projection, norm),
    ``view(-1, n, n, d).permute(0, 3, 1, 2)``, the 2x2 conv applied s times, then the linear layer."""
    tok, p = model.tokenizer, model.tokenizer.fine_patch
    n, size = 2**s, p * 2**s
    block = image[:, y * size : (y + 1) * size, x * size : (x + 1) * size]
    subs = block.unfold(1, p, p).unfold(2, p, p).permute(1, 2, 0, 3, 4).reshape(n * n, -1)  # raster, (C, p, p)
    grid = tok.embed_norm(tok.embed(subs)).view(1, n, n, -1).permute(0, 3, 1, 2)
    for _ in range(s):
        grid = tok.aggregation.conv(grid)
    return tok.aggregation.linear(grid.flatten(1))[0]


def test_the_terms_are_apts_per_token_computation():
    zero, _ = models()
    x = images(2, (72, 104))  # a border row and column of 8 px cells outside the 32 px nodes
    tree = zero.tokenizer.tree(zero.tokenizer.grids(x)[0])
    with torch.no_grad():
        table = zero.tokenizer.tree_aggregated(x, tree)
        for s in (1, 2):
            h, w = tree.grids[s]
            for b in range(2):
                for y in range(h):
                    for c in range(w):
                        got = table[b, tree.offsets[s] + y * w + c]
                        assert rel_err(got, apt_term(zero, x[b], s, y, c)) <= 1e-5, (s, b, y, c)
        assert not table[:, : tree.counts[0]].any()  # finest tokens take no term


def test_zero_weights_give_the_shared_embedding_exactly():
    zero, shared = models()
    with torch.no_grad():
        zero.tokenizer.aggregation.linear.weight.zero_()
        zero.tokenizer.aggregation.linear.bias.zero_()
    x = images(3, (64, 96))
    mask = split_mask(zero, x, 0.5)
    with torch.no_grad():
        for mode in ("packed", "masked", "trimmed"):
            assert torch.equal(zero(x, mask=mask, mode=mode), shared(x, mask=mask, mode=mode)), mode
        assert torch.equal(zero(x, budget=2), shared(x, budget=2))


def test_random_weights_agree_across_modes_and_static_shapes():
    zero, shared = models()
    for size in ((64, 96), (72, 104)):
        x = images(3, size)
        with torch.no_grad():
            for seed, share in ((2, 0.5), (3, 0.8), (4, 0.0), (5, 1.0)):
                mask = split_mask(zero, x, share, seed)
                packed = zero(x, mask=mask)
                for mode in ("masked", "trimmed"):
                    assert rel_err(zero(x, mask=mask, mode=mode), packed) <= 1e-5, (size, mode, share)
                tokens = int(zero.tokens_per_image(mask, images=x).sum())
                most = 3 * (1 + (size[0] // 8) * (size[1] // 8))  # every image all finest
                assert rel_err(zero(x, mask=mask, capacity=(tokens + most) // 2), packed) <= 1e-6
                if share < 1:  # some node of a scale >= 1 is a token
                    assert rel_err(packed, shared(x, mask=mask)) > 1e-3
            assert rel_err(zero(x, budget=3), zero(x, mask=zero.gate_mask(x, budget=3))) <= 1e-6


def test_gradients_reach_the_conv_and_the_linear_layer():
    zero, _ = models()
    x = images(2, (64, 96))
    zero.train()
    zero(x, mask=split_mask(zero, x, 0.5)).square().mean().backward()
    for name, p in zero.tokenizer.aggregation.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_macs_count_every_node_and_match_the_flop_counter():
    zero, shared = models()
    x = images(1, (64, 96))
    mask = split_mask(zero, x, 0.5)
    d, r, k = 48, 2, 3 * 8 * 8
    n_fine, n_nodes = 8 * 12, 4 * 6 + 2 * 3  # 8 px cells; 16 and 32 px nodes
    expected = n_fine * k * d + n_nodes * (r * r * d * d + d * d)
    ours = count_macs(zero, x, mask=mask, include_gate=False, breakdown=True)
    assert ours["aggregation"].item() == expected
    assert ours["total"].item() - count_macs(shared, x, mask=mask, include_gate=False).item() == expected
    counted = counted_macs(lambda im: zero(im, mask=mask), x)
    assert counted - counted_macs(lambda im: shared(im, mask=mask), x) == expected
    assert abs(ours["total"].item() / counted - 1) < 1e-3


def test_no_host_read_with_static_shapes():
    zero, shared = models()
    x = images(2, (64, 96))
    counts = []
    with torch.no_grad():
        for call in (lambda: zero(x, budget=3), lambda: zero(x), lambda: shared(x)):
            with count_host_reads() as reads:
                call()
            counts.append(reads.count)
    assert counts[0] == 0 and counts[1] == counts[2]


def test_a_checkpoint_rebuilds_three_scales_with_the_aggregation(tmp_path):
    config = {
        "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 64}},
        "msvit": {"scales": list(SCALES), "hidden": 16},
    }
    torch.manual_seed(0)
    model = msvit.from_timm(
        "vit_tiny_patch16_224", timm_kwargs=config["timm"]["kwargs"], aggregate="zero_conv", **config["msvit"]
    ).eval()
    redraw_parameters(model.tokenizer.aggregation)
    save_checkpoint(tmp_path, model, config)  # the recipe does not name the aggregation: the record does
    assert json.loads((tmp_path / CONFIG).read_text())["architecture"]["aggregate"] == "zero_conv"
    loaded = load_checkpoint(tmp_path)
    x = images(2, (64, 64))
    mask = split_mask(model, x, 0.5)
    with torch.no_grad():
        assert torch.equal(loaded(x, mask=mask), model(x, mask=mask))
