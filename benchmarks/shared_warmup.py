"""What sharing top-k across layers costs in quality: the embedded model converted with one indexer per layer, one in
two and one in four (GLM-5's `indexer_types`), each given the same dense warm-up (a full layer's indexer learns from
the attention of every layer that uses its selection), then evaluated with every layer sparse on held-out text.

    python benchmarks/shared_warmup.py [--steps 200] [--seq-len 512] [--json results.json]

Prints sparse/dense loss and recall@k (the head-summed attention mass each layer's top-k holds, averaged over
layers) at k = L/8 and L/16.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mla_dsa
from mla_dsa.data import fixed_windows, read_corpus, stdlib_files
from mla_dsa.default_model import ASSET_DIR
from mla_dsa.training import evaluate_indexer, train_indexer

PATTERNS = {"every layer": "FFFF", "1 in 2": "FSFS", "1 in 4": "FSSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    windows = fixed_windows(read_corpus(stdlib_files("held_out")), args.eval_windows, args.seq_len)
    ks = [args.seq_len // 8, args.seq_len // 16]
    train_files = [str(p) for p in stdlib_files("train")]
    results = {"steps": args.steps, "seq_len": args.seq_len, "patterns": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, pattern in PATTERNS.items():
            converted = mla_dsa.convert_checkpoint(ASSET_DIR, Path(tmp) / pattern, indexer_init="svd",
                                                   index_topk=ks[0], indexer_types=pattern, progress=False)  # fmt: skip
            start = time.time()
            warm = train_indexer(converted, "dense", train_files, Path(tmp) / f"warm-{pattern}", steps=args.steps,
                                 seq_len=args.seq_len, progress=False)  # fmt: skip
            seconds = time.time() - start
            model = mla_dsa.MlaDsaForCausalLM.from_pretrained(warm, dtype=torch.float32)
            rows = {k: evaluate_indexer(model, windows, index_topk=k) for k in ks}
            results["patterns"][label] = {"indexer_types": pattern, "warmup_seconds": seconds, "by_k": rows}
            for k, row in rows.items():
                cells = [f"{label} ({pattern})", f"{k} (L/{args.seq_len // k})", f"{row['dense_loss']:.4f}",
                         f"{row['sparse_loss']:.4f}", f"{row['loss_ratio']:.4f}", f"{row['recall']:.3f}"]  # fmt: skip
                print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
