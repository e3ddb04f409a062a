"""The DeepSeek-V3.2 indexer recipe on a converted checkpoint, from Python: dense warm-up, then evaluation.

    python examples/warmup_indexer.py DSA_CKPT --data a.txt b.txt --out warmed [--steps 300] [--seq-len 512]

Equivalent to `mla-dsa train-indexer DSA_CKPT --stage dense ...` followed by `mla-dsa eval`. For several GPUs or
machines, run the CLI under accelerate: `accelerate launch --config_file examples/accelerate_ddp.yaml -m mla_dsa
train-indexer ...`.
"""

import argparse
import json

import torch
from transformers import AutoTokenizer

from mla_dsa import MlaDsaForCausalLM
from mla_dsa.data import fixed_windows, text_files_corpus
from mla_dsa.training import evaluate_indexer, train_indexer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--eval-data", nargs="+", default=None, help="held-out files (default: --data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    windows = fixed_windows(text_files_corpus(args.eval_data or args.data, tokenizer), 16, args.seq_len)

    def report(checkpoint: str, label: str) -> None:
        model = MlaDsaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        print(label, json.dumps(evaluate_indexer(model, windows), indent=2))

    report(args.checkpoint, "before warm-up:")
    train_indexer(args.checkpoint, "dense", args.data, args.out, steps=args.steps, seq_len=args.seq_len,
                  batch_size=args.batch_size, progress=not args.no_progress)  # fmt: skip
    report(args.out, "after warm-up:")


if __name__ == "__main__":
    main()
