"""benchmarks/training_memory.py, on a tiny byte-level DSA checkpoint: each (stage, length) runs one step in a fresh
process and its row says how much memory and time it took, so the script cannot rot between its long runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peers import save_byte_level_dsa

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "training_memory.py"


@pytest.mark.slow  # three processes, each loading torch and transformers
def test_each_stage_reports_its_steps_peak_memory_and_time(tmp_path):
    checkpoint = save_byte_level_dsa(tmp_path / "dense", tmp_path / "dsa", index_topk=8)
    results_json = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(checkpoint), "--lengths", "96", "128",
                           "--stages", "sparse+lora", "--json", str(results_json)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(results_json.read_text())["rows"]
    assert [(row["stage"], row["length"]) for row in rows] == [("sparse+lora", 96), ("sparse+lora", 128)]
    for row in rows:
        assert "error" not in row, row
        assert row["peak_mb"] >= row["before_mb"] > 0 and row["seconds"] > 0 and row["textbook_kl_mb"] > 0
