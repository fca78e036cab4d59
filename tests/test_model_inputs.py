"""Model inputs the issue found unclear: another float dtype than the weights, an empty batch, NaN budgets."""

import pytest
import torch

import msvit


@pytest.fixture(scope="module")
def model():
    return msvit.load_pretrained()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_images_of_another_dtype_than_the_weights_get_a_clear_error(model, dtype):
    images = torch.randn(2, 3, 64, 64, dtype=dtype)
    with pytest.raises(TypeError, match=f"images are {dtype} but the model's weights are torch.float32"):
        model(images)
    with pytest.raises(TypeError, match="cast the images"):
        model.gate_mask(images)


@pytest.mark.parametrize("mode", ["packed", "masked", "trimmed"])
@pytest.mark.parametrize("training", [False, True])
def test_an_empty_batch_gives_empty_outputs_in_every_mode(model, mode, training):
    model.train(training)
    try:
        out = model(torch.randn(0, 3, 64, 64), mode=mode, return_gate=True)
    finally:
        model.eval()
    assert out.logits.shape == (0, 10) and out.tokens.shape == (0,) and out.gate.hard.shape == (0, 16)


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -0.1])
def test_nan_or_out_of_range_budgets_are_refused(model, budget):
    with pytest.raises(ValueError, match="must be in \\[0, 1\\], got"):
        model(torch.randn(1, 3, 64, 64), budget=budget)


def test_an_empty_batch_gives_empty_dense_features(model):
    features = model.forward_features(torch.randn(0, 3, 64, 64))
    grid, prefix = msvit.unpack_to_grid(features)
    assert features.tokens.shape == (0, 96) and grid.shape == (0, 8, 8, 96) and prefix.shape[0] == 0
