"""Shared top-k across layers (GLM-5's `indexer_types`) vs an indexer in every layer, same weights, in one run: the
`mla-dsa bench` small model with 4 layers, 1 full indexer in 4 (`FSSS`) against `FFFF`.

    python benchmarks/index_share.py [--contexts 16384 65536] [--prefill 8192] [--json out.json]

Decode: median ms per token on random cache contents (the shared layers hold no indexer keys). Prefill: one forward,
seconds. The speed-up is per-layer / shared. (Quality is a separate question: sharing must be trained for, see the
issue's item 4; this measures only cost.)
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mla_dsa
from mla_dsa.bench import BENCH_CONFIG, build_model, random_cache_contents, time_decode, topk_for

LAYERS = 4
PATTERNS = {"per_layer": None, "one_in_four": ["full", "shared", "shared", "shared"]}


def filled_cache(model, contents):
    cache = mla_dsa.MlaDsaCache(model.config)
    for layer, (c_kv, k_rope, index_keys) in enumerate(contents):
        if model.config.is_shared_indexer_layer(layer):
            index_keys = index_keys[..., :0]  # a shared layer caches no indexer keys
        cache.update(torch.cat([c_kv, k_rope], dim=-1), index_keys, layer)
    return cache


@torch.no_grad()
def prefill_seconds(model, length: int) -> float:
    input_ids = torch.randint(0, BENCH_CONFIG["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
    model(input_ids[:, :256], use_cache=True, logits_to_keep=1, index_topk=topk_for(length))  # warm-up
    start = time.perf_counter()
    model(input_ids, use_cache=True, logits_to_keep=1, index_topk=topk_for(length))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="*", default=[16384, 65536])
    parser.add_argument("--prefill", type=int, nargs="*", default=[8192])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = {**BENCH_CONFIG, "num_hidden_layers": LAYERS, "first_k_dense_replace": LAYERS}
    results = {"layers": LAYERS, "patterns": PATTERNS, "decode": [], "prefill": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = build_model(Path(tmp) / "bench-model", config)
        models = {name: mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                   indexer_types=types).eval()
                  for name, types in PATTERNS.items()}  # fmt: skip
        for context in args.contexts:
            contents = random_cache_contents(context, config)
            row = {"context": context, "index_topk": topk_for(context)}
            for name, model in models.items():
                cache = filled_cache(model, contents)
                row[f"{name}_ms"], _ = time_decode(model, cache, context, args.steps, index_topk=topk_for(context))
                row[f"{name}_bytes_per_token"] = sum(cache.bytes_per_token_by_layer())
            row["speedup"] = row["per_layer_ms"] / row["one_in_four_ms"]
            print(json.dumps(row))
            results["decode"].append(row)
        for length in args.prefill:
            row = {"length": length, "index_topk": topk_for(length)}
            for name, model in models.items():
                row[f"{name}_s"] = prefill_seconds(model, length)
            row["speedup"] = row["per_layer_s"] / row["one_in_four_s"]
            print(json.dumps(row))
            results["prefill"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
