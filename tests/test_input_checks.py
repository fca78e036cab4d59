"""Size and batch arguments are checked as the forward checks images, with its messages; images
smaller than one coarsest region are refused up front in every mode and model; a runner returns
the model's empty logits for an empty batch; a dynamic forward on a host-free backend reads the
host exactly once (docs/design.md sections 3 and 9)."""

import pytest
import torch

import msvit
from msvit.host_reads import count_host_reads
from msvit.models.packed_runner import default_buckets

from helpers import redraw_parameters, tiny_vit

# patch 8: two scales with 16 px regions, three with 16 and 32 px nodes
MODELS = {"two": {}, "three": {"scales": (8, 16, 32)}, "entropy": {"gate": "entropy"}}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return msvit.from_timm(redraw_parameters(tiny_vit()), **MODELS[request.param]).eval()


def forward_error(model, size):
    """The message the forward refuses ``size`` (H, W) with."""
    with pytest.raises(ValueError) as refused, torch.no_grad():
        model(torch.randn(2, 3, *size))
    return str(refused.value)


# sizes the forward refuses: not a multiple of the patch, or smaller than one coarsest region
REFUSED_SIZES = [(70, 70), (64, 60), (8, 8), (16, 8), (8, 64)]


@pytest.mark.parametrize("size", REFUSED_SIZES)
def test_size_arguments_refuse_what_the_forward_refuses_with_its_message(model, size):
    message = forward_error(model, size)
    for call in (
        lambda: model.static_shape(2, size, capacity=500),
        lambda: model.static_shape(2, size, budget=0),
        lambda: msvit.compile_packed(model, 2, size, mode="eager"),
        lambda: default_buckets(model, 2, size),
        lambda: model.tokens_per_image(torch.ones(2, 16, dtype=torch.bool), images=torch.randn(2, 3, *size)),
    ):
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == message


def test_an_int_size_is_a_square_one_everywhere(model):
    assert model.static_shape(3, 64, budget=2) == model.static_shape(3, (64, 64), budget=2)
    assert default_buckets(model, 3, 64) == default_buckets(model, 3, (64, 64))
    assert msvit.compile_packed(model, 3, 64, mode="eager").image_size == (64, 64)


@pytest.mark.parametrize(
    "size,error,match",
    [
        (64.0, TypeError, "image_size must be H or \\(H, W\\) in pixels"),
        ((64, 64, 3), TypeError, "image_size must be H or \\(H, W\\) in pixels"),
        ("64", TypeError, "image_size must be H or \\(H, W\\) in pixels"),
        (True, TypeError, "image_size must be H or \\(H, W\\) in pixels"),
        (-64, ValueError, "image size -64x-64 must be a positive multiple of the patch size 8"),
        (0, ValueError, "image size 0x0 must be a positive multiple"),
    ],
)
def test_sizes_no_image_has_are_refused(model, size, error, match):
    for call in (lambda: model.static_shape(2, size, capacity=500), lambda: default_buckets(model, 2, size)):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("batch", [-1, 1.5, True, None])
