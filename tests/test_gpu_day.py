"""benchmarks/gpu_day.py, the one command a lent GPU runs: it refuses in one line where torch sees no CUDA device,
and its CPU dry run (toy sizes, every section) writes every table, so the script cannot rot between loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_day.py"


@pytest.mark.slow  # a subprocess that imports torch
def test_gpu_day_without_cuda_is_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "no CUDA device" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # every section at toy sizes: about 90 s on 2 cores
def test_gpu_day_dry_run_fills_every_table(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert files == ["gpu_day.log", "results.json", "tables.md"]  # the loan brings back at most 8 files
    assert sum(path.stat().st_size for path in out.iterdir()) < 16 * 2**20
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    assert all(section["outcome"]["status"] == "finished" and not section["errors"] for section in sections.values())
    env = sections["env"]
    assert env["device"] and env["torch"] and env["transformers"] and env["bandwidth_gb_s"] > 0
    correctness = sections["correctness"]["rows"]
    variants = {"dense_mha", "dense_absorbed", "dsa_mha", "dsa_absorbed", "dsa_fp8_caches"}
    assert {(row["variant"], row["dtype"]) for row in correctness} == {
        (variant, dtype) for variant in variants for dtype in ("float32", "bfloat16")
    }
    assert all(row["passed"] for row in correctness)
    decode = sections["decode"]
    assert decode["float32_peer_agreement"]["max_abs_logit_diff"] < 1e-4
    assert {(row["context"], row["batch"]) for row in decode["rows"]} == {(96, 1), (96, 2), (160, 1), (160, 2)}
    for row in decode["rows"]:
        assert row["ours_dsa_eager_ms"] > 0 and row["ours_dense_eager_ms"] > 0 and row["theirs_ms"] > 0
        assert row["roofline_dsa_ms"] > 0 and row["speedup_vs_theirs"] > 0
    longest = [row for row in decode["rows"] if row["context"] == 160]
    assert all(row["ours_dsa_compiled_ms"] > 0 and row["ours_dense_compiled_ms"] > 0 for row in longest)
    assert all(
        row["compiled_vs_eager_max_abs_logit_diff"] < 1e-3 for row in decode["rows"] if "ours_dsa_compiled_ms" in row
    )
    prefill = sections["prefill"]["rows"]
    assert {(row["which"], row["length"]) for row in prefill} == {("ours", 96), ("ours", 160), ("theirs", 96),
                                                                  ("theirs", 160)}  # fmt: skip
    assert all(row["seconds"] > 0 and row["roofline_s"] > 0 for row in prefill)
    training = sections["training"]["rows"]
    assert {row["stage"] for row in training} == {"dense", "sparse"}
    assert all(row["seconds"] > 0 and row["loss"] > 0 for row in training)
    tables = (out / "tables.md").read_text()
    assert "| variant |" in tables and "| context |" in tables and "| prefill tokens |" in tables
    assert "| stage |" in tables and "profile of one" in (out / "gpu_day.log").read_text()
