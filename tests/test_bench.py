"""`mla-dsa bench` runs end to end on a short context and its correctness column holds (speed is not asserted)."""

import json

from mla_dsa.cli import main


def test_bench_smoke(tmp_path):
    assert main(["bench", "--contexts", "512", "--prefill", "--steps", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["prefill_logit_max_abs_diff_600_tokens"] < 1e-3  # ours vs transformers, DSA active (k=256)
    (row,) = results["decode"]
    assert row["context"] == 512 and row["logit_max_abs_diff"] < 1e-3
    assert row["ours_dsa_ms"] > 0 and row["ours_dense_mqa_ms"] > 0 and row["theirs_ms"] > 0
    assert results["cache_bytes_per_token_per_layer"] == {"fp32": 2816, "bf16": 1408}
