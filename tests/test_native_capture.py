"""``msvit.compile_packed(model, max_images, max_pixels=N)``: captured / compiled packed inference
for lists of images of different sizes (docs/design.md section 19). One graph per token bucket
serves every size mix that fits; equal to the eager list forward; no host read with a budget."""

import pytest
import timm
import torch
import torch._dynamo

import msvit
from msvit.host_reads import count_host_reads
from msvit.models.list_runner import ListRunner
from msvit_kernels.padded_batch import ListCapacity, padded_batch_index, padded_layout
from msvit_kernels.reference import pack_reference
from msvit_kernels.tree_batch import batch_index
from msvit_kernels.varlen import lengths_within

from helpers import cpu_graph_stand_in, needs_triton, redraw_parameters, rel_err, tiny_vit

SIZE = (64, 96)  # patch 8, coarse 16
MAX_IMAGES, MAX_PIXELS = 4, 4 * 64 * 64  # 256 finest patches: buckets 68, 132, 196, 260 rows by default
# (H, W) mixes: 1:2; 10:3 with a border column; borders on both sides; the smallest image (one region);
# the first mix again in the other order; the model's own size first (its position table is then the
# parameter itself, not a resampled copy: a graph input must not differ from one mix to the next)
MIXES = (
    ((32, 64), (80, 24)),
    ((40, 56), (64, 64), (16, 16)),
    ((80, 24),),
    ((80, 24), (32, 64), (16, 16), (16, 32)),
    (SIZE, (16, 16)),
)


def tiny_model(**kwargs):
    return msvit.from_timm(redraw_parameters(tiny_vit(img_size=SIZE)), kernels="reference", **kwargs).eval()


def images_of(mix, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen).to(dtype) for h, w in mix]


def check_equal_to_eager(runner, model, budget, mixes=MIXES, masks=False):
    """runner == model(images, budget=...) on every mix (``masks``: also with random masks given);
    returns the token counts eager kept."""
    tokens = []
    for seed, mix in enumerate(mixes):
        images = images_of(mix, seed)
        with torch.no_grad():
            expected = model(images, budget=budget, return_gate=True)
        got = runner(images)
        assert got.shape == expected.logits.shape and rel_err(got, expected.logits) <= 1e-5, mix
        tokens.append(expected.tokens.tolist())
        if masks:
            gen = torch.Generator().manual_seed(seed)
            given = [torch.rand(n, generator=gen) > 0.5 for n in model.batch_of(images).decisions]
            with torch.no_grad():
                expected = model(images, mask=given)
            assert rel_err(runner(images, mask=given), expected) <= 1e-5, mix
    return tokens


@pytest.mark.parametrize("budget", [None, 0.5])
def test_torch_compile_one_graph_per_bucket_serves_every_size_mix(budget):
    model = tiny_model()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = msvit.compile_packed(
        model, MAX_IMAGES, max_pixels=MAX_PIXELS, budget=budget, buckets=[132, 260],
        mode="torch_compile", compile_options={"backend": "aot_eager"},
    )  # fmt: skip
    tokens = check_equal_to_eager(runner, model, budget, masks=budget is None)
    assert len({tuple(t) for t in tokens}) == len(MIXES)  # the mixes really differ in their layouts
    used = sum(1 for n in runner.replays.values() if n)
    calls = len(MIXES) * (2 if budget is None else 1)
    assert sum(runner.replays.values()) == calls and runner.fallbacks == 0
    # one graph per bucket used (+ the gate's without a budget), never one per mix; fullgraph=True
    # raised on any graph break
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == used + (budget is None)


def test_all_fine_and_a_graph_the_cpu_stand_in_replays_for_every_mix(monkeypatch):
    """The cuda_graphs runner on CPU (capture stood in for, tests/helpers.py): the static buffers
    are overwritten by each mix, the gate graph's mask read by every bucket, warm-ups that fit."""
    cpu_graph_stand_in(monkeypatch)
    model = tiny_model()
    for budget in (None, 0.5, 1.0):
        runner = ListRunner(model, MAX_IMAGES, MAX_PIXELS, budget, [68, 260], "cuda_graphs", {})
        buffers = [id(t) for t in torch.utils._pytree.tree_leaves(runner._images)]
        check_equal_to_eager(runner, model, budget, masks=budget is None)
        if budget is None:  # the cached tables of each mix again, after the other mixes overwrote the buffers,
            # and the warm-up list (one smallest image), whose tables the buffers were first made from
            check_equal_to_eager(runner, model, budget, mixes=MIXES[::-1] + (((16, 16),),))
        assert [id(t) for t in torch.utils._pytree.tree_leaves(runner._images)] == buffers
        assert (
            sum(runner.replays.values()) == (3 * len(MIXES) + 1 if budget is None else len(MIXES))
            and runner.fallbacks == 0
        )


