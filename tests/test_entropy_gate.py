"""APT's training-free entropy gate in MSViT: decisions equal the reference thresholding, the model
from ``from_timm(gate="entropy")`` runs packed == masked on real photos, budgets, training, and
checkpoints that record the gate."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_train import TINY_MODEL

import msvit
from msvit.data import IMAGENET_MEAN, IMAGENET_STD, normalize, sample_photos
from msvit.io.checkpoint import CONFIG, build_model, load_checkpoint, write_checkpoint
from msvit.models.entropy_gate import EntropyGate
from msvit_kernels.reference import entropy_reference

from helpers import DEVICE, needs_triton, rel_err, tiny_vit

TOL = 1e-5


@pytest.fixture(scope="module")
def photos():
    """The bundled photos at 64 px, ImageNet-normalised: [8, 3, 64, 64]."""
    return normalize(sample_photos(64)[1]).to(DEVICE)


def entropy_model(threshold=6.0, **kwargs):
    """A tiny ViT (8 px patches, 16 px regions on a 4x4 grid at 64 px) with the entropy gate."""
    model = msvit.from_timm(tiny_vit(), gate="entropy", entropy_thresholds=(threshold,), **kwargs)
    return model.to(DEVICE).eval()


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
def test_decisions_equal_the_reference_thresholding(kernels):
    images = normalize(sample_photos((96, 160))[1][[0, 3, 7]]).to(DEVICE)
    gate = EntropyGate(32, (3, 5), (6.5,))
    gate.kernels = kernels
    decision = gate.decide(images, sample=True)  # sample is ignored: nothing is random
    ref = entropy_reference(images, 32, IMAGENET_MEAN, IMAGENET_STD, 512)
    assert (decision.logits - (ref - 6.5)).abs().max() <= TOL
    clear = (ref - 6.5).abs() > TOL
    assert torch.equal(decision.hard[clear], (ref > 6.5)[clear])
    assert decision.hard.any() and not decision.hard.all()
    assert decision.soft is None and not decision.st.requires_grad
    assert torch.equal(decision.st, decision.hard.float())


def test_packed_equals_masked_on_real_photos(photos):
    model = entropy_model()
    with torch.no_grad():
        out = model(photos, return_gate=True)
        masked = model(photos, mode="masked")
    assert rel_err(out.logits, masked) <= 1e-5
    expected = entropy_reference(photos, 16, IMAGENET_MEAN, IMAGENET_STD, 512) > 6.0
    assert torch.equal(out.gate.hard, expected) and 0 < expected.sum() < expected.numel()
    assert torch.equal(out.tokens, 1 + 16 + 3 * expected.sum(1))
    assert torch.equal(model.tokens_per_image(model.gate_mask(photos)), out.tokens)


def test_budget_keeps_the_highest_entropy_regions(photos):
    model = entropy_model()
    mask = model.gate_mask(photos, budget=5)
    assert mask.sum(1).tolist() == [5] * photos.shape[0]
    top = entropy_reference(photos, 16, IMAGENET_MEAN, IMAGENET_STD, 512).topk(5, dim=1).indices
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, top, True))
    with torch.no_grad():
        out = model(photos, budget=5, return_gate=True)
        assert rel_err(out.logits, model(photos, mask=mask, mode="masked")) <= 1e-5
    assert out.tokens.tolist() == [1 + 16 + 3 * 5] * photos.shape[0]
    assert msvit.count_macs(model, mask=mask, breakdown=True)["gate"].eq(0).all()  # no MACs: elementwise work


def test_training_with_the_entropy_gate_trains_the_vit_only(photos):
    model = entropy_model().train()
    assert not list(model.gate.parameters())
    out = model(photos[:4], return_gate=True)
    F.cross_entropy(out.logits, torch.arange(4, device=DEVICE)).backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    assert out.gate.soft is None and not out.gate.st.requires_grad
    assert torch.equal(out.gate.hard, model.eval().gate_mask(photos[:4]))  # training decides as evaluation


def test_from_timm_takes_the_normalisation_of_the_timm_model():
    model = msvit.from_timm("vit_small_patch16_224", timm_kwargs={"depth": 1, "img_size": 64}, gate="entropy")
    assert model.gate.mean == (0.5, 0.5, 0.5) and model.gate.thresholds == (5.5,) and model.gate.bins == 512
    assert model.gate.region_size == 32 and model.gate.grid == (2, 2)
    custom = msvit.from_timm(tiny_vit(), gate="entropy", entropy_mean=(0.1,) * 3, entropy_bins=256)
    assert custom.gate.mean == (0.1,) * 3 and custom.gate.std == IMAGENET_STD and custom.gate.bins == 256


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"gate": "random"}, ValueError, "unknown gate 'random'; expected one of: 'learned', 'entropy'"),
        (
            {"gate": "entropy", "hidden": 32},
            TypeError,
            "gate='entropy' takes entropy_binning, entropy_bins.*hidden are not its",
        ),
        ({"entropy_thresholds": (5.5,)}, TypeError, "entropy_thresholds apply to gate='entropy'"),
        ({"gate": "entropy", "entropy_thresholds": (5.0, 6.0)}, ValueError, "two scales .one boundary."),
        ({"gate": "entropy", "entropy_thresholds": 5.5}, ValueError, "one per scale boundary"),
        ({"gate": "entropy", "entropy_bins": 500}, ValueError, "entropy_bins must be a power of two"),
        ({"gate": "entropy", "entropy_binning": "histc"}, ValueError, "entropy_binning must be one of 'apt', 'cont"),
        # issue 26 item 3: a zero std made every region coarse, a negative one was accepted
        ({"gate": "entropy", "entropy_std": (0.2, 0.0, 0.2)}, ValueError, "entropy_std must be > 0 for every channel"),
        ({"gate": "entropy", "entropy_std": (0.2, -0.1, 0.2)}, ValueError, "entropy_std must be > 0"),
        ({"gate": "entropy", "entropy_mean": (0.5,)}, ValueError, "entropy_mean must hold 3 finite numbers"),
        ({"gate": "entropy", "entropy_mean": "0.5"}, ValueError, "entropy_mean must hold 3 finite numbers"),
        ({"gate": "entropy", "scales": (8, 16, 32), "entropy_std": (1, 1, 0)}, ValueError, "entropy_std must be > 0"),
    ],
)
def test_bad_gate_options_are_refused_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        msvit.from_timm(tiny_vit(), **kwargs)


def test_the_gate_itself_refuses_a_std_that_is_not_positive():
    with pytest.raises(ValueError, match="std must be > 0 for every channel"):
        EntropyGate(32, (2, 2), std=(0.2, 0.2, 0.0))


def test_a_one_channel_model_gets_a_normalisation_that_fits_or_is_told_what_to_pass():
    """Issue 26 item 3: a 1-channel model failed with "mean must hold 1 finite numbers ... got
    (0.5, 0.5, 0.5)" although no mean was passed. timm's (0.5, 0.5, 0.5) is one value for every
    channel: the grey model takes it; ImageNet's three differ: refused, naming what to pass."""
    grey = msvit.from_timm(
        "vit_small_patch16_224", timm_kwargs={"depth": 1, "img_size": 64, "in_chans": 1}, gate="entropy"
    )
    assert grey.gate.mean == (0.5,) and grey.gate.std == (0.5,)
    images = torch.rand(2, 1, 64, 64)
    assert grey.gate_mask(images).shape == (2, 4)
    with pytest.raises(ValueError, match="1-channel model's entropy gate needs entropy_mean and entropy_std"):
        msvit.from_timm(tiny_vit(in_chans=1), gate="entropy")
    given = msvit.from_timm(tiny_vit(in_chans=1), gate="entropy", entropy_mean=(0.4,), entropy_std=(0.2,))
    assert given.gate.mean == (0.4,) and given.gate.std == (0.2,)


