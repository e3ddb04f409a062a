"""What `--calibration-steps` buys: SmolLM2-135M-Instruct converted (the default exact GQA conversion, the default
indexer, 4,096 calibration tokens) with each step count, its conversion time, and `mla-dsa eval` on held-out text at
512 tokens (k = 64) and 2,048 (k = 256) against the source's dense loss.

    python benchmarks/calibration_steps.py [--steps 25 50 100] [--json benchmarks/results_calibration_steps.json]

Each conversion and evaluation is the CLI a user runs, one after another in one process tree (a conversion with 100
steps takes about 16 minutes on 2 cores). Calibration text: `mla_dsa.demo_smollm2.calibration_files()`; held-out
text: every third held-out standard-library file.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mla_dsa.data import stdlib_files
from mla_dsa.demo_smollm2 import calibration_files
from mla_dsa.smollm2 import smollm2_checkpoint

EVALUATIONS = ((512, 64, 16, 4), (2048, 256, 4, 1))  # tokens per window, k, windows, batch size


def mla_dsa(*args: str) -> str:
    command = [sys.executable, "-m", "mla_dsa", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "mla-dsa" / "calibration-steps"))
    parser.add_argument("--json", default="benchmarks/results_calibration_steps.json")
    args = parser.parse_args()
    source = str(smollm2_checkpoint())
    held_out = [str(path) for path in stdlib_files("held_out")[::3]]
    rows = []
    for steps in args.steps:
        destination = str(Path(args.out) / f"steps-{steps}")
        start = time.perf_counter()
        options = ["--calibration-steps", str(steps), "--index-topk", "64", "--no-progress", "--overwrite"]
        report = mla_dsa("convert", source, destination, "--calibration-data", *calibration_files(), *options)
        row = {"steps": steps, "convert_seconds": round(time.perf_counter() - start), "report": report.strip()}
        for seq_len, topk, windows, batch_size in EVALUATIONS:
            result = json.loads(mla_dsa("eval", destination, "--source", source, "--data", *held_out, "--seq-len",
                                        str(seq_len), "--index-topk", str(topk), "--windows", str(windows),
                                        "--batch-size", str(batch_size), "--no-progress"))  # fmt: skip
            row[f"eval_{seq_len}"] = result
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
