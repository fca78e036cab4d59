"""``msvit.export`` / ``msvit export``: the static packed forward as an AOTInductor package that
loads in a process that never imports msvit and gives the model's logits; the exported program
of the CUDA code path (fake CUDA tensors, no GPU needed) holds aten ops only, or with
``kernels="triton"`` the package's Triton kernels as ``triton_op``s AOTInductor compiles.

AOTInductor compiles C++ for a minute on two cores: one tiny model is packaged once per session
(a module fixture), and every other check looks at the ``torch.export`` program, which takes seconds.
"""

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import msvit
from msvit.cli import main as cli_main
from msvit.io.checkpoint import build_model, save_checkpoint
from msvit.models.export import export_program

from helpers import redraw_parameters

ROOT = Path(__file__).resolve().parents[1]

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


# Exports the CUDA program with kernels="triton" under fake CUDA tensors (no GPU, no driver), in a process
# without TRITON_INTERPRET: the interpreter reads data pointers, so there the launchers stay opaque
# custom ops. Per case it reports the msvit ops of the exported program and, after decomposing the
# triton_ops the way AOTInductor does, the Triton kernels they became and any msvit op left opaque.
# The last case is a control: an opaque custom_op must be reported as one.
TRITON_EXPORT = textwrap.dedent("""
    import collections, json, os, sys, warnings
    import torch
    import msvit
    inductor_on_import = "torch._inductor" in sys.modules  # registering the triton_ops must not load it
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from msvit.models.export import export_program
    from msvit_kernels import _triton

    assert not _triton.INTERPRET and os.environ.get("TRITON_INTERPRET") is None
    warnings.simplefilter("ignore")

    @torch.library.custom_op("i30test::opaque", mutates_args=())
    def opaque(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    opaque.register_fake(lambda x: torch.empty_like(x))

    class Control(torch.nn.Module):
        def forward(self, x):
            return opaque(x) + 1

    def msvit_ops(program):
        return collections.Counter(
            str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).split(".")[0] in ("msvit", "i30test")
        )

    def kernels(program):
        found = collections.Counter()
        for node in program.graph.nodes:
            if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                configs = len(kernel.configs) if hasattr(kernel, "configs") else 1
                found[f"{getattr(kernel, 'fn', kernel).__name__} ({configs} configs)"] += 1
        return found

    report = []
    tiny = dict(patch_size=8, embed_dim=24, depth=1, num_heads=2, mlp_ratio=2, img_size=32, num_classes=5)
    for options, budget in json.loads(sys.argv[1]):
        model = None if options is None else msvit.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny, **options)
        with FakeTensorMode(allow_non_fake_inputs=True):
            if model is None:
                program = torch.export.export(Control(), (torch.zeros(4, device="cuda"),), strict=False)
            else:
                program = export_program(model.eval().to("cuda"), 2, 32, budget=budget, kernels="triton")
        decomposed = program.run_decompositions(decompose_custom_triton_ops=True)
        devices = {str(node.meta["val"].device) for node in program.graph.nodes
                   if isinstance(node.meta.get("val"), torch.Tensor)}
        report.append({"exported": msvit_ops(program), "opaque": msvit_ops(decomposed),
                       "kernels": kernels(decomposed), "devices": sorted(devices)})
    print(json.dumps({"inductor_on_import": inductor_on_import, "cases": report}))
""")
TRITON_CASES = [
    ({"coarse_patch_size": 16, "hidden": 8}, 0.5),
    ({"scales": [8, 16, 32], "hidden": 8}, None),
    ({"scales": [8, 16, 32], "gate": "entropy", "entropy_thresholds": [4.0, 3.0]}, 0.5),
    (None, None),
]


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
    """With ``kernels="reference"`` (the default) the exported CUDA forward is aten ops only, which
    Inductor compiles itself (docs/design.md section 14).
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


@pytest.fixture(scope="module")
def triton_export():
    """The report of ``TRITON_EXPORT`` on ``TRITON_CASES``: one subprocess (an export takes seconds,
    importing torch and msvit most of them)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", TRITON_EXPORT, json.dumps(TRITON_CASES)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_msvit_does_not_load_inductor_to_register_the_triton_ops(triton_export):
    """``torch.library.triton_op`` scans its body with ``torch._inductor`` (seconds at import):
    ``kernel_op`` names the kernels instead, so ``import msvit`` stays light."""
    assert triton_export["inductor_on_import"] is False


