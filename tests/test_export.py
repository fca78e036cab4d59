"""``msvit.export`` / ``msvit export``: the static packed forward as an AOTInductor package that
loads in a process that never imports msvit and gives the model's logits; the exported program
of the CUDA code path (fake CUDA tensors, no GPU needed) holds aten ops only.

AOTInductor compiles C++ for a minute on two cores: one tiny model is packaged once per session
(a module fixture), and every other check looks at the ``torch.export`` program, which takes seconds.
"""

import collections
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import msvit
from msvit.cli import main as cli_main
from msvit.io.checkpoint import build_model, save_checkpoint
from msvit.models.export import export_program

from helpers import redraw_parameters

TINY = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "mlp_ratio": 2, "img_size": 32}
CONFIG = {
    "timm": {"name": "vit_tiny_patch16_224", "kwargs": {**TINY, "num_classes": 5}},
    "msvit": {"coarse_patch_size": 16, "hidden": 8},
    "data": {"name": "test", "image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "classes": list("abcde")},
}
LOAD_WITHOUT_MSVIT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._inductor import aoti_load_package

    package = aoti_load_package(sys.argv[1])
    torch.save(package(torch.load(sys.argv[2])), sys.argv[3])
    imported = sorted(m for m in sys.modules if m.split(".")[0] in ("msvit", "msvit_kernels"))
    print(json.dumps({"imported": imported, "metadata": package.get_metadata().get("msvit_input")}))
""")


def tiny_model(**options):
    options = options or {"coarse_patch_size": 16, "hidden": 8}
    return redraw_parameters(
        msvit.from_timm("vit_tiny_patch16_224", timm_kwargs={**TINY, "num_classes": 5}, **options)
    ).eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A checkpoint and its package, written once by ``msvit export`` (batch 3, budget 0.5)."""
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(root / "ckpt", redraw_parameters(build_model(CONFIG)), CONFIG)
    cli_main(
        [
            "export",
            "--checkpoint",
            str(root / "ckpt"),
            "--out",
            str(root / "tiny.pt2"),
            "--batch-size",
            "3",
            "--budget",
            "0.5",
        ]
    )
    return root


def test_the_package_gives_the_model_logits_in_a_process_without_msvit(package):
    model = msvit.load_checkpoint(package / "ckpt")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(images, package / "images.pt")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_MSVIT,
            str(package / "tiny.pt2"),
            str(package / "images.pt"),
            str(package / "logits.pt"),
        ],
        cwd=package,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    assert json.loads(report["metadata"]) == {
        "batch_size": 3,
        "image_size": [32, 32],
        "budget": 0.5,
        "capacity": None,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    with torch.no_grad():
        expected = model(images, budget=0.5)
        all_fine = model(images, budget=1.0)
    logits = torch.load(package / "logits.pt")
    assert logits.shape == (3, 5)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-5), (logits - expected).abs().max()
    assert not torch.allclose(logits, all_fine, atol=1e-3), "the budget must reach the package"


@pytest.mark.parametrize("options, budget", [({}, None), ({}, 3), ({"gate": "entropy", "scales": (8, 16, 32)}, 0.5)])
def test_the_exported_program_equals_the_model(options, budget):
    model = tiny_model(**options)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    program = export_program(model, 2, 32, budget=budget)
    with torch.no_grad():
        expected = model(images, budget=budget) if budget is not None else model(images)
        got = program.module()(images)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    assert model.kernels == "auto" and model.attention_backend == "auto", "the caller's model is left as it was"


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # deepcopy of the fake model
@pytest.mark.parametrize("options, budget", [({}, None), ({}, 0.5), ({"scales": (8, 16, 32), "hidden": 8}, None)])
def test_the_cuda_program_holds_only_aten_ops_on_cuda(options, budget):
    """On CUDA the model's Triton kernels are Python custom ops a package cannot carry (docs/design.md
    section 14): the exported CUDA forward must be aten ops only, which Inductor compiles itself.
    (The entropy gate cannot be checked so: its reference makes a ``torch.tensor`` on the images'
    device, which fake CUDA tensors cannot do without a driver.)"""
    model = tiny_model(**options)
    with FakeTensorMode(allow_non_fake_inputs=True):  # fake CUDA tensors: no GPU, no driver needed
        model.to("cuda")
        program = export_program(model, 2, 32, budget=budget)
    ops = collections.Counter(str(node.target) for node in program.graph.nodes if node.op == "call_function")
    assert ops and all(op.startswith("aten.") or op == "<built-in function getitem>" for op in ops), ops
    assert "aten.scaled_dot_product_attention.default" in ops or any("_scaled_dot_product" in op for op in ops)
    devices = {
        str(node.meta["val"].device) for node in program.graph.nodes if isinstance(node.meta.get("val"), torch.Tensor)
    }
    assert devices == {"cuda:0"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"path": "model.so"}, "a .pt2 file"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"image_size": (32,)}, "image_size must be a positive int H or"),
        ({"budget": 0.5, "capacity": 40}, "not both"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, change, message):
    arguments = {"path": tmp_path / "model.pt2", "batch_size": 2, "image_size": 32, **change}
    with pytest.raises(ValueError, match=message):
        msvit.export(tiny_model(), **arguments)


def test_a_training_model_or_another_module_is_refused(tmp_path):
    with pytest.raises(ValueError, match="call model.eval"):
        msvit.export(tiny_model().train(), tmp_path / "m.pt2", 1, 32)
    with pytest.raises(TypeError, match="takes an msvit.MSViT"):
        msvit.export(torch.nn.Linear(2, 2), tmp_path / "m.pt2", 1, 32)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out", "model.onnx"], "an AOTInductor package is a .pt2 file"),
        (["--out", "m.pt2", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--out", "m.pt2", "--image-size", "32", "32", "32"], "--image-size takes H or H W"),
        (["--out", "m.pt2", "--budget", "2"], "--budget is a fraction"),
    ],
)
def test_export_cli_refuses_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