def test_no_host_read_with_a_budget_and_one_without(monkeypatch):
    """The counter does not see scalar reads (``int(t)``, ``.item()``) under ``torch.inference_mode``,
    which the runner enters: it is run under ``no_grad`` instead, so a read would be seen. New
    mixes included: their tables are built on the host from the sizes, reading nothing back."""
    inference_mode = torch.inference_mode
    monkeypatch.setattr(torch, "inference_mode", lambda mode=True: torch.no_grad() if mode else inference_mode(False))
    model = tiny_model()
    for budget, expected in ((0.5, 0), (1.0, 0), (None, 1)):
        runner = msvit.compile_packed(model, MAX_IMAGES, max_pixels=MAX_PIXELS, budget=budget, mode="eager")
        for seed, mix in enumerate(MIXES):
            images = images_of(mix, seed + 10)
            with count_host_reads() as reads:
                runner(images)
            assert reads.count == expected, reads.report()


def test_an_int_budget_keeps_that_many_regions_in_every_image():
    """A count larger than the warm-up image's one region (capture warms up with none fine)."""
    model = tiny_model()
    runner = msvit.compile_packed(model, MAX_IMAGES, max_pixels=MAX_PIXELS, budget=3, mode="eager")
    check_equal_to_eager(runner, model, 3, mixes=(MIXES[0], MIXES[2]))


def test_a_list_past_the_largest_bucket_runs_eagerly():
    model = tiny_model()
    for budget in (None, 1.0):
        runner = msvit.compile_packed(
            model, MAX_IMAGES, max_pixels=MAX_PIXELS, budget=budget, buckets=[68], mode="eager"
        )
        with torch.no_grad():  # all fine: 4 prefixes + 4 * 80 finest patches > 68
            model.gate.fc4.bias.fill_(50.0)
            images = images_of(((64, 80), (64, 80)))
            check_equal_to_eager(runner, model, budget, mixes=(((64, 80), (64, 80)),))
        assert runner.fallbacks == 1 and runner.replays == {68: 0}, images


def test_padded_index_lays_out_the_real_tokens_as_the_list_index():
    """``padded_batch_index`` == ``batch_index`` on the real images (lengths, rows, pixels read)."""
    model = tiny_model()
    tokenizer = model.tokenizer
    images = images_of(MIXES[1])
    batch = tokenizer.batch_of(images)
    capacity = ListCapacity(MAX_IMAGES, MAX_PIXELS // 64, tokenizer.ratio, 2)
    layout = padded_layout(batch, capacity, 8, 3, "cpu")
    mask = torch.rand(sum(batch.decisions), generator=torch.Generator().manual_seed(3)) > 0.5
    padded_mask = torch.cat([mask, torch.ones(capacity.decisions - mask.numel(), dtype=torch.bool)])
    shape = lengths_within([1] * MAX_IMAGES, [1 + 256] * MAX_IMAGES, 200, exact=False)
    padded = padded_batch_index(padded_mask, layout, capacity, 1, shape)
    exact = batch_index(mask, batch, 1)
    count, real = batch.batch, exact.rows.numel()
    assert torch.equal(padded.cu_seqlens[: count + 1], exact.cu_seqlens)
    padding_images = padded.cu_seqlens[count + 1 : MAX_IMAGES + 1] - padded.cu_seqlens[count:MAX_IMAGES]
    assert torch.equal(padding_images, torch.ones(1, dtype=torch.int32))  # their prefix row only
    assert torch.equal(padded.rows[:real], exact.rows) and padded.total == 200
    # the same pixels: the flat pack of the padded layout == the list pack, token for token
    pixels = torch.cat([i.reshape(-1) for i in images])
    pixels = torch.cat([pixels, torch.zeros(3 * MAX_PIXELS - pixels.numel())])
    weight, bias = tokenizer.embed.weight, tokenizer.embed.bias
    flat = pack_reference(pixels, padded, weight, bias, None, None, None, 8, 2, node_pixels=layout.node_pixels)
    listed = pack_reference(images, exact, weight, bias, None, None, None, 8, 2)
    assert rel_err(flat[padded.rows[:real]], listed[exact.rows]) <= 1e-6


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_base_patch16_rope_mixed_ape_224"])
def test_rope_models_take_their_table_padded_like_the_positions(name):
    """RoPE (DINOv3's centred coordinates and registers; learned mixed frequencies with absolute
    positions): the table of each mix, padded, is a graph input; one graph for every mix."""
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, depth=1, embed_dim=48, num_heads=3, num_classes=5)
    model = msvit.from_timm(redraw_parameters(vit), kernels="reference").eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = msvit.compile_packed(
        model, 3, max_pixels=3 * 64 * 128, budget=0.5, mode="torch_compile", compile_options={"backend": "aot_eager"}
    )
    mixes = (((32, 64), (160, 48)), ((96, 64), (64, 64), (32, 32)), ((160, 48),))  # 1:2, 10:3, borders
    check_equal_to_eager(runner, model, 0.5, mixes=mixes)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == sum(1 for n in runner.replays.values() if n)