def test_a_swin_refuses_the_entropy_gate():
    with pytest.raises(NotImplementedError, match="a Swin takes gate='learned'"):
        msvit.from_timm("swin_tiny_patch4_window7_224", gate="entropy")


def test_a_checkpoint_records_and_rebuilds_the_entropy_gate(tmp_path, photos):
    gate = {"gate": "entropy", "entropy_thresholds": [6.0], "entropy_bins": 256}
    config = {
        "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 64}},
        "msvit": {"coarse_patch_size": 16, **gate},
    }
    torch.manual_seed(0)
    model = build_model(config).eval()
    with pytest.raises(ValueError, match="entropy gate, which has no weights.*'entropy_thresholds': \\[6.0\\]"):
        write_checkpoint(tmp_path / "lost", model, {**config, "msvit": {"coarse_patch_size": 16}})
    write_checkpoint(tmp_path, model, config)
    loaded = load_checkpoint(tmp_path)
    assert isinstance(loaded.gate, EntropyGate)
    assert loaded.gate.describe_architecture() == model.gate.describe_architecture()
    with torch.no_grad():
        assert torch.equal(loaded(photos.cpu()), model(photos.cpu()))
    recorded = json.loads((tmp_path / CONFIG).read_text())
    recorded["msvit"]["entropy_thresholds"] = [4.0]  # an edited threshold changes the outputs: refused
    (tmp_path / CONFIG).write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="no longer matches.*gate.thresholds"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_saved_before_the_binning_was_recorded_keeps_its_binning(tmp_path, photos):
    """New checkpoints record APT's binning; one without a record was saved with the continuous
    binning (the only one then) and loads with it, so its tokens do not move."""
    config = {
        "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**json.loads(TINY_MODEL), "img_size": 64}},
        "msvit": {"coarse_patch_size": 16, "gate": "entropy", "entropy_thresholds": [6.0]},
    }
    model = build_model(config).eval()
    assert model.gate.binning == "apt"
    write_checkpoint(tmp_path, model, config)
    recorded = json.loads((tmp_path / CONFIG).read_text())
    assert recorded["architecture"]["gate"]["binning"] == "apt"
    assert load_checkpoint(tmp_path).gate.binning == "apt"
    del recorded["architecture"]["gate"]["binning"]  # what every earlier entropy checkpoint holds
    (tmp_path / CONFIG).write_text(json.dumps(recorded))
    old = load_checkpoint(tmp_path)
    assert old.gate.binning == "continuous"
    expected = entropy_reference(photos.cpu(), 16, old.gate.mean, old.gate.std, 512, "continuous") > 6.0
    assert torch.equal(old.gate_mask(photos.cpu()), expected)


