"""Batched decode at 8K: SmolLM2-135M-Instruct through transformers against its exact MLA + DSA conversion.

    python benchmarks/long_context_batch_decode.py [--batch 4] [--context 8184] [--topk 1024]
        [--json benchmarks/results_long_context_batch_decode.json]

The same held-out window (long_context.py's) repeated `--batch` times: the source prefills it into transformers'
DynamicCache, ours (long_context.py's "exact" model, converted there) prefills densely into an MlaDsaCache; then
each decodes 8 tokens, ours with DSA at k = `--topk`. Reported: prefill seconds and the median ms per decode step,
one process, one run.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from long_context import model_dir, windows_of
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from mla_dsa import MlaDsaCache, MlaDsaForCausalLM
from mla_dsa.loading import loading_kwargs
from mla_dsa.modeling.modeling_mla_dsa import CACHE_NAME
from mla_dsa.smollm2 import smollm2_checkpoint

STEPS = 8


@torch.no_grad()
def timed(model, batch: torch.Tensor, context: int, cache, prefill: dict, step: dict) -> dict:
    start = time.perf_counter()
    model(batch[:, :context], use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache}, **prefill)
    prefill_s = time.perf_counter() - start
    times = []
    for t in range(context, context + STEPS):
        start = time.perf_counter()
        model(batch[:, t : t + 1], use_cache=True, **{CACHE_NAME: cache}, **step)
        times.append(time.perf_counter() - start)
    return {"prefill_s": prefill_s, "decode_ms": 1000 * sorted(times)[STEPS // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=8184)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "mla-dsa" / "long-context"))
    parser.add_argument("--json", default="benchmarks/results_long_context_batch_decode.json")
    args = parser.parse_args()
    source_dir = smollm2_checkpoint()
    window = windows_of(AutoTokenizer.from_pretrained(source_dir), args.context + STEPS, 1)[0]
    batch = window[None].expand(args.batch, -1).contiguous()
    results = {"batch": args.batch, "context": args.context, "threads": torch.get_num_threads(), "rows": []}
    source = AutoModelForCausalLM.from_pretrained(source_dir, **loading_kwargs({"dtype": torch.float32})).eval()
    row = {"model": "source", **timed(source, batch, args.context, DynamicCache(config=source.config), {}, {})}
    results["rows"].append(row)
    print(json.dumps(row), flush=True)
    del source
    ours = MlaDsaForCausalLM.from_pretrained(model_dir(Path(args.out), "exact"), dtype=torch.float32).eval()
    row = {"model": "exact", "attention": "dsa", "index_topk": args.topk,
           **timed(ours, batch, args.context, MlaDsaCache(ours.config), {"use_sparse_attention": False},
                   {"index_topk": args.topk})}  # fmt: skip
    results["rows"].append(row)
    print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
