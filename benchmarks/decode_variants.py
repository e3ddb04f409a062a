"""DSA decode step of the `mla-dsa bench` small model, four ways, in one run: eager on our growing cache (the default),
eager with FP8 latent + FP8 indexer caches, eager on a static cache, and `torch.compile(model.forward,
fullgraph=True)` (inductor, with `torch._inductor.config.freezing`) on the static cache.

    python benchmarks/decode_variants.py [--contexts 4096 16384] [--steps 10] [--json out.json]

Median ms per decoded token (batch 1, float32, random cache contents as `mla-dsa bench` fills them), the cache's
bytes per token per layer, and each variant's max |logit difference| from the default on the first step.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import StaticCache

import mla_dsa
from mla_dsa.bench import build_model, random_cache_contents, topk_for
from mla_dsa.modeling.cache_mla_dsa import pack_fp8_rows, pack_latent_rows


def filled_cache(model, contents, static_len: int | None = None):
    """Our cache (or a static one of `static_len` slots) holding `contents`, encoded as the model's config says."""
    config = model.config
    cache = StaticCache(config=config, max_cache_len=static_len) if static_len else mla_dsa.MlaDsaCache(config)
    for layer, (c_kv, k_rope, index_keys) in enumerate(contents):
        latent = torch.cat([c_kv, k_rope], dim=-1)
        if config.latent_cache_dtype == "fp8":
            latent = pack_latent_rows(latent, config.kv_lora_rank)
        if config.indexer_cache_dtype == "fp8":
            index_keys = pack_fp8_rows(index_keys, min(128, config.index_head_dim))
        cache.update(latent, index_keys, layer)
    return cache


@torch.no_grad()
def time_steps(forward, cache, context: int, steps: int, k: int) -> tuple[float, torch.Tensor]:
    """Median ms per step after two warm-up steps (the compiled variant compiles in the first), first logits."""
    tokens = torch.randint(0, 4096, (steps + 2, 1, 1), generator=torch.Generator().manual_seed(1))
    times, first = [], None
    for step in range(steps + 2):
        position = torch.tensor([[context + step]])
        start = time.perf_counter()
        out = forward(tokens[step], position_ids=position, cache=cache, use_cache=True, index_topk=k)
        elapsed = time.perf_counter() - start
        if step == 0:
            first = out.logits[0, -1].clone()
        elif step >= 2:
            times.append(elapsed)
    return 1000 * statistics.median(times), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = build_model(Path(tmp) / "bench-model")
        load = mla_dsa.MlaDsaForCausalLM.from_pretrained
        default = load(directory, dtype=torch.float32).eval()
        fp8 = load(directory, dtype=torch.float32, latent_cache_dtype="fp8", indexer_cache_dtype="fp8").eval()
        compiled = torch.compile(default.forward, fullgraph=True)
        for context in args.contexts:
            k, contents = topk_for(context), random_cache_contents(context)
            static_len = context + args.steps + 2
            variants = {
                "eager": (default.forward, filled_cache(default, contents)),
                "eager_fp8_caches": (fp8.forward, filled_cache(fp8, contents)),
                "eager_static": (default.forward, filled_cache(default, contents, static_len)),
                "compiled_static": (compiled, filled_cache(default, contents, static_len)),
            }
            row, reference = {"context": context, "index_topk": k}, None
            for name, (forward, cache) in variants.items():
                # freezing: weights as constants, the linear layers prepacked for oneDNN (what a CPU user should use)
                with torch._inductor.config.patch(freezing=name == "compiled_static"):
                    ms, logits = time_steps(forward, cache, context, args.steps, k)
                reference = logits if reference is None else reference
                row[f"{name}_ms"] = ms
                row[f"{name}_logit_diff"] = (logits - reference).abs().max().item()
            row["bytes_per_token_per_layer"] = {
                "default": variants["eager"][1].bytes_per_token_per_layer(),
                "fp8_caches": variants["eager_fp8_caches"][1].bytes_per_token_per_layer(),
            }
            row["compiled_speedup"] = row["eager_static_ms"] / row["compiled_static_ms"]
            print(json.dumps(row))
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