def test_the_cuda_program_with_triton_kernels_holds_them_as_triton_ops(triton_export):
    """kernels="triton": the gate, index, pack and attention launchers are named triton_ops in the
    exported program, and decomposing them (as AOTInductor does before compiling) leaves their
    Triton kernels and no opaque op, so the package carries the kernels (docs/design.md section 14).
    Without a driver the configs are the oldest target's (``PORTABLE_CAPABILITY``, sm_70):
    for the fp32 pack, the two that fit sm_70; one for the fp32 attention there."""
    two, three, entropy, _ = triton_export["cases"]
    assert two["exported"] == {
        "msvit.fused_gate.default": 1,
        "msvit.mixed_scale_counts.default": 1,
        "msvit.mixed_scale_maps.default": 1,
        "msvit.gather_embed_pack.default": 1,
        "msvit.triton_varlen_attention.default": 1,
    }
    assert two["opaque"] == {} and three["opaque"] == {}
    assert two["kernels"] == {
        "_gate_layer_kernel (2 configs)": 3,
        "_counts_kernel (1 configs)": 1,
        "_index_kernel (1 configs)": 1,
        "_pack_kernel (2 configs)": 1,
        "_attn_fwd_kernel (1 configs)": 1,
    }
    assert three["exported"] == {
        "msvit.fused_gate.default": 2,
        "msvit.tree_counts.default": 1,
        "msvit.tree_maps.default": 1,
        "msvit.gather_embed_pack.default": 1,
        "msvit.triton_varlen_attention.default": 1,
    }
    assert three["kernels"] == {
        "_gate_layer_kernel (2 configs)": 6,
        "_tree_counts_kernel (1 configs)": 1,
        "_tree_index_kernel (1 configs)": 1,
        "_pack_kernel (2 configs)": 1,
        "_attn_fwd_kernel (1 configs)": 1,
    }
    assert entropy["exported"] == {
        "msvit.patch_entropy.default": 2,
        "msvit.tree_counts.default": 1,
        "msvit.tree_maps.default": 1,
        "msvit.gather_embed_pack.default": 1,
        "msvit.triton_varlen_attention.default": 1,
    }
    assert entropy["opaque"] == {}
    assert two["devices"] == three["devices"] == entropy["devices"] == ["cuda:0"]


def test_the_triton_op_check_tells_an_opaque_custom_op(triton_export):
    """The control: a custom_op survives the decomposition, so the check above can fail."""
    control = triton_export["cases"][-1]
    assert control["exported"] == {"i30test.opaque.default": 1}
    assert control["opaque"] == {"i30test.opaque.default": 1} and control["kernels"] == {}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kernels": "triton"}, "pass device='cuda'"),
        ({"kernels": "auto"}, "kernels must be one of 'reference', 'triton'"),
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
        (["--out", "m.pt2", "--kernels", "triton"], "--kernels triton packages the CUDA kernels: add --device cuda"),
    ],
)
def test_export_cli_refuses_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_index_builders_are_ops_torch_compile_traces_whole():
    """The index builders launch through ops when traced (the ops ``torch.export`` records; under the
    interpreter opaque custom ops whose fake is their body): a static forward compiles as one graph
    and gives the torch builders' maps, two scales (with border cells) and three."""
    from msvit_kernels.index_kernel import triton_mixed_scale_index
    from msvit_kernels.scale_tree import ScaleTree, tree_index, tree_static_shape
    from msvit_kernels.tree_index_kernel import triton_tree_index
    from msvit_kernels.varlen import mixed_scale_index, static_shape

    generator = torch.Generator().manual_seed(2)
    mask = torch.rand(3, 6, generator=generator) > 0.5
    shape = static_shape(3, 6, 2, 1, capacity=3 * (1 + 35), n_border=11)  # room for all fine: padding rows
    tree = ScaleTree.of((8, 4), 2, 3)
    decisions = torch.rand(2, tree.decisions, generator=generator) > 0.4
    tree_shape = tree_static_shape(2, tree, 1, capacity=2 * (1 + 32))

    def maps(index):
        return index.rows, index.position, index.fine_to_row, index.row_image, index.cu_seqlens

    def build(mask, decisions):
        flat = triton_mixed_scale_index(mask, (2, 3), 2, 1, shape, fine_grid=(5, 7))
        return maps(flat) + maps(triton_tree_index(decisions, tree, 1, tree_shape))

    got = torch.compile(build, backend="aot_eager", fullgraph=True)(mask, decisions)
    expected = maps(mixed_scale_index(mask, (2, 3), 2, 1, shape, (5, 7))) + maps(
        tree_index(decisions, tree, 1, tree_shape)
    )
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
