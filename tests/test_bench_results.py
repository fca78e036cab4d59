"""Where timed benchmark runs write (issue 21): never over the committed bench/results/ unless asked
to record; a run of some suites merges into the summary already there; the summary's meaning
column names the batch that ran; the batch-1 target ratio is measured by the batch-1 test."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the suites' helpers are modules of bench/, not of the package

from results_io import LOCAL, RECORD_ENV, RESULTS, device_slug, record_from_env, results_root  # noqa: E402
from summary import markdown, write_summary  # noqa: E402

SEED = RESULTS / "cpu-amd-epyc" / "summary.json"  # a committed full-study summary


def tree_state(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_timed_run_writes_outside_the_committed_results_and_merges(tmp_path):
    """The cheapest timed bench (the batch-1 latencies, ViT-Ti) into a folder that already holds a
    full study: bench/results/ stays byte-identical, the batch-1 ratios are replaced, the rest kept."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = tmp_path / device_slug(device)
    folder.mkdir()
    shutil.copy(SEED, folder / "summary.json")
    seeded = json.loads(SEED.read_text())
    before = tree_state(RESULTS)
    env = {k: v for k, v in os.environ.items() if k not in (RECORD_ENV, "MSVIT_BENCH_OUT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "bench/bench_inference.py", "-k", "batch1", "--benchmark"]
    command += ["--bench-model", "vit_tiny_patch16_224", "--bench-out", str(tmp_path), "-q", "-p", "no:cacheprovider"]
    command += ["--bench-threads", "1"]  # one thread: the CPU-seconds ratio is recorded too (on CPU)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert tree_state(RESULTS) == before, "a timed run without --bench-record changed bench/results/"

    merged = json.loads((folder / "summary.json").read_text())
    for key in ("packed_over_vit_same_tokens_b1", "masked_over_packed_b1"):
        assert merged["ratios"][key] != seeded["ratios"][key]  # measured anew (a tie is not plausible)
        assert merged["ratios_spread"][key]["n"] == 21
    measured = ["masked_over_packed_b1", "packed_over_vit_same_tokens_b1"]
    if device == "cpu":  # the timed repetitions' CPU seconds, without the warm-up call
        measured.append("packed_over_vit_same_tokens_b1_cpu_seconds")
        assert merged["ratios_spread"]["packed_over_vit_same_tokens_b1_cpu_seconds"]["n"] == 21
    kept = set(seeded["ratios"]) - set(measured)
    assert {k: merged["ratios"][k] for k in kept} == {k: seeded["ratios"][k] for k in kept}
    assert merged["inference_points"] == seeded["inference_points"] and merged["peers"] == seeded["peers"]
    assert [sorted(run["ratios"]) for run in merged["runs"]] == [sorted(kept), measured]
    if device == "cpu":  # the batch-1 ratio is a target on CPU only
        table = (folder / "summary.md").read_text()
        row = next(line for line in table.splitlines() if line.startswith("| packed_over_vit_same_tokens_b1 "))
        assert "not measured" not in row and row.rstrip(" |").endswith("batch 1")
    assert (folder / "latency_vs_tokens.png").exists()  # plots from the kept inference points


def test_only_recording_writes_the_committed_results(monkeypatch):
    assert results_root() == LOCAL and LOCAL != RESULTS
    assert results_root(record=True) == RESULTS
    assert results_root(out="/tmp/x") == Path("/tmp/x")
    with pytest.raises(ValueError, match="give one"):
        results_root(record=True, out="/tmp/x")
    for value, wanted in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv(RECORD_ENV, value)
        assert record_from_env() is wanted
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "bench/results-local/" in ignored


def run(date: str, ratios: dict, **fields) -> dict:
    spreads = {k: {"min": v, "q1": v, "median": v, "q3": v, "max": v, "n": 3} for k, v in ratios.items()}
    return {"dtype": "float32", "ratios": dict(ratios), "ratios_spread": spreads, "date": date, **fields}


def test_partial_run_merges_into_the_summary(tmp_path, monkeypatch):
    import summary as summary_module

    monkeypatch.setattr(summary_module, "environment", lambda device: {"device": "CPU", "torch": "t", "triton": "x"})
    first = run("2026-01-01", {"packed_over_vit_same_tokens": 1.0, "tokenizer_share_torch": 0.03}, inference_batch=32)
    first["peers"] = {"b1": {"batch": 1}}
    write_summary(first, "cpu", tmp_path)
    second = run("2026-01-02", {"tokenizer_share_torch": 0.05, "pruned_over_unpruned": 0.7}, tokenizer_batch=16)
    second["peers"] = {"b32": {"batch": 32}}
    second["ratios"]["pruned_over_unpruned_trunk_macs"] = 0.69  # a MAC ratio: no spread
    merged = write_summary(second, "cpu", tmp_path)

    assert merged == json.loads((tmp_path / "summary.json").read_text())
    assert merged["ratios"] == {
        "packed_over_vit_same_tokens": 1.0,
        "tokenizer_share_torch": 0.05,
        "pruned_over_unpruned": 0.7,
        "pruned_over_unpruned_trunk_macs": 0.69,
    }
    assert merged["ratios_spread"]["tokenizer_share_torch"]["max"] == 0.05
    assert "pruned_over_unpruned_trunk_macs" not in merged["ratios_spread"]
    assert merged["peers"] == {"b1": {"batch": 1}, "b32": {"batch": 32}}
    assert merged["inference_batch"] == 32 and merged["batch_sizes"] == [16, 32]
    assert [(r["date"], r["ratios"]) for r in merged["runs"]] == [
        ("2026-01-01", ["packed_over_vit_same_tokens"]),
        ("2026-01-02", ["pruned_over_unpruned", "pruned_over_unpruned_trunk_macs", "tokenizer_share_torch"]),
    ]
    table = (tmp_path / "summary.md").read_text()
    assert "| packed_over_vit_same_tokens | 1.000 |" in table and "| tokenizer_share_torch | 0.050 |" in table
    assert "Merged from the runs below" in table


@pytest.mark.parametrize("batch", [8, 32])
def test_meaning_names_the_batch_that_ran(batch):
    payload = {"device": "CPU", "torch": "t", "triton": "x", "date": "d", "batch_sizes": [batch]}
    payload.update(run("d", {"packed_over_vit_same_tokens": 1.0, "masked_over_packed": 2.5}, inference_batch=batch))
    rows = {line.split(" | ")[0][2:]: line for line in markdown(payload, "cpu").splitlines() if line.startswith("| ")}
    stated = " (the target is stated for batch 32)" if batch != 32 else ""
    assert rows["packed_over_vit_same_tokens"].endswith(f"ViT-S at equal tokens, batch {batch}{stated} |")
    assert rows["masked_over_packed"].endswith(f"(MAC ratio 2.58), batch {batch}{stated} |")
    assert "not measured" in rows["packed_over_vit_same_tokens_b1"]
