"""Where sparse prefill should switch from masked MHA mode to absorbed (MQA) mode, on this machine.

    python benchmarks/prefill_crossover.py [--lengths 512 1024 2048 4096 8192] [--topk 256]

Times one DSA prefill of the benchmark model (mla_dsa/bench.py) per length in each attention mode. MHA mode expands
every latent row per head and masks the top-k (O(L^2) but dense BLAS); absorbed mode gathers k latent rows per query
(O(L * k)). The crossover is the `mha_max_length` default.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mla_dsa
from mla_dsa.bench import BENCH_CONFIG, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = mla_dsa.MlaDsaForCausalLM.from_pretrained(build_model(Path(tmp) / "m"), index_topk=args.topk).eval()
        generator = torch.Generator().manual_seed(0)
        for length in args.lengths:
            ids = torch.randint(0, BENCH_CONFIG["vocab_size"], (1, length), generator=generator)
            row = {"length": length, "index_topk": args.topk}
            for mode in ("mha", "absorbed"):
                with torch.no_grad():
                    model(ids[:, :64], use_cache=False, attention_mode=mode)  # warm-up
                    start = time.perf_counter()
                    model(ids, use_cache=False, logits_to_keep=1, attention_mode=mode)
                row[f"{mode}_seconds"] = time.perf_counter() - start
            row["faster"] = "mha" if row["mha_seconds"] < row["absorbed_seconds"] else "absorbed"
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
