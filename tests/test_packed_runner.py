"""``msvit.compile_packed``: static packed forwards compiled (``torch_compile``, on CPU here) or
captured in CUDA graphs (``cuda_graphs``, GPU tests), one per token bucket; same logits as the eager
model whatever the masks, one graph per bucket, no graph break (``fullgraph=True`` would raise)."""

import pytest
import torch
import torch._dynamo

import msvit
from msvit_kernels import available_backends

from helpers import cpu_graph_stand_in, redraw_parameters, rel_err, tiny_vit

SIZE = (64, 96)  # patch 8, coarse 16: 4 x 6 regions, 25 to 97 tokens per image


def model_and_batches(batches=5, batch=3, device="cpu", dtype=torch.float32, **kwargs):
    model = msvit.from_timm(redraw_parameters(tiny_vit(img_size=SIZE)), **kwargs).eval().to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(batch, 3, *SIZE, generator=gen).to(device, dtype) for _ in range(batches)]
    return model, images


def gate_bias(model, value):
    """Push every region's logit up (all fine), down (all coarse), or leave the learned gate (None)."""
    bias = model.gate.fc4.bias
    if not hasattr(model, "_learned_bias"):
        model._learned_bias = bias.detach().clone()
    with torch.no_grad():
        bias.copy_(model._learned_bias if value is None else torch.full_like(bias, value))


def run_five_batches(runner, model, images):
    """Five batches with different masks (all coarse, learned x2, all fine, learned): runner == eager."""
    for images_i, bias in zip(images, (-50.0, None, None, 50.0, None)):
        gate_bias(model, bias)
        with torch.no_grad():
            expected = model(images_i)
        got = runner(images_i)
        assert got.shape == expected.shape and rel_err(got, expected) <= 1e-5
    gate_bias(model, None)


def test_torch_compile_one_graph_per_bucket_over_changing_masks():
    model, images = model_and_batches()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    low, high = 3 * 25, 3 * 97
    runner = msvit.compile_packed(
        model, 3, SIZE, buckets=[low, high], mode="torch_compile", compile_options={"backend": "aot_eager"}
    )
    assert runner.buckets == [low, high]
    run_five_batches(runner, model, images)
    assert runner.replays == {low: 1, high: 4} and runner.fallbacks == 0
    # the gate's graph + one per bucket used; fullgraph=True raised on any graph break
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


def test_torch_compile_with_inductor_and_a_budget_reads_nothing_back():
    model, images = model_and_batches(batches=2)
    torch._dynamo.reset()
    runner = msvit.compile_packed(model, 3, SIZE, budget=0.5, mode="torch_compile")
    assert runner.buckets == [3 * (25 + 3 * 12)]
    for images_i in images:
        with torch.no_grad():
            expected = model(images_i, budget=0.5)
        assert rel_err(runner(images_i), expected) <= 1e-5


def test_eager_runner_pads_small_batches_and_falls_back_past_the_largest_bucket():
    model, images = model_and_batches(batches=2)
    runner = msvit.compile_packed(model, 3, SIZE, buckets=[3 * 25 + 6], mode="eager")
    gate_bias(model, -50.0)  # all coarse: fits the bucket
    with torch.no_grad():
        assert rel_err(runner(images[0][:2]), model(images[0][:2])) <= 1e-5  # 2 of 3 images
    gate_bias(model, 50.0)  # all fine: no bucket holds it
    with torch.no_grad():
        assert rel_err(runner(images[1]), model(images[1])) <= 1e-5
    assert runner.fallbacks == 1 and runner.replays == {3 * 25 + 6: 1}


def test_default_buckets_cover_every_batch():
    model, _ = model_and_batches(batches=0)
    runner = msvit.compile_packed(model, 4, SIZE, mode="eager")
    # 25, 50, 75 and 100% of the 4 x 24 regions fine: 4 * 25 base rows + 3 rows per fine region
    assert runner.buckets == [100 + 3 * 24, 100 + 3 * 48, 100 + 3 * 72, 100 + 3 * 96]


