"""Side-by-side decode and prefill benchmark: ours (dense MQA and DSA) vs transformers' DeepseekV32, same weights.

    mla-dsa bench [--contexts 4096 16384 65536] [--out bench-out]      (or python benchmarks/bench.py ...)

One benchmark model - 2 layers, hidden 1024, 16 heads, kv_lora_rank 512, rope 64, nope 128, v 128, 16 indexer heads
x 128, top-k 2048 (256 for contexts <= 8K) - is built by transformers' DeepseekV32ForCausalLM and loaded into both.
Decode caches are filled with random latents (identical for both implementations) instead of a prefill. Prefill
runs in a subprocess per length so its peak RSS is its own. Writes results.json and decode.png (log-scale ms/token vs
context with the memory-bandwidth roofline: bytes touched per decode step / measured bandwidth).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_CONFIG = dict(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=512,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    index_n_heads=16,
    index_head_dim=128,
    index_topk=2048,
    first_k_dense_replace=2,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    max_position_embeddings=131072,
)


def topk_for(context: int) -> int:
    return 256 if context <= 8192 else 2048


def build_model(directory: Path) -> Path:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**BENCH_CONFIG))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(directory)
    return directory


def set_their_topk(theirs, k: int) -> None:
    """transformers' DeepseekV32 has no per-call k: its indexers copy index_topk at construction (ours takes
    `index_topk=` as a forward argument)."""
    theirs.config.index_topk = k
    for layer in theirs.model.layers:
        layer.self_attn.indexer.index_topk = k


def load_models(directory: Path):
    from transformers import DeepseekV32ForCausalLM

    import mla_dsa

    theirs = DeepseekV32ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return theirs, ours


def random_cache_contents(context: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: latent c_KV [1, T, 512], rotated k_R [1, T, 64], indexer keys [1, T, 128]."""
    generator = torch.Generator().manual_seed(seed)
    cfg = BENCH_CONFIG
    layers = []
    for _ in range(cfg["num_hidden_layers"]):
        c_kv = torch.randn(1, context, cfg["kv_lora_rank"], generator=generator)
        k_rope = torch.randn(1, context, cfg["qk_rope_head_dim"], generator=generator)
        index_keys = torch.randn(1, context, cfg["index_head_dim"], generator=generator)
        layers.append((c_kv, k_rope, index_keys))
    return layers


def our_cache(model, contents):
    from mla_dsa import MlaDsaCache

    cache = MlaDsaCache(model.config)
    for layer, (c_kv, k_rope, index_keys) in enumerate(contents):
        cache.update(torch.cat([c_kv, k_rope], dim=-1), index_keys, layer)
    return cache


def their_cache(model, contents):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (c_kv, k_rope, index_keys) in enumerate(contents):
        cache.update(c_kv.unsqueeze(1), k_rope.unsqueeze(1), layer)
        cache.update_indexer(index_keys, layer)
    return cache


@torch.no_grad()
def time_decode(model, cache, context: int, steps: int, seed: int = 1, **settings) -> tuple[float, torch.Tensor]:
    """Median ms per decoded token over `steps` tokens; also the first step's logits. `settings`: forward arguments
    (ours: index_topk, use_sparse_attention)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, BENCH_CONFIG["vocab_size"], (steps + 1,), generator=generator)
    times, first = [], None
    for step in range(steps + 1):
        position = torch.tensor([[context + step]])
        start = time.perf_counter()
        out = model(tokens[step].view(1, 1), position_ids=position, cache=cache, use_cache=True, **settings)
        elapsed = time.perf_counter() - start
        if step == 0:
            first = out.logits[0, -1].clone()
        else:
            times.append(elapsed)  # step 0 warms up
    times.sort()
    return 1000 * times[len(times) // 2], first


def measure_bandwidth() -> float:
    """Bytes/s of a large in-memory copy on this machine (read + write counted)."""
    source = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def decode_bytes(context: int, sparse: bool, weight_bytes: int, itemsize: int = 4) -> int:
    """Bytes a decode step must touch: the weights, plus per layer the indexer keys (all T) and the latent rows read
    (k of them with DSA, all T dense)."""
    cfg = BENCH_CONFIG
    row = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * itemsize
    per_layer = context * row if not sparse else context * cfg["index_head_dim"] * itemsize + topk_for(context) * row
    return weight_bytes + cfg["num_hidden_layers"] * per_layer


def prefill_in_subprocess(model_dir: Path, length: int, which: str) -> dict:
    code = f"""
