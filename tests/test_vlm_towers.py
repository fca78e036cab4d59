"""The VLM towers (timm's qwen3_vit_*, deepseek_vit_*, gemma4_vit_*) through from_timm: all-fine
equals timm (classifier logits, projected _enc tokens) on re-drawn parameters at several sizes and
aspect ratios; packed == masked == trimmed on random masks (two and three scales); MACs equal
FlopCounterMode's; the LLM-token options (docs/design.md section 17). Depth-reduced, narrow
random towers: nothing is downloaded."""

import re

import pytest
import timm
import torch
from timm.models import list_models
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import msvit
from msvit.models.flops import count_macs

from helpers import counted_macs, redraw_parameters, rel_err

FAMILY_SIZES = {  # (patch, projector window, image sizes: H x W, several aspect ratios)
    "qwen3": (16, 2, [(64, 64), (96, 64), (64, 128)]),
    "deepseek": (14, 3, [(84, 84), (126, 84), (56, 98)]),
    "gemma4": (16, 3, [(96, 96), (144, 96), (96, 192)]),
}
NAMES = sorted(list_models("qwen3_vit_*") + list_models("deepseek_vit_*") + list_models("gemma4_vit_*"))


def family(name):
    return name.split("_")[0]


def small_kwargs(name):
    """A narrow, depth-2 configuration of the tower ``name`` (its constructor's own arguments)."""
    kwargs = dict(pretrained=False, depth=2, embed_dim=64, num_heads=4)
    if family(name) == "gemma4":
        kwargs.update(head_dim=16, intermediate_size=96, position_embedding_size=32)
    else:
        kwargs.update(img_size=FAMILY_SIZES[family(name)][2][0])
    if name.endswith(("_enc", "_merge", "_align")) and family(name) != "gemma4":
        kwargs["out_features"] = 48
    if not name.endswith("_enc"):
        kwargs["num_classes"] = 5
    return kwargs


def build(name, **extra):
    torch.manual_seed(0)
    model = redraw_parameters(timm.create_model(name, **{**small_kwargs(name), **extra}).eval())
    for module in model.modules():  # Gemma's clamped linears: finite clamps that do act on the re-drawn model
        if hasattr(module, "input_min"):
            module.input_min.fill_(-2.0), module.input_max.fill_(2.0)
            module.output_min.fill_(-3.0), module.output_max.fill_(3.0)
    return model


def images(name, size, batch=2, seed=0):
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    return x if family(name) == "gemma4" else 2 * x - 1  # Gemma takes [0, 1] pixels, normalises itself


def all_fine(model, x):
    h, w = model.coarse_grid(x)
    return torch.ones(x.shape[0], h * w, dtype=torch.bool)


def test_every_registered_tower_is_tested():
    assert len(NAMES) == 16, NAMES  # timm 1.0.31: 9 Qwen, 3 DeepSeek, 4 Gemma 4 names


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_and_all_fine_equals_timm(name):
    tower = build(name)
    model = msvit.from_timm(tower).eval()
    patch, window, sizes = FAMILY_SIZES[family(name)]
    assert model.tokenizer.coarse_patch == window * patch  # the coarse token fills one projector window
    for size in sizes:
        x = images(name, size)
        with torch.no_grad():
            expected = tower(x)
            got = model(x, mask=all_fine(model, x))
        assert got.shape == expected.shape
        assert expected.std() > 0.05, "the re-drawn tower's output must depend on the image"
        assert rel_err(got, expected) <= 1e-4, size


def test_from_timm_takes_names():
    model = msvit.from_timm("qwen3_vit_88m_enc", timm_kwargs=small_kwargs("qwen3_vit_88m_enc"))
    assert model.encoder and model.projector.window == 2 and model.num_classes == 0


ONE_PER_KIND = [  # a classifier, a classifier with the projector and an encoder of each family
    "qwen3_vit_88m",
    "qwen3_vit_88m_merge",
    "qwen3_vit_88m_enc",
    "deepseek_vit_412m",
    "deepseek_vit_412m_align",
    "deepseek_vit_412m_enc",
    "gemma4_vit_167m",
    "gemma4_vit_570m_enc",
]


