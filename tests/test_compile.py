"""Every Triton kernel compiles clean ahead of time for sm_70 .. sm_90, on a machine without a GPU.

``python -m msvit_kernels.compile_report --quick`` compiles the representative set (the kernels and
configs of a ViT-S/16,32 and a ViT-B/16,32 training forward+backward, each kernel on each target)
with the ptxas inside the triton wheel. It runs in a subprocess because the report needs the real
launch configs, and this test session runs the kernels under TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys

import pytest

from msvit_kernels import _triton as launch

pytestmark = pytest.mark.skipif(launch.triton is None, reason="triton is not installed")

KERNELS = {
    "_gate_layer_kernel",
    "_entropy_kernel",
    "_counts_kernel",
    "_index_kernel",
    "_pack_kernel",
    "_unpack_kernel",
    "_attn_fwd_kernel",
    "_attn_bwd_delta_kernel",
    "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel",
}


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "msvit_kernels.compile_report", "--quick", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_for_every_target(report):
    seen = {(r["kernel"], r["target"]) for r in report["rows"]}
    missing = {(k, t) for k in KERNELS for t in (70, 75, 80, 86, 89, 90)} - seen
    assert not missing, f"not compiled: {sorted(missing)}"


def test_no_spills_and_shared_memory_within_limits(report):
    bad = [
        f"{r['kernel']} {r['config']} {r['dtype']} sm_{r['target']}: {r['error']} (spill {r['spill_bytes']} B, "
        f"smem {r['shared']} / {r['shared_limit']} B)"
        for r in report["rows"]
        if not r["ok"]
    ]
    assert not bad, "\n".join(bad)
    assert all(r["spill_bytes"] == 0 and r["shared"] <= launch.SHARED_MEMORY_LIMIT[r["target"]] for r in report["rows"])


def test_first_call_compiles_in_under_a_minute_per_target(report):
    slow = {t: s for t, s in report["first_call_seconds"].items() if s >= 60}
    assert not slow, f"first MSViT-S training call would compile for {slow} seconds"


def test_configs_follow_the_gpu_generation():
    from msvit_kernels import gate_kernel

    half = {"DOT_PRECISION": "tf32"}
    kernel = gate_kernel._GATE
    assert len(kernel.configs_for(70, half)) < len(kernel.configs_for(80, half))  # fp16 on a V100: small tiles
    with pytest.raises(RuntimeError, match="no tile config fits sm_70"):
        launch.TritonKernel(kernel.fn, [(kernel.configs[0][0], lambda cap, meta: cap >= 80)]).configs_for(70, {})


def test_bfloat16_before_ampere_is_a_clear_error():
    assert launch.bfloat16_gpu_reason(90, "NVIDIA H100") == ""
    message = launch.bfloat16_gpu_reason(70, "Tesla V100-SXM2-16GB")
    assert "Tesla V100" in message and "sm_70" in message and "float16" in message


def test_the_kernels_filter_plans_only_the_kernels_it_names():
    """``--kernels _attn_bwd_dq``: a kernel change compiles its own kernel, not the whole sweep (in a
    subprocess, as the report: planning binds the real jit functions, not interpreted ones)."""
    code = (
        "from msvit_kernels import compile_report as c; c._KERNELS[:] = ['_attn_bwd_dq']; "
        "print(sorted({c._RECORDS[j.workload][j.launch].kernel.name for j in c._plan(True, (80,))}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.stdout.strip() == "['_attn_bwd_dq_kernel']", proc.stderr[-3000:]
