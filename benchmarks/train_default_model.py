"""Reproduces the embedded default model shipped in mla_dsa/assets/stdlib-v3-dense/.

    python benchmarks/train_default_model.py [--out DIR] [--phase STEPS SEQ_LEN BATCH ...]

Trains transformers' own DeepseekV3ForCausalLM (byte-level, DeepSeek-V3 shape in miniature) from scratch on the train
split of the running interpreter's standard library source: 8000 steps of 8 x 256 bytes, then 2000 of 4 x 512
(20M bytes, about an hour on 2 CPU cores). Prints and writes (benchmarks/results_default_model.json) the held-out loss
in nats per byte at L = 512 on the held-out stdlib files.
"""

import argparse
import json
from pathlib import Path

import torch

from mla_dsa.default_model import ASSET_DIR, DEFAULT_PHASES, pretrain_default_model

RESULTS = Path(__file__).with_name("results_default_model.json")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ASSET_DIR))
    parser.add_argument("--phase", nargs=3, type=int, action="append", metavar=("STEPS", "SEQ_LEN", "BATCH"),
                        help=f"a training phase; repeat for several (default: {DEFAULT_PHASES})")  # fmt: skip
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    phases = tuple(tuple(phase) for phase in args.phase) if args.phase else DEFAULT_PHASES
    result = pretrain_default_model(args.out, phases=phases, learning_rate=args.learning_rate)
    result["torch"] = torch.__version__
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
