"""What any top-k can hold: per layer, the share of the dense head-summed attention mass inside its own k largest
weights (the oracle selection), on held-out standard-library windows.

    python benchmarks/oracle_recall.py [CKPT] [--seq-len 512] [--windows 8] [--ks 64 32]

CKPT defaults to the embedded dense model (converted on the fly). Averaged over queries with more than k keys, as
the indexer's recall@k in `mla-dsa eval`: a layer whose oracle recall is low cannot be sparse at that k without loss,
however good its indexer.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

import mla_dsa
from mla_dsa.data import fixed_windows, read_corpus, stdlib_files
from mla_dsa.default_model import ASSET_DIR
from mla_dsa.training import oracle_recall

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="default: L/8 and L/16")
    args = parser.parse_args()
    ks = args.ks or [args.seq_len // 8, args.seq_len // 16]
    windows = fixed_windows(read_corpus(stdlib_files("held_out")), args.windows, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            checkpoint = mla_dsa.convert_checkpoint(ASSET_DIR, Path(tmp) / "dsa", progress=False)
        model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        recall = {f"k={k}": [round(share, 3) for share in oracle_recall(model, windows, k)] for k in ks}
    print(json.dumps({"seq_len": args.seq_len, "windows": args.windows, "per_layer": recall}))
