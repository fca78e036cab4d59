"""The shipped cluttered-digits model loads without downloads and its gate learned where digits are.

Its measured held-out figures (2000 images): top-1 85.8%, 19.8 tokens/image (65 all-fine), 93% of
fine regions on the digit box against 17% of all regions (5.5x). The issue's 95% accuracy target is
not reached yet; these tests pin what the shipped weights do on 500 unseen images.
"""
import torch

from msvit.checkpoint import load_pretrained
from msvit.data import ClutteredDigits
from msvit.evaluate import evaluate
from msvit.train_data import materialize


def test_shipped_digits_model_accuracy_and_gate_placement():
    model, config = load_pretrained("cluttered-digits")
    data = config["data"]
    digits = ClutteredDigits(500, tuple(data["image_size"]), seed=10_000, split="val",
                             digit_scale=tuple(data["digit_scale"]))
    loader = torch.utils.data.DataLoader(materialize(digits, "", False), batch_size=100)
    boxes = torch.tensor([digits.box(i) for i in range(len(digits))])
    metrics = evaluate(model, loader, data["mean"], data["std"], "cpu", boxes=boxes)
    assert metrics["top1"] >= 0.80
    assert metrics["fine_digit_ratio"] >= 2.0  # fine tokens go to the digit
    assert metrics["tokens_per_image"] < 0.5 * 65  # and the model runs on far fewer tokens than all-fine
