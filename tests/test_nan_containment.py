"""A non-finite value in one image (one packed sequence) never changes another image's output
(issue 26): on every attention backend that runs here (reference, padded_sdpa, triton in the
interpreter; flash_attn and torch_varlen run on GPUs only, see docs/design.md section 3), forward
and backward, and on every model path: the dynamic forward, ``budget=``, ``capacity=`` (a static
shape), the ``msvit.compile_packed`` runners (eager, ``torch_compile``, the CPU stand-in of
``cuda_graphs``), two and three scales.

padded_sdpa used to zero the slot rows past each sequence's end by multiplying with the mask; a
slot's tail reads the next sequence's rows, and NaN * 0 is NaN, so a NaN in image b+1 made image b
NaN wherever b was shorter than max_seqlen (every capacity forward and runner on CPU).
"""

import pytest
import torch
import torch._dynamo

import msvit
from msvit_kernels import packed_attention

from helpers import DEVICE, cpu_graph_stand_in, needs_triton, redraw_parameters, rel_err, tiny_vit

BACKENDS = ["reference", "padded_sdpa", pytest.param("triton", marks=needs_triton)]
HOST_FREE = ["padded_sdpa", pytest.param("triton", marks=needs_triton)]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]

# ---------------------------------------------------------------------------------------------- the op

CU = [0, 3, 11, 11, 16]  # short, long, empty, short: sequence 0's slot tail reads sequence 1's rows
ROWS, MAX_SEQLEN = 16, 8


def qkv(seed=0, rows=ROWS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 2, 16, generator=gen).to(DEVICE) for _ in range(3)]


def poisoned(tensors, which, rows, value):
    """Copies of ``tensors`` (leaves that require grad) with ``value`` at ``rows`` of q, k or v."""
    out = [t.clone() for t in tensors]
    out["qkv".index(which)][rows] = value
    return [t.requires_grad_() for t in out]