@pytest.mark.parametrize("name", ONE_PER_KIND)
@pytest.mark.parametrize("three_scales", [False, True])
def test_packed_equals_masked_and_trimmed_on_random_masks(name, three_scales):
    patch, window, sizes = FAMILY_SIZES[family(name)]
    scales = (patch, patch * window, patch * window**2) if three_scales else None
    size = (patch * window**2, patch * window**2) if three_scales else sizes[1]
    model = msvit.from_timm(build(name, img_size=size[0]), scales=scales).eval()  # Gemma: a 768 px grid
    x = images(name, size, batch=3)
    shape = model.gate_mask(x).shape
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        packed = model(x, mask=mask)
        for mode in ("masked", "trimmed"):
            assert rel_err(model(x, mask=mask, mode=mode), packed) <= 1e-4, mode
        assert torch.equal(model.forward_head(model.forward_features(x, mask=mask)), packed)


# timm ops FlopCounterMode counts that are no multiply-accumulates of the model: Gemma 4 looks its
# position table up by a one-hot matrix product, builds RoPE angles and pools windows by matmuls
NOT_MACS = {"patch_embed": -1, "patch_embed.input_proj": +1, "rotary_emb": -1, "pooler": -1}


@pytest.mark.parametrize("name", ONE_PER_KIND)
def test_macs_equal_flop_counter(name):
    tower = build(name)
    model = msvit.from_timm(tower).eval()
    x = images(name, FAMILY_SIZES[family(name)][2][2], batch=1)
    ours = count_macs(model, x, mask=all_fine(model, x), include_gate=False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(x)
    counts = {k.partition(".")[2]: sum(v.values()) / 2 for k, v in counter.get_flop_counts().items()}
    prefix = "encoder." if hasattr(tower, "encoder") else ""
    if family(name) == "gemma4":
        adjust = sum(sign * counts.get(prefix + module, 0) for module, sign in NOT_MACS.items())
        assert ours.item() == counter.get_total_flops() / 2 + adjust
    else:
        assert ours.item() == counted_macs(tower, x)


def test_merged_llm_tokens_are_the_replicated_ones_once_per_coarse_token():
    model = msvit.from_timm(build("qwen3_vit_88m_enc"), scales=(16, 32, 64)).eval()
    x = images("qwen3_vit_88m_enc", (128, 128))
    splits = model.gate_mask(x).shape[1]  # 4 roots of 64 px, each splits into 4 windows of 32 px
    mask = torch.zeros(2, splits, dtype=torch.bool)
    mask[1, 0] = True  # image 1: its first 64 px node is split into 32 px tokens
    replicated = model.encode(x, mask=mask)
    merged = model.encode(x, mask=mask, llm_tokens="merged")
    assert replicated.tokens.shape[0] == 2 * 16
    assert merged.cu_seqlens.tolist() == [0, 4, 4 + 3 + 4]  # 4 coarse tokens; 3 kept + 4 split windows
    assert merged.span.tolist() == [2] * 4 + [1, 1, 2, 1, 1, 2, 2]  # raster order of first windows
    rows = merged.window + torch.repeat_interleave(torch.tensor([0, 16]), torch.diff(merged.cu_seqlens).long())
    assert torch.equal(merged.tokens, replicated.tokens[rows])  # the same values, fewer copies
    assert torch.equal(model(x, mask=mask), replicated.tokens.view(2, 16, -1))
    model.llm_tokens = "merged"
    assert [t.shape[0] for t in model(x, mask=mask)] == [4, 7]


def test_merged_equals_replicate_when_coarse_tokens_fill_one_window():
    model = msvit.from_timm(build("qwen3_vit_88m_enc")).eval()  # coarse 32 px = the 2x2 window
    x = images("qwen3_vit_88m_enc", (64, 128))
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    merged, replicated = model.encode(x, mask=mask, llm_tokens="merged"), model.encode(x, mask=mask)
    assert torch.equal(merged.tokens, replicated.tokens) and (merged.span == 1).all()


@pytest.mark.parametrize("gate", ["learned", "entropy"])
def test_gates_run_on_towers_and_the_learned_gate_gets_gradients(gate):
    model = msvit.from_timm(build("qwen3_vit_88m"), gate=gate)
    x = images("qwen3_vit_88m", (64, 128))
    model.eval()
    with torch.no_grad():
        out = model(x, return_gate=True)
    assert out.logits.shape == (2, 5) and out.gate.hard.shape == (2, 8)
    if gate == "learned":
        model.train()
        model(x).square().mean().backward()
        assert model.gate.fc1.weight.grad is not None and model.gate.fc1.weight.grad.abs().sum() > 0


def test_bad_inputs_are_refused_with_the_reason():
    model = msvit.from_timm(build("qwen3_vit_88m_enc")).eval()
    with pytest.raises(ValueError, match="Qwen's merger merges 2x2 patches.*3x4 patches"):
        model(images("qwen3_vit_88m_enc", (48, 64)))
    with pytest.raises(ValueError, match="unknown llm_tokens 'few'"):
        model.llm_tokens = "few"
    classifier = msvit.from_timm(build("qwen3_vit_88m"))
    with pytest.raises(ValueError, match="llm_tokens='merged' needs a tower with a projector"):
        classifier.llm_tokens = "merged"
    with pytest.raises(NotImplementedError, match=re.escape("global_pool (Qwen3VitEncoder) uses no pooling")):
        msvit.from_timm(build("qwen3_vit_88m_enc", global_pool=""))


@pytest.mark.parametrize("name", ["qwen3_vit_88m_enc", "qwen3_vit_88m", "deepseek_vit_412m", "gemma4_vit_167m_enc"])
def test_a_list_of_sizes_runs_in_one_packed_forward_equal_to_each_image_alone(name):
    """Native resolution through a projector (docs/design.md section 17): each image's projected
    tokens (an encoder: a list of [windows_b, D]) or logits equal the image alone, packed with and
    without a budget, and the dense baselines equal the packed list; RoPE (Qwen, Gemma) per image grid."""
    model = msvit.from_timm(build(name)).eval()
    sizes = FAMILY_SIZES[family(name)][2]  # three aspect ratios
    ims = [images(name, size, batch=1, seed=i)[0] for i, size in enumerate(sizes)]
    with torch.no_grad():
        for budget in (None, 0.5):
            out = model(ims, budget=budget, return_gate=True)
            assert len(out.logits) == len(ims) and out.tokens.shape == (len(ims),)
            for b, image in enumerate(ims):
                alone = model(image[None], budget=budget, return_gate=True)
                assert rel_err(out.logits[b], alone.logits[0]) <= 1e-5, (budget, b)
                assert out.tokens[b] == alone.tokens[0]
            if model.encoder:
                assert [o.shape[0] for o in out.logits] == [
                    model.projector.window_grid(model.tokenizer.grids(im[None])[0])[0]
                    * model.projector.window_grid(model.tokenizer.grids(im[None])[0])[1]
                    for im in ims
                ]
        masks = model.gate_mask(ims, budget=0.5)
        packed = model(ims, mask=masks)
        for mode in ("masked", "trimmed"):
            dense = model(ims, mask=masks, mode=mode)
            assert all(rel_err(a, b) <= 1e-4 for a, b in zip(dense, packed)), mode


def test_a_nan_in_one_image_of_a_list_changes_no_other_images_tokens():
    model = msvit.from_timm(build("qwen3_vit_88m_enc")).eval()
    ims = [images("qwen3_vit_88m_enc", size, batch=1, seed=i)[0] for i, size in enumerate(FAMILY_SIZES["qwen3"][2])]
    bad = [image.clone() for image in ims]
    bad[1][:, 5, 7] = float("nan")
    with torch.no_grad():
        clean, out = model(ims, budget=0.5), model(bad, budget=0.5)
    assert torch.equal(out[0], clean[0]) and torch.equal(out[2], clean[2]) and out[1].isnan().any()
    with pytest.raises(ValueError, match="empty list"):
        model([])


def test_a_list_with_a_grid_the_projector_cannot_merge_is_refused_naming_the_image():
    model = msvit.from_timm(build("qwen3_vit_88m_enc")).eval()
    ims = [images("qwen3_vit_88m_enc", (64, 64), batch=1)[0], images("qwen3_vit_88m_enc", (48, 64), batch=1)[0]]
    with pytest.raises(ValueError, match=r"images\[1\]: Qwen's merger merges 2x2 patches.*3x4 patches"):
        model(ims)
    masks = model.gate_mask(ims[:1])
    with pytest.raises(ValueError, match="mask has 1 entries for 2 images"):
        model([ims[0], ims[0]], mask=masks, mode="masked")
    model.llm_tokens = "merged"
    with pytest.raises(ValueError, match="llm_tokens='merged' take a \\[B, C, H, W\\] batch"):
        model(ims[:1])


def test_gemma4_classifier_with_the_soft_pool_equals_timm():
    tower = build("gemma4_vit_167m", encoder_pool="soft", standardize=True)
    model = msvit.from_timm(tower).eval()
    x = images("gemma4_vit_167m", (96, 144))
    with torch.no_grad():
        assert rel_err(model(x, mask=all_fine(model, x)), tower(x)) <= 1e-4
        mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) < 0.5
        assert rel_err(model(x, mask=mask, mode="masked"), model(x, mask=mask)) <= 1e-4