@needs_triton
def test_the_fused_pack_reads_the_padded_list():
    """kernels="triton" (the pack kernel's LIST mode, the interpreter on CPU) == eager reference."""
    model = tiny_model()
    runner_model = tiny_model()
    runner_model.kernels = "triton"
    runner = msvit.compile_packed(runner_model, MAX_IMAGES, max_pixels=MAX_PIXELS, budget=0.5, mode="eager")
    check_equal_to_eager(runner, model, 0.5, mixes=MIXES[:2])


def test_bad_lists_and_arguments_are_refused_naming_what_to_change():
    model = tiny_model()
    runner = msvit.compile_packed(model, 2, max_pixels=64 * 64, budget=0.5, mode="eager")
    with pytest.raises(ValueError, match=r"images\[2\]: this runner takes at most 2 images .*max_images"):
        runner(images_of(((16, 16),) * 3))
    with pytest.raises(ValueError, match=r"images\[1\] \(32x16\) takes the list to 4608 pixels, past max_pixels=4096"):
        runner(images_of(((64, 64), (32, 16))))
    with pytest.raises(ValueError, match=r"images\[1\]: .*multiple"):
        runner([torch.randn(3, 16, 16), torch.randn(3, 20, 16)])
    with pytest.raises(TypeError, match="list of .*image_size"):
        runner(torch.randn(2, 3, 16, 16))
    with pytest.raises(TypeError, match="float64 but the model.s weights are torch.float32"):
        runner(images_of(((16, 16),), dtype=torch.float64))
    with pytest.raises(ValueError, match="built with a budget: its graphs run the gate"):
        runner(images_of(((16, 16),)), mask=[torch.ones(1, dtype=torch.bool)])
    threshold = msvit.compile_packed(model, 2, max_pixels=64 * 64, mode="eager")
    with pytest.raises(ValueError, match=r"mask\[0\]"):
        threshold(images_of(((32, 32),)), mask=[torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"images\[0\]: budget must be between 0 and 4 fine regions per image, got 5"):
        msvit.compile_packed(model, 2, max_pixels=64 * 64, budget=5, mode="eager")(images_of(((32, 32),)))
    with pytest.raises(TypeError, match="budget must be an int"):
        msvit.compile_packed(model, 2, max_pixels=4096, budget="half", mode="eager")
    with pytest.raises(ValueError, match="not both"):
        msvit.compile_packed(model, 2, 64, max_pixels=4096, mode="eager")
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        msvit.compile_packed(model, 2, max_pixels=0, mode="eager")
    with pytest.raises(ValueError, match=r"buckets must be ints between 3 .* and 66 .* got 67"):
        msvit.compile_packed(model, 2, max_pixels=4096, buckets=[3, 67], mode="eager")
    entropy = msvit.from_timm(tiny_vit(img_size=SIZE), gate="entropy").eval()
    with pytest.raises(NotImplementedError, match="MixedScaleGate.* not EntropyGate"):
        msvit.compile_packed(entropy, 2, max_pixels=4096, mode="eager")
    three = msvit.from_timm(tiny_vit(img_size=SIZE), scales=(8, 16, 32)).eval()
    with pytest.raises(NotImplementedError, match="two scales only, not 3|not .*Gate"):
        msvit.compile_packed(three, 2, max_pixels=4096, mode="eager")
    zero_conv = msvit.from_timm(tiny_vit(img_size=SIZE), aggregate="zero_conv").eval()
    with pytest.raises(NotImplementedError, match="zero_conv"):
        msvit.compile_packed(zero_conv, 2, max_pixels=4096, mode="eager")
    naflex = timm.create_model(
        "naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=48, num_heads=3, num_classes=5
    )
    with pytest.raises(NotImplementedError, match="converted NaFlexViT"):
        msvit.compile_packed(msvit.from_timm(naflex).eval(), 2, max_pixels=4096, mode="eager")


@pytest.mark.gpu
def test_cuda_graphs_replay_one_graph_per_bucket_for_every_mix_on_a_gpu():
    """The real capture: bf16, the Triton pack's LIST mode, a host-free attention backend."""
    model = msvit.from_timm(redraw_parameters(tiny_vit(img_size=SIZE))).eval().to("cuda", torch.bfloat16)
    for budget in (None, 0.5):
        runner = msvit.compile_packed(model, MAX_IMAGES, max_pixels=MAX_PIXELS, budget=budget, buckets=[68, 260])
        for seed, mix in enumerate(MIXES + MIXES[:1]):
            images = [image.to("cuda", torch.bfloat16) for image in images_of(mix, seed)]
            with torch.no_grad():
                expected = model(images, budget=budget)
            assert rel_err(runner(images), expected) <= 2e-2, mix
        assert sum(runner.replays.values()) == len(MIXES) + 1 and runner.fallbacks == 0
        images = [image.to("cuda", torch.bfloat16) for image in images_of(MIXES[1], 7)]
        if budget is not None:
            with count_host_reads() as reads:  # the runner's own inference_mode hides scalar reads: see above
                runner(images)
            assert reads.count == 0, reads.report()