def attention_and_grads(backend, q, k, v, cu, max_seqlen, grad, **key_layout):
    cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    out = packed_attention(q, k, v, cu, max_seqlen, backend=backend, **key_layout)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("which", "qkv")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_sequence_leaves_the_others_bit_for_bit(backend, which, value):
    clean = qkv()
    grad = torch.randn(ROWS, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for bad, others in ((slice(5, 6), [(0, 3), (11, 16)]), (slice(11, 16), [(0, 11)]), (slice(0, 3), [(3, 16)])):
        want = attention_and_grads(backend, *poisoned(clean, which, slice(0, 0), 0.0), CU, MAX_SEQLEN, grad)
        got = attention_and_grads(backend, *poisoned(clean, which, bad, value), CU, MAX_SEQLEN, grad)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            for start, end in others:
                torch.testing.assert_close(g[start:end], w[start:end], rtol=1e-6, atol=1e-6, msg=name)
        assert not torch.isfinite(got[0][bad]).all()  # the poisoned sequence itself is not hidden


@pytest.mark.parametrize("which", "kv")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_key_sequence_leaves_the_other_queries(backend, which):
    """Separate key layouts (the attention pool): one query per image over that image's keys."""
    clean = qkv()
    q = clean[0][:4]
    layout = dict(cu_seqlens_k=torch.tensor(CU, dtype=torch.int32, device=DEVICE), max_seqlen_k=MAX_SEQLEN)
    grad = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs = [q, *clean[1:]]
    each = [0, 1, 2, 3, 4]  # one query per sequence
    want = attention_and_grads(backend, *poisoned(inputs, which, slice(0, 0), 0.0), each, 1, grad, **layout)
    got = attention_and_grads(backend, *poisoned(inputs, which, slice(4, 5), float("nan")), each, 1, grad, **layout)
    other_keys = [*range(0, 3), *range(11, 16)]
    for rows, g, w in zip(([0, 2, 3], [0, 2, 3], other_keys, other_keys), got, want):
        torch.testing.assert_close(g[rows], w[rows], rtol=1e-6, atol=1e-6)
    assert torch.isnan(got[0][1]).all()


# ---------------------------------------------------------------------------------------------- the model

SIZE = (64, 96)  # patch 8: 8 x 12 fine cells, 4 x 6 regions of 16 px, 2 x 3 of 32 px
BATCH = 3
ALL_FINE = 1 + 8 * 12  # the longest image: cls + every fine cell


def model_for(scales, backend, **vit_kwargs):
    vit = redraw_parameters(tiny_vit(img_size=SIZE, **vit_kwargs))
    model = msvit.from_timm(vit, scales=scales, attention_backend=backend).eval()
    images = torch.randn(BATCH, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    _center_gate(model, images)
    return model, images


def _center_gate(model, images):
    """Shift every gate's last bias so that about half its decisions are fine: images of different
    lengths, each shorter than the longest possible (a slot's tail then reads its neighbour's rows)."""
    gates = list(model.gate.levels) if hasattr(model.gate, "levels") else [model.gate]  # three scales: a gate per level
    logits = []
    hooks = [gate.register_forward_hook(lambda module, inputs, out: logits.append(out)) for gate in gates]
    with torch.no_grad():
        model.gate_mask(images)
        for hook in hooks:
            hook.remove()
        assert len(logits) == len(gates)
        for gate, out in zip(gates, logits):
            gate.fc4.bias -= out.median()


def with_bad_pixels(images, image, value):
    bad = images.clone()
    bad[image, :, 5:9, 20:23] = value  # inside one 16 px region (and one 32 px region)
    return bad


def check_contained(run, model, images, value, budget=None, bad_images=range(BATCH)):
    """For a bad image at each of ``bad_images``: every other image's logits equal the finite
    batch's under the same path, and the dynamic forward's."""
    with torch.no_grad():
        finite = run(images)
        dynamic = model(images, budget=budget)
    assert torch.isfinite(finite).all()
    assert rel_err(finite, dynamic) <= 1e-5
    for image in bad_images:
        with torch.no_grad():
            got = run(with_bad_pixels(images, image, value))
        others = [i for i in range(BATCH) if i != image]
        assert torch.isfinite(got[others]).all(), f"image {image} poisoned images {others}: {got}"
        assert rel_err(got[others], finite[others]) <= 1e-5


SCALES = [pytest.param((8, 16), id="two_scales"), pytest.param((8, 16, 32), id="three_scales")]


@pytest.mark.parametrize("path", ["dynamic", "budget", "capacity"])
@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("backend", ["auto", "padded_sdpa"])
def test_model_paths(backend, scales, path, value=float("nan")):
    """auto: the reference for the dynamic forward on CPU, padded_sdpa for the static ones."""
    model, images = model_for(scales, backend)
    budget = 0.5 if path == "budget" else None
    kwargs = {"capacity": BATCH * ALL_FINE} if path == "capacity" else {"budget": budget}
    check_contained(lambda x: model(x, **kwargs), model, images, value, budget)


@pytest.mark.parametrize("path", ["dynamic", "capacity"])
def test_an_infinite_pixel(path):
    test_model_paths("auto", (8, 16), path, float("inf"))


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_pooled_heads(pool):
    """Mean pooling sums padding rows into a dropped row; SigLIP's attention pool attends with a key
    layout of its own (one query per image): both on the static path, where padded_sdpa runs."""
    model, images = model_for((8, 16), "auto", global_pool=pool, class_token=False)
    check_contained(lambda x: model(x, capacity=BATCH * (ALL_FINE - 1)), model, images, float("nan"))


@needs_triton
@pytest.mark.parametrize(
    "scales, path", [((8, 16), "capacity"), ((8, 16, 32), "dynamic")], ids=["two-capacity", "three-dynamic"]
)
def test_model_paths_on_the_triton_backend(scales, path):
    """The interpreter is slow: the middle image only (in padded_sdpa it was the one that poisoned)."""
    model, images = model_for(scales, "triton")
    kwargs = {"capacity": BATCH * ALL_FINE} if path == "capacity" else {}
    check_contained(lambda x: model(x, **kwargs), model, images, float("nan"), bad_images=[1])


@pytest.mark.parametrize("budget", [None, 0.5], ids=["buckets", "budget"])
@pytest.mark.parametrize("scales", SCALES)
def test_eager_runners(scales, budget):
    model, images = model_for(scales, "auto")
    runner = msvit.compile_packed(model, BATCH, SIZE, budget=budget, mode="eager")
    check_contained(runner, model, images, float("nan"), budget)
    assert runner.fallbacks == 0


def test_torch_compile_runner():
    model, images = model_for((8, 16), "auto")
    torch._dynamo.reset()
    runner = msvit.compile_packed(
        model, BATCH, SIZE, buckets=[BATCH * ALL_FINE], mode="torch_compile", compile_options={"backend": "aot_eager"}
    )
    check_contained(runner, model, images, float("nan"))


@pytest.mark.parametrize("scales", SCALES)
def test_cuda_graph_runner_stand_in(monkeypatch, scales):
    from msvit.models import packed_runner

    cpu_graph_stand_in(monkeypatch)
    model, images = model_for(scales, "auto")
    capacity = model.static_shape(BATCH, SIZE, capacity=BATCH * ALL_FINE).capacity
    runner = packed_runner.PackedRunner(model, BATCH, SIZE, None, [capacity], "cuda_graphs", {})
    check_contained(runner, model, images, float("nan"))