def test_bad_arguments_are_refused_clearly():
    model, images = model_and_batches(batches=1)
    with pytest.raises(ValueError, match="model.eval"):
        msvit.compile_packed(model.train(), 3, SIZE, mode="eager")
    model.eval()
    with pytest.raises(ValueError, match="unknown mode"):
        msvit.compile_packed(model, 3, SIZE, mode="graphs")
    with pytest.raises(RuntimeError, match="CUDA device"):
        msvit.compile_packed(model, 3, SIZE, mode="cuda_graphs")
    with pytest.raises(ValueError, match="positive multiple of the patch size 8"):
        msvit.compile_packed(model, 3, (64, 90), mode="eager")
    with pytest.raises(ValueError, match="leave buckets=None"):
        msvit.compile_packed(model, 3, SIZE, budget=2, buckets=[100], mode="eager")
    with pytest.raises(ValueError, match="capacity must be between"):
        msvit.compile_packed(model, 3, SIZE, buckets=[10], mode="eager")
    with pytest.raises(TypeError, match="msvit.MSViT"):
        msvit.compile_packed(tiny_vit(), 3, SIZE)
    runner = msvit.compile_packed(model, 3, SIZE, mode="eager")
    with pytest.raises(ValueError, match="up to 3 images of shape"):
        runner(torch.randn(4, 3, *SIZE))
    with pytest.raises(TypeError, match="this runner takes torch.float32"):
        runner(images[0].double())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch_varlen", "flash_attn"])
def test_cuda_graph_replays_equal_eager_for_each_backend(backend):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} cannot run on this GPU")
    model, images = model_and_batches(device="cuda", dtype=torch.bfloat16, attention_backend=backend)
    runner = msvit.compile_packed(model, 3, SIZE, buckets=[3 * 25, 3 * 97], mode="cuda_graphs")
    for images_i, bias in zip(images, (-50.0, None, None, 50.0, None)):
        gate_bias(model, bias)
        with torch.no_grad():
            expected = model(images_i)
        # a new mask in the same bucket replays the same graph and gives the new answer
        assert rel_err(runner(images_i), expected) <= 2e-2
    assert runner.replays == {3 * 25: 1, 3 * 97: 4}


@pytest.mark.gpu
def test_cuda_graph_with_a_budget_and_real_host_reads():
    from msvit.host_reads import count_host_reads

    model, images = model_and_batches(device="cuda", dtype=torch.bfloat16)
    runner = msvit.compile_packed(model, 3, SIZE, budget=5, mode="cuda_graphs")
    with torch.no_grad():
        assert rel_err(runner(images[0]), model(images[0], budget=5)) <= 2e-2
        with count_host_reads() as reads:
            model(images[1], budget=5)
        assert reads.count == 0, reads.report()
        with count_host_reads() as reads:
            model(images[1])
        assert reads.count == 1, reads.report()


def test_graph_plumbing_with_a_cpu_stand_in_for_capture(monkeypatch):
    """The cuda_graphs runner's buffers on CPU: capture is stood in for by running the stage and
    copying each replay's results into the outputs of the "capture", as a CUDA graph writes into
    its static outputs. Checks what a GPU run cannot afford to find broken: the images buffer,
    the gate graph's mask buffer read by every bucket, warm-ups that fit every bucket, padding."""
    from msvit.models import packed_runner

    cpu_graph_stand_in(monkeypatch)
    model, images = model_and_batches()
    for budget, buckets in ((None, [3 * 25, 3 * 97]), (5, None)):
        capacities = buckets or [model.static_shape(3, SIZE, budget=budget).capacity]
        runner = packed_runner.PackedRunner(model, 3, SIZE, budget, capacities, "cuda_graphs", {})
        for images_i, bias in zip(images, (-50.0, None, None, 50.0, None)):
            gate_bias(model, bias)
            with torch.no_grad():
                expected = model(images_i, budget=budget)
            assert rel_err(runner(images_i), expected) <= 1e-5
            assert rel_err(runner(images_i[:2]), expected[:2]) <= 1e-5
        gate_bias(model, None)


def test_torch_compile_says_before_the_wait_that_the_first_calls_compile_and_how_long():
    from msvit.models.packed_runner import CompileNotice

    model, _ = model_and_batches(batches=0)
    with pytest.warns(CompileNotice, match=r"each of 3 graphs .* about 40-55 s each on a 2-core CPU .* 120-165 s"):
        msvit.compile_packed(model, 3, SIZE, buckets=[120, 240], mode="torch_compile")
    with pytest.warns(CompileNotice, match=r"each of 1 graphs .*\(aot_eager\): from seconds"):
        msvit.compile_packed(model, 3, SIZE, budget=0.5, mode="torch_compile", compile_options={"backend": "aot_eager"})