import json, resource, time, torch
import mla_dsa
from transformers import DeepseekV32ForCausalLM
torch.manual_seed(0)
ids = torch.randint(0, {BENCH_CONFIG["vocab_size"]}, (1, {length}))
model_class = mla_dsa.MlaDsaForCausalLM if {which!r} == "ours" else DeepseekV32ForCausalLM
model = model_class.from_pretrained({str(model_dir)!r}, dtype=torch.float32, index_topk={topk_for(length)})
model.eval()

def peak_rss_gb():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, from before exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

base = peak_rss_gb()
start = time.perf_counter()
with torch.no_grad():
    model(ids, use_cache=True, logits_to_keep=1)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, peak_rss_gb=peak_rss_gb(), rss_before_gb=base)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def decode_row(theirs, ours, context: int, args, weight_bytes: int, bandwidth: float) -> dict:
    """One context's decode measurements: ours with DSA and dense (absorbed MQA), transformers' where it is not too
    slow, and the memory-bandwidth rooflines."""
    k = topk_for(context)
    set_their_topk(theirs, k)
    contents = random_cache_contents(context)
    row = {"context": context, "index_topk": k}
    row["ours_dsa_ms"], our_logits = time_decode(ours, our_cache(ours, contents), context, args.steps, index_topk=k)
    row["ours_dense_mqa_ms"], _ = time_decode(ours, our_cache(ours, contents), context, args.steps, index_topk=k,
                                              use_sparse_attention=False)  # fmt: skip
    if context <= args.theirs_max_context:
        steps = args.steps if context <= 16384 else 2
        row["theirs_ms"], their_logits = time_decode(theirs, their_cache(theirs, contents), context, steps)
        row["logit_max_abs_diff"] = (their_logits - our_logits).abs().max().item()
        row["speedup_vs_theirs"] = row["theirs_ms"] / row["ours_dsa_ms"]
    row["roofline_dsa_ms"] = 1000 * decode_bytes(context, True, weight_bytes) / bandwidth
    row["roofline_dense_ms"] = 1000 * decode_bytes(context, False, weight_bytes) / bandwidth
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mla-dsa bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--theirs-max-context", type=int, default=65536, help="skip transformers beyond this")
    parser.add_argument("--prefill", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--theirs-prefill-max", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-decode", action="store_true", help="prefill measurements only")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": BENCH_CONFIG, "threads": torch.get_num_threads(), "decode": [], "prefill": []}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "bench-model")
        theirs, ours = load_models(model_dir)
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        results["bandwidth_gb_s"] = measure_bandwidth() / 1e9

        # Logits agree on a real forward with DSA active (k < L).
        ids = torch.randint(0, BENCH_CONFIG["vocab_size"], (1, 600))
        with torch.no_grad():
            set_their_topk(theirs, 256)
            diff = (theirs(ids).logits - ours(ids, index_topk=256).logits).abs().max().item()
        results["prefill_logit_max_abs_diff_600_tokens"] = diff
        print(f"logits ours vs transformers (600 tokens, k=256): max |diff| = {diff:.2e}")

        for context in [] if args.no_decode else args.contexts:
            row = decode_row(theirs, ours, context, args, weight_bytes, results["bandwidth_gb_s"] * 1e9)
            print(json.dumps(row))
            results["decode"].append(row)

        for length in args.prefill:
            row = {
                "length": length,
                "index_topk": topk_for(length),
                "ours": prefill_in_subprocess(model_dir, length, "ours"),
            }
            if length <= args.theirs_prefill_max:
                row["theirs"] = prefill_in_subprocess(model_dir, length, "theirs")
            print(json.dumps(row))
            results["prefill"].append(row)

    cfg = BENCH_CONFIG
    results["cache_bytes_per_token_per_layer"] = {
        "fp32": (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + cfg["index_head_dim"]) * 4,
        "bf16": (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + cfg["index_head_dim"]) * 2,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "decode.png")
    print(f"wrote {out / 'results.json'} and {out / 'decode.png'}")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    rows = results["decode"]
    contexts = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(contexts, [r["ours_dsa_ms"] for r in rows], "o-", label="ours, DSA (absorbed, top-k gather)")
    ax.plot(contexts, [r["ours_dense_mqa_ms"] for r in rows], "s-", label="ours, dense MLA (absorbed MQA)")
    theirs = [(r["context"], r["theirs_ms"]) for r in rows if "theirs_ms" in r]
    if theirs:
        ax.plot(*zip(*theirs, strict=True), "^-", label="transformers DeepseekV32 (DSA as a mask)")
    ax.plot(contexts, [r["roofline_dsa_ms"] for r in rows], "k--", label="roofline, DSA (bytes / bandwidth)")
    ax.plot(contexts, [r["roofline_dense_ms"] for r in rows], "k:", label="roofline, dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per decoded token")
    ax.set_title(f"Decode, 2-layer V3-geometry model, fp32, {results['threads']} CPU threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