ENTROPY = ("--gate", "entropy", "--entropy-threshold", "3.0", "--entropy-bins", "256")


def test_msvit_train_with_the_entropy_gate_trains_saves_resumes_and_reloads(tmp_path):
    """Only the ViT trains; the run records the gate, so --resume and load_checkpoint rebuild it."""
    from test_train import small_run

    from msvit.train import parse_args, train
    from msvit.train.run_folder import RunFolderError

    train(small_run(tmp_path, "--train-size", "64", "--epochs", "1", gate=ENTROPY))
    before = load_checkpoint(tmp_path)
    train(parse_args(["--resume", "--out", str(tmp_path), "--epochs", "2"]))  # the recorded gate, not the default
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["gate_trains"], r["train_gate"]) for r in rows] == [(1, False, 0.0), (2, False, 0.0)]
    model = load_checkpoint(tmp_path)
    assert isinstance(model.gate, EntropyGate) and not list(model.gate.parameters())
    half = (0.5,) * 3  # the digits' normalisation, which the gate undoes
    assert (model.gate.thresholds, model.gate.bins, model.gate.mean, model.gate.std) == ((3.0,), 256, half, half)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before.blocks[0].attn.qkv.weight)  # the ViT trained
    images = normalize(torch.rand(4, 3, 32, 32), half, half)
    assert torch.equal(model.gate_mask(images), entropy_reference(images, 16, half, half, 256) > 3.0)
    with pytest.raises(RunFolderError, match="--gate was 'entropy', now 'learned'"):
        train(parse_args(["--resume", "--out", str(tmp_path), "--epochs", "3", "--gate", "learned"]))


def test_segmentation_trains_behind_the_entropy_gate(tmp_path):
    from test_train import small_run

    from msvit.train import train

    train(small_run(tmp_path, "--task", "segmentation", "--epochs", "1", "--max-steps", "1", gate=ENTROPY))
    assert isinstance(msvit.load_segmenter(tmp_path).backbone.gate, EntropyGate)