def test_batch_sizes_are_ints_of_at_least_zero(model, batch):
    with pytest.raises(ValueError, match=f"batch_size must be an int >= 0 \\(images per batch\\), got {batch!r}"):
        model.static_shape(batch, 64, budget=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        msvit.compile_packed(model, batch, 64, mode="eager")


def test_an_empty_batch_has_an_empty_static_shape_as_the_forward_takes_it(model):
    assert model.static_shape(0, 64, budget=2).capacity == 0
    with torch.no_grad():
        assert model(torch.randn(0, 3, 64, 64), budget=2).shape == (0, 7)


def test_compile_packed_refuses_a_runner_without_room_and_bad_containers(model):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 \\(images per batch\\), got 0"):
        msvit.compile_packed(model, 0, 64, mode="eager")
    with pytest.raises(TypeError, match="buckets must be a list of capacities"):
        msvit.compile_packed(model, 2, 64, buckets=100, mode="eager")
    with pytest.raises(TypeError, match="compile_options must be a dict"):
        msvit.compile_packed(model, 2, 64, mode="torch_compile", compile_options="aot_eager")


@pytest.mark.parametrize("mask", [None, [[True]], torch.tensor(True)])
def test_tokens_per_image_names_a_mask_that_is_not_one_at_any_scale_count(model, mask):
    """Three scales used to raise AttributeError / IndexError on these."""
    with pytest.raises((TypeError, ValueError), match="mask must be a bool torch.Tensor|mask must have shape"):
        model.tokens_per_image(mask)


@pytest.mark.parametrize(
    "img_size,error,match",
    [
        (-64, ValueError, "image size -64x-64 must be a positive multiple of the patch size 8"),
        (0, ValueError, "image size 0x0 must be a positive multiple of the patch size 8"),
        ("64", TypeError, "img_size must be H or \\(H, W\\) in pixels \\(ints\\), got '64'"),
        (64.0, TypeError, "img_size must be H or \\(H, W\\) in pixels"),
    ],
)
def test_from_timm_checks_a_naflex_img_size_as_the_forward_checks_sizes(img_size, error, match):
    import timm

    vit = timm.create_model(
        "naflexvit_base_patch16_gap", pretrained=False, patch_size=8, embed_dim=48, depth=1, num_heads=3
    )
    with pytest.raises(error, match=match):
        msvit.from_timm(vit, img_size=img_size)


# ------------------------------------------------------------ images smaller than one coarse region


def tiny_msvit(**kwargs):
    return msvit.from_timm(redraw_parameters(tiny_vit()), **kwargs)


# name: (the model, built when its test runs; the smallest side it takes): two and three scales, the
# entropy gate, a coarse patch larger than the trained images, the segmenter and pruning
SMALL_IMAGE_MODELS = {
    "two scales": (lambda: tiny_msvit().eval(), 16),
    "three scales": (lambda: tiny_msvit(scales=(8, 16, 32)).eval(), 32),
    "entropy gate": (lambda: tiny_msvit(gate="entropy").eval(), 16),
    "coarse 128 on 64 px": (lambda: tiny_msvit(coarse_patch_size=128).eval(), 128),
    "segmenter": (lambda: msvit.MSSegmenter(tiny_msvit(), num_classes=3).eval(), 16),  # frozen gate
    "segmenter, gate trains": (lambda: msvit.MSSegmenter(tiny_msvit(), num_classes=3, freeze_gate=False), 16),
    "pruned": (lambda: msvit.PrunedMSViT(tiny_msvit().eval(), keep_ratio=0.5, layers=(1,)), 16),
}


@pytest.mark.parametrize("name", sorted(SMALL_IMAGE_MODELS))
def test_images_smaller_than_one_coarse_region_are_refused_up_front_naming_the_smallest_size(name):
    """They used to fail inside F.interpolate ("Input and output sizes should be greater than 0")."""
    build, smallest = SMALL_IMAGE_MODELS[name]
    model = build()
    modes = ("packed", "masked", "trimmed") if isinstance(model, msvit.MSViT) else ("packed",)
    for h, w in ((8, 8), (smallest, smallest - 8), (smallest - 8, 2 * smallest)):
        for mode in modes:
            kwargs = {"mode": mode} if mode != "packed" else {}
            with pytest.raises(ValueError) as refused, torch.no_grad():
                model(torch.randn(2, 3, h, w), **kwargs)
            assert str(refused.value).startswith(
                f"image size {h}x{w} is smaller than one coarse region ({smallest}x{smallest} pixels"
            ), str(refused.value)
            assert f"the smallest size that works here is {max(h, smallest)}x{max(w, smallest)}" in str(refused.value)
            if mode == "packed" and isinstance(model, msvit.MSViT):
                with pytest.raises(ValueError, match=f"image size {h}x{w} is smaller than one coarse region"):
                    model.gate_mask(torch.randn(2, 3, h, w))
        with torch.no_grad():  # the size the message names works
            assert torch.isfinite(model(torch.randn(2, 3, max(h, smallest), max(w, smallest)))).all()


# --------------------------------------------------------------------------- runner: empty batches


@pytest.mark.parametrize("budget", [None, 2, 0.5])
@pytest.mark.parametrize("mode", ["eager", "torch_compile"])
def test_a_runner_returns_the_models_empty_logits_for_an_empty_batch(model, mode, budget):
    runner = msvit.compile_packed(model, 3, 64, mode=mode, budget=budget, compile_options={"backend": "aot_eager"})
    empty = torch.randn(0, 3, 64, 64)
    with torch.no_grad():
        expected = model(empty, budget=budget)
    got = runner(empty)
    assert got.shape == expected.shape == (0, 7) and got.dtype == expected.dtype
    assert runner.fallbacks == 0 and not any(runner.replays.values())


def test_an_empty_batch_keeps_the_models_dtype():
    model = msvit.from_timm(redraw_parameters(tiny_vit())).eval().double()
    got = msvit.compile_packed(model, 2, 64, mode="eager")(torch.randn(0, 3, 64, 64, dtype=torch.float64))
    assert got.shape == (0, 7) and got.dtype == torch.float64
    with pytest.raises(ValueError, match="up to 2 images of shape \\[3, 64, 64\\], got \\[0, 3, 32, 32\\]"):
        msvit.compile_packed(model, 2, 64, mode="eager")(torch.randn(0, 3, 32, 32, dtype=torch.float64))


@pytest.mark.gpu
def test_a_captured_runner_returns_empty_logits_for_an_empty_batch():
    model = msvit.from_timm(redraw_parameters(tiny_vit())).eval().cuda()
    for budget in (None, 2):
        runner = msvit.compile_packed(model, 2, 64, mode="cuda_graphs", budget=budget)
        got = runner(torch.randn(0, 3, 64, 64, device="cuda"))
        assert got.shape == (0, 7) and got.dtype == torch.float32 and got.device.type == "cuda"


# ------------------------------------------------------------------------------- host reads, pinned


def test_a_dynamic_cpu_forward_on_a_host_free_backend_reads_the_host_once(model):
    """The documented rule (docs/design.md section 9): one read (the token count) without a budget
    or capacity, none with one, on a host-free backend, CPU's padded_sdpa too (the Triton one:
    tests/test_static_packed.py)."""
    model.attention_backend = "padded_sdpa"
    images = torch.randn(3, 3, 64, 64)
    try:
        with torch.no_grad():
            model(images)  # interpret / build tables once outside the count
            with count_host_reads() as reads:
                model(images)
            assert reads.count == 1, reads.report()
            with count_host_reads() as reads:
                model(images, budget=2)
            assert reads.count == 0, reads.report()
    finally:
        model.attention_backend = "auto"
