"""Reproduces the embedded default model shipped in mla_dsa/assets/stdlib-v3-dense/.

    python benchmarks/train_default_model.py [--out DIR] [--steps N]

Trains transformers' own DeepseekV3ForCausalLM (byte-level, DeepSeek-V3 shape in miniature) on the train split of the
running interpreter's standard library source. About 20 minutes on 2 CPU cores with the defaults.
"""

import argparse

import torch

from mla_dsa.default_model import ASSET_DIR, pretrain_default_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ASSET_DIR))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrain_default_model(args.out, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size)