def test_gemma4_grouped_query_attention_equals_timm():
    tower = build("gemma4_vit_167m_enc", num_kv_heads=2)
    model = msvit.from_timm(tower).eval()
    x = images("gemma4_vit_167m_enc", (96, 96))
    with torch.no_grad():
        assert rel_err(model(x, mask=all_fine(model, x)), tower(x)) <= 1e-4


def test_remaining_refusals_name_the_module_and_reason():
    with pytest.raises(NotImplementedError, match=re.escape("encoder.patch_embed (PatchEmbed) uses dynamic_img_pad")):
        msvit.from_timm(build("deepseek_vit_412m", dynamic_img_pad=True))
    with pytest.raises(NotImplementedError, match=re.escape("global_pool (Gemma4VitEncoder) uses no pooling")):
        msvit.from_timm(build("gemma4_vit_167m_enc", global_pool="none"))
    with pytest.raises(ValueError, match="position table holds 32 positions per axis; images of 36x36"):
        msvit.from_timm(build("gemma4_vit_167m")).eval()(images("gemma4_vit_167m", (576, 576), batch=1))


@pytest.mark.parametrize("name", ["qwen3_vit_88m", "gemma4_vit_167m"])
def test_msvit_train_fine_tunes_a_tower_classifier_with_the_gate(tmp_path, name):
    """A smoke run of `msvit train` on the digits (tiny tower, learned gate); the checkpoint
    reloads into the same tower."""
    import json

    from test_train import small_run

    from msvit.train import train

    kwargs = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    if family(name) == "gemma4":
        kwargs.update(head_dim=16, intermediate_size=64, position_embedding_size=16)
    args = small_run(tmp_path, "--model", name, "--epochs", "1", "--max-steps", "2")
    args.model_kwargs = json.dumps(kwargs)
    train(args)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["train_task"] > 0
    model = msvit.load_checkpoint(tmp_path).eval()
    assert type(model).__name__ == "VLMTower" and model.num_classes == 10


def test_committed_bench_table_is_its_json_and_its_counts_are_consistent():
    """bench/vlm_towers.py's recorded Markdown is what its JSON says; tokens lie between the
    coarsest layout and timm's, merged LLM tokens never exceed timm's count, fewer tokens cost fewer MACs."""
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    from vlm_towers import markdown

    (folder,) = {p.parent for p in (bench / "results").glob("*/vlm_towers.json")}
    result = json.loads((folder / "vlm_towers.json").read_text())
    assert markdown(result) == (folder / "vlm_towers.md").read_text()
    for row in result["tokens"]:
        h, w = row["size"]
        patch = 14 if row["tower"].startswith("deepseek") else 16
        assert row["timm_tokens"] == (h // patch) * (w // patch)
        for scales in ("two", "three"):
            if f"{scales}_tokens" in row:
                assert row[f"{scales}_tokens"] <= row["timm_tokens"]
                assert row[f"{scales}_llm_merged"] <= row["llm_replicate"]
                assert row[f"{scales}_gmacs"] <= row["timm_gmacs"]
