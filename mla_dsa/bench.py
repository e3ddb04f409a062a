"""Side-by-side decode and prefill benchmark: ours (dense MQA and DSA) vs transformers' DeepseekV32, same weights.

    mla-dsa bench [--preset small|v32-attention] [--device cpu|cuda] [--dtype float32|bfloat16]
                  [--contexts 4096 16384 65536] [--batch 1 4 16] [--prefill 8192 32768] [--out bench-out]
    (or python benchmarks/bench.py ...)

One benchmark model is built by transformers' DeepseekV32ForCausalLM and loaded into both implementations:
  small          2 layers, hidden 1024, 16 heads, q_lora_rank 512, kv_lora_rank 512, rope 64, nope 128, v 128,
                 16 indexer heads x 128, dense MLP 2816, vocab 4096; top-k 2048 (256 for contexts <= 8K)
  v32-attention  DeepSeek-V3.2's attention: hidden 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, rope 64,
                 nope 128, v 128, 64 indexer heads x 128, top-k 2048; a dense MLP of 2048 (one routed expert's
                 width, not V3.2's 18,432 active MoE) and vocab 4096, so 2 layers weigh 0.55 B parameters
                 (2.2 GB in float32, 1.1 GB in bfloat16)
--layers sets the layer count of either. Models, caches and inputs live on --device in --dtype.

Decode: caches filled with random latents (identical for both implementations) instead of a prefill; a batch of
sequences shares the same cache contents. The memory roofline is the bytes a step must touch (weights once, the
cache rows read per sequence) / this device's measured copy bandwidth; beside it, the time the weights alone take
through this device's matrix-vector products (`time_weight_gemvs`). Prefill: one forward per length, each in its
own process so that its peak memory is its own; the compute roofline is the FLOPs a prefill must do (projections,
MLP, indexer, selected attention: see `prefill_flops`) / this device's measured matmul throughput in --dtype.
Writes results.json, decode.png and prefill.png (each plot only when it has rows).
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig  # DeepseekV32Config or MlaDsaConfig: the same field names

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

V32_ATTENTION_CONFIG = dict(
    vocab_size=4096,  # V3.2's 129,280 would add 1.9 B parameters that only the embedding and lm_head use
    hidden_size=7168,
    intermediate_size=2048,  # one routed expert's width: the benchmark is about attention, and weights stay modest
    num_hidden_layers=2,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=2048,
    first_k_dense_replace=61,  # every layer dense, whatever --layers says (V3.2 has 61 layers)
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    max_position_embeddings=163840,
)


@dataclass(frozen=True)
class Preset:
    config: dict
    short_context_topk: int  # k at contexts <= 8K (the small model keeps k/L near 1/16 there)


PRESETS = {
    "small": Preset(BENCH_CONFIG, short_context_topk=256),
    "v32-attention": Preset(V32_ATTENTION_CONFIG, short_context_topk=2048),  # V3.2's k at every length
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOGITS_CHECK_TOKENS, LOGITS_CHECK_TOPK = 600, 256  # a forward on which DSA is active (k < L) in either preset
PREFILL_WARMUP_TOKENS = 256  # one short forward before the timed one: first-call costs (cuBLAS handles, allocator)


def topk_for(context: int, preset: Preset = PRESETS["small"]) -> int:
    return preset.short_context_topk if context <= 8192 else preset.config["index_topk"]


# ---- device, timing and this machine's speeds ----


def resolve_device(name: str) -> torch.device:
    """The benchmark's device; `cuda` where torch sees none is one line on stderr and exit status 2."""
    if name == "cuda" and not torch.cuda.is_available():
        print(
            "mla-dsa bench: error: --device cuda, but torch sees no CUDA device (a CPU-only torch build, no GPU, or "
            "CUDA_VISIBLE_DEVICES hides it); run on a GPU machine or use --device cpu",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: a timer must wait for them; CPU work is done when the call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` timed calls of `work()`, after one untimed warm-up call."""
    work()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy in this device's memory (read + write counted). 256 MB on CPU, 1 GiB on a GPU (its
    copy takes well under a millisecond: a larger one keeps the timer's overhead small); both exceed any cache."""
    numel = (256 if device.type == "cuda" else 64) * 1024 * 1024
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    return 2 * numel * 4 / best_seconds(lambda: target.copy_(source), device, repeats=5)


def measure_gemm_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in `dtype`, up to 2048^3 on CPU and 8192^3 on a GPU (which needs more work per call to
    reach its peak), doubling the size from 256 while a call takes under 50 ms: a dtype this machine has no
    instructions for (bf16 on an AVX2-only CPU: about 1 GFLOP/s) is measured in a second, not in minutes at 2048^3.
    The prefill compute roofline divides by this."""
    largest = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator().manual_seed(0)
    n = 256
    while True:
        a = torch.randn(n, n, generator=generator).to(device, dtype)
        b = torch.randn(n, n, generator=generator).to(device, dtype)
        seconds = best_seconds(lambda: torch.matmul(a, b), device, repeats=4)  # noqa: B023 (called before a, b change)
        if n >= largest or seconds > 0.05:
            return 2 * n**3 / seconds
        n *= 2


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def peak_rss_gb() -> float:
    """VmHWM: this process's own peak RSS (ru_maxrss of a child would include its parent's, from before exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---- FLOPs a prefill must do (2 per multiply-add; norms, RoPE, softmax and top-k are left out: O(L) or O(L k)
# elementwise work, small beside the matmuls) ----


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def causal_key_count(length: int, k: int) -> int:
    """Keys read, summed over the `length` queries of a causal prefill in which query t (from 0) reads min(t + 1, k)
    keys: L (L + 1) / 2 when L <= k (dense), k (k + 1) / 2 + (L - k) k beyond."""
    if length <= k:
        return length * (length + 1) // 2
    return k * (k + 1) // 2 + (length - k) * k


def attention_projection_flops(config: "PreTrainedConfig", tokens: int) -> int:
    """q_a and q_b (or q_proj without a query LoRA), kv_a_proj_with_mqa, kv_b_proj (each token's keys and values
    expanded once) and o_proj."""
    heads, qk_head_dim = config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank:
        query = linear_flops(tokens, config.hidden_size, config.q_lora_rank)
        query += linear_flops(tokens, config.q_lora_rank, heads * qk_head_dim)
    else:
        query = linear_flops(tokens, config.hidden_size, heads * qk_head_dim)
    latent = linear_flops(tokens, config.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim)
    keys_values = linear_flops(tokens, config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim))
    output = linear_flops(tokens, heads * config.v_head_dim, config.hidden_size)
    return query + latent + keys_values + output


def mlp_flops(config: "PreTrainedConfig", tokens: int, layer: int) -> int:
    """The gated MLP (gate, up, down) of a dense layer; a MoE layer's router plus its active experts: the
    `num_experts_per_tok` routed ones and the shared ones."""
    if config.mlp_layer_types[layer] == "dense":
        return 3 * linear_flops(tokens, config.hidden_size, config.intermediate_size)
    router = linear_flops(tokens, config.hidden_size, config.n_routed_experts)
    active_experts = config.num_experts_per_tok + (config.n_shared_experts or 0)
    return router + active_experts * 3 * linear_flops(tokens, config.hidden_size, config.moe_intermediate_size)


def indexer_flops(config: "PreTrainedConfig", length: int) -> int:
    """The lightning indexer: its projections (wq_b from the query latent, wk and weights_proj from the hidden
    state) and its causal scores, I(t, s) = sum_j w_j ReLU(q_j(t) . k(s)) over s <= t: a dot product of
    index_head_dim per head and pair, then a weighted sum over the heads."""
    query_input = config.q_lora_rank or config.hidden_size
    projections = linear_flops(length, query_input, config.index_n_heads * config.index_head_dim)
    projections += linear_flops(length, config.hidden_size, config.index_head_dim)
    projections += linear_flops(length, config.hidden_size, config.index_n_heads)
    pairs = causal_key_count(length, length)
    scores = 2 * pairs * config.index_n_heads * config.index_head_dim + 2 * pairs * config.index_n_heads
    return projections + scores


def selected_attention_flops(config: "PreTrainedConfig", length: int, k: int) -> int:
    """Core attention over the keys each query reads (its top-k, or all earlier ones while there are <= k), in
    multi-head form: per head a qk_head_dim score and a v_head_dim weighted sum per key. This is the smaller of the two
    forms; the absorbed form (scores and sums over the 576-wide latent) does (576 + 512) / (192 + 128) = 3.4x more
    here, in exchange for never expanding keys and values."""
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    per_key = config.num_attention_heads * (qk_head_dim + config.v_head_dim)
    return 2 * causal_key_count(length, k) * per_key


def prefill_flops(config: "PreTrainedConfig", length: int, k: int, logits_kept: int = 1) -> int:
    """FLOPs of one causal prefill of `length` tokens with top-k `k`, every layer DSA (as DeepseekV32's), logits
    for the last `logits_kept` positions (the benchmark keeps 1)."""
    per_layer = (
        attention_projection_flops(config, length) + indexer_flops(config, length)
        + selected_attention_flops(config, length, k)
    )  # fmt: skip
    mlps = sum(mlp_flops(config, length, layer) for layer in range(config.num_hidden_layers))
    lm_head = linear_flops(logits_kept, config.hidden_size, config.vocab_size)
    return config.num_hidden_layers * per_layer + mlps + lm_head


# ---- bytes a decode step must touch ----


def decode_weight_bytes(model) -> int:
    """Every weight but the input embedding table, of which a step reads one row per sequence. (A MoE layer's
    unrouted experts are counted too: an upper bound; the presets have dense MLPs.)"""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def linear_weights(model) -> list[torch.Tensor]:
    """The weight of every nn.Linear a decode step multiplies by (the LM head included, the embedding table not)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def time_weight_gemvs(model, batch: int, device: torch.device, repeats: int = 5) -> float:
    """Seconds for `batch` rows through every Linear weight once (F.linear, this device's BLAS), fastest of
    `repeats`: what a decode step's weights alone cost at the matrix-vector throughput this machine's library
    reaches, the floor below which only other kernels (not better Python) can take a step."""
    pairs = [(torch.randn(batch, w.shape[1], device=device, dtype=w.dtype), w) for w in linear_weights(model)]
    with torch.no_grad():
        return best_seconds(lambda: [torch.nn.functional.linear(x, w) for x, w in pairs], device, repeats)


def decode_bytes(
    config: dict, context: int, k: int, sparse: bool, weight_bytes: int, itemsize: int, batch: int = 1
) -> int:
    """Bytes one decode step of `batch` sequences must touch: the weights once, plus per sequence and layer the
    indexer keys (all T) and the latent rows read (min(k, T) of them with DSA, all T dense)."""
    row = (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * itemsize
    if sparse:
        per_layer = context * config["index_head_dim"] * itemsize + min(k, context) * row
    else:
        per_layer = context * row
    return weight_bytes + batch * config["num_hidden_layers"] * per_layer


# ---- models and caches (defaults: the small preset, float32, on the CPU, one sequence, as benchmarks/tp_decode.py
# calls them) ----


def build_model(directory: Path, config: dict = BENCH_CONFIG, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.to(dtype).save_pretrained(directory)
    return directory


def set_their_topk(theirs, k: int) -> None:
    """transformers' DeepseekV32 has no per-call k: its indexers copy index_topk at construction (ours takes
    `index_topk=` as a forward argument)."""
    theirs.config.index_topk = k
    for layer in theirs.model.layers:
        layer.self_attn.indexer.index_topk = k


def load_models(directory: Path, device: torch.device, dtype: torch.dtype) -> tuple:
    from transformers import DeepseekV32ForCausalLM

    import mla_dsa

    from .loading import loading_kwargs

    theirs = DeepseekV32ForCausalLM.from_pretrained(directory, **loading_kwargs({"dtype": dtype})).to(device).eval()
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    return theirs, ours


def random_cache_contents(
    context: int,
    config: dict = BENCH_CONFIG,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: latent c_KV [1, T, kv_lora_rank], rotated k_R [1, T, rope], indexer keys [1, T, index_head_dim],
    drawn on the CPU (the same numbers on every device) in float32, then cast."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(config["num_hidden_layers"]):
        parts = [
            torch.randn(1, context, config[name], generator=generator).to(device, dtype)
            for name in ("kv_lora_rank", "qk_rope_head_dim", "index_head_dim")
        ]
        layers.append(tuple(parts))
    return layers


def our_cache(model, contents, batch: int = 1, max_cache_len: int | None = None):
    """Our cache holding `contents` for `batch` sequences: growing, or with `max_cache_len` a static one of that many
    slots (what a compiled decode step runs on)."""
    from transformers import StaticCache

    from mla_dsa import MlaDsaCache

    if max_cache_len is None:
        cache = MlaDsaCache(model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for layer, (c_kv, k_rope, index_keys) in enumerate(contents):
        latent = torch.cat([c_kv, k_rope], dim=-1).expand(batch, -1, -1)  # the cache copies it into its buffer
        cache.update(latent, index_keys.expand(batch, -1, -1), layer)
    return cache


def caches_expanded_kv(model) -> bool:
    """Whether this transformers release's DeepseekV32 caches per-head keys and values expanded through kv_b_proj
    ([B, heads, T, 192] and [B, heads, T, 128], as 5.17 does) rather than the latent ([B, 1, T, 512] and [B, 1, T, 64],
    as 5.25 does): probed with one token."""
    from transformers import DynamicCache

    from .modeling.modeling_mla_dsa import CACHE_NAME

    cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True, **{CACHE_NAME: cache})
    return cache.layers[0].keys.shape[1] != 1


@torch.no_grad()
def _expanded_keys_values(attention, latent: torch.Tensor, rotated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys [B, H, T, nope + rope] and values [B, H, T, v] from the (normed) latent [B, 1, T, R] and the
    rotated key [B, 1, T, rope], as DeepseekV32Attention computes them before caching where it caches them expanded."""
    config = attention.config
    batch_size, _, length, _ = latent.shape
    expanded = attention.kv_b_proj(latent[:, 0]).view(
        batch_size, length, -1, config.qk_nope_head_dim + config.v_head_dim
    )
    keys_nope, values = expanded.transpose(1, 2).split([config.qk_nope_head_dim, config.v_head_dim], dim=-1)
    return torch.cat([keys_nope, rotated.expand(-1, keys_nope.shape[1], -1, -1)], dim=-1), values


def their_cache(model, contents, batch: int = 1):
    """transformers' DynamicCache holding `contents` in the layout the running release's DeepseekV32 reads."""
    from transformers import DynamicCache

    expanded = caches_expanded_kv(model)
    cache = DynamicCache(config=model.config)
    for layer, (c_kv, k_rope, index_keys) in enumerate(contents):
        # DynamicCache concatenates what it is given, so expanded views become contiguous copies
        latent, rotated = c_kv.expand(batch, -1, -1).unsqueeze(1), k_rope.expand(batch, -1, -1).unsqueeze(1)
        if expanded:
            latent, rotated = _expanded_keys_values(model.model.layers[layer].self_attn, latent, rotated)
        cache.update(latent, rotated, layer)
        cache.update_indexer(index_keys.expand(batch, -1, -1), layer)
    return cache


# ---- measurements ----


@torch.no_grad()
def time_decode(
    model, cache, context: int, steps: int, batch: int = 1, seed: int = 1, forward=None, warmup: int = 1, **settings
) -> tuple[float, torch.Tensor]:
    """Median ms per decode step (one new token for each of `batch` sequences) over `steps` steps after `warmup`
    untimed ones, and the first step's logits [batch, vocab] in float32. `forward`: what to call instead of `model`
    (a compiled `model.forward`: its warm-up steps compile and record CUDA graphs, and each step is marked as a new
    one for them). `settings`: forward arguments (ours: index_topk, use_sparse_attention)."""
    from .modeling.modeling_mla_dsa import CACHE_NAME  # transformers' models take the cache under this name only

    device = next(model.parameters()).device
    compiled = forward is not None
    forward = model if forward is None else forward
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (steps + warmup, batch, 1), generator=generator).to(device)
    times, first = [], None
    for step in range(steps + warmup):
        position = torch.full((batch, 1), context + step, device=device)
        if compiled and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        synchronize(device)
        start = time.perf_counter()
        out = forward(tokens[step], position_ids=position, use_cache=True, **{CACHE_NAME: cache}, **settings)
        synchronize(device)
        elapsed = time.perf_counter() - start
        if step == 0:
            first = out.logits[:, -1].float().clone()
        if step >= warmup:
            times.append(elapsed)  # the warm-up steps grow our cache's buffer (and compile)
    times.sort()
    return 1000 * times[len(times) // 2], first


@dataclass
class Run:
    """What every measurement needs: the preset, its config with --layers applied, where and in what it runs, and
    this machine's measured speeds."""

    preset: Preset
    config: dict
    device: torch.device
    dtype: torch.dtype
    bandwidth: float = 0.0  # bytes/s
    gemm_flops: float = 0.0  # FLOP/s

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def decode_row(theirs, ours, run: Run, context: int, batch: int, args: argparse.Namespace, weight_bytes: int) -> dict:
    """One (context, batch) decode measurement: ours with DSA and dense (absorbed MQA), transformers' where the
    cached tokens (context x batch) stay within --theirs-max-context, and the memory-bandwidth rooflines."""
    k = topk_for(context, run.preset)
    set_their_topk(theirs, k)
    contents = random_cache_contents(context, run.config, run.device, run.dtype)
    row = {"context": context, "batch": batch, "index_topk": k}
    row["ours_dsa_ms"], our_logits = time_decode(ours, our_cache(ours, contents, batch), context, args.steps, batch,
                                                 index_topk=k)  # fmt: skip
    row["ours_dense_mqa_ms"], _ = time_decode(ours, our_cache(ours, contents, batch), context, args.steps, batch,
                                              index_topk=k, use_sparse_attention=False)  # fmt: skip
    if context * batch <= args.theirs_max_context:
        steps = args.steps if context * batch <= 16384 else 2
        cache = their_cache(theirs, contents, batch)
        row["theirs_ms"], their_logits = time_decode(theirs, cache, context, steps, batch)
        row["logit_max_abs_diff"] = (their_logits - our_logits).abs().max().item()
        row["logit_max_abs"] = their_logits.abs().max().item()  # the scale the difference is read against
        row["speedup_vs_theirs"] = row["theirs_ms"] / row["ours_dsa_ms"]
    for name, sparse in (("dsa", True), ("dense", False)):
        step_bytes = decode_bytes(run.config, context, k, sparse, weight_bytes, run.itemsize, batch)
        row[f"roofline_{name}_ms"] = 1000 * step_bytes / run.bandwidth
    row["ours_dsa_vs_roofline"] = row["ours_dsa_ms"] / row["roofline_dsa_ms"]
    row["weights_gemv_ms"] = 1000 * time_weight_gemvs(ours, batch, run.device)
    row["weights_gemv_gb_s"] = (
        sum(w.numel() * w.element_size() for w in linear_weights(ours)) / row["weights_gemv_ms"] / 1e6
    )
    row["ours_dense_vs_roofline"] = row["ours_dense_mqa_ms"] / row["roofline_dense_ms"]
    row["ours_dsa_tokens_per_s"] = 1000 * batch / row["ours_dsa_ms"]
    return row


def prefill_once(model_dir: str, length: int, which: str, device: str, dtype: str, index_topk: int) -> dict:
    """One timed prefill forward of `length` random tokens by `which` ("ours" or "theirs"), after a short warm-up.
    Run by `prefill_in_subprocess`, in a process of its own, so that the peak memory is this forward's."""
    from transformers import DeepseekV32ForCausalLM

    import mla_dsa

    where = torch.device(device)
    model_class = mla_dsa.MlaDsaForCausalLM if which == "ours" else DeepseekV32ForCausalLM
    model = model_class.from_pretrained(model_dir, dtype=DTYPES[dtype], index_topk=index_topk).to(where).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length)).to(where)
    with torch.no_grad():
        model(ids[:, :PREFILL_WARMUP_TOKENS], use_cache=True, logits_to_keep=1)
        rss_before = peak_rss_gb()
        if where.type == "cuda":
            torch.cuda.reset_peak_memory_stats(where)
        synchronize(where)
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        synchronize(where)
        seconds = time.perf_counter() - start
    result = dict(seconds=seconds, peak_rss_gb=peak_rss_gb(), rss_before_gb=rss_before)
    if where.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(where) / 2**30
    return result


_PREFILL_CHILD = "\n".join([
    "import json, sys",
    "from mla_dsa.bench import prefill_once",
    "print(json.dumps(prefill_once(**json.loads(sys.argv[1]))))",
])  # fmt: skip


def prefill_in_subprocess(model_dir: Path, length: int, which: str, run: Run) -> dict:
    """`prefill_once` in a fresh interpreter; a failure (out of memory, ...) is {"error": its last line}."""
    dtype = next(name for name, value in DTYPES.items() if value == run.dtype)
    arguments = dict(model_dir=str(model_dir), length=length, which=which, device=run.device.type, dtype=dtype,
                     index_topk=topk_for(length, run.preset))  # fmt: skip
    result = subprocess.run([sys.executable, "-c", _PREFILL_CHILD, json.dumps(arguments)], capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def prefill_row(
    model_dir: Path, length: int, run: Run, args: argparse.Namespace, flops_config: "PreTrainedConfig"
) -> dict:
    """One prefill length: ours, transformers' up to --theirs-prefill-max, and the compute roofline (the FLOPs a
    prefill must do / measured matmul throughput) with each implementation's ratio to it."""
    k = topk_for(length, run.preset)
    flops = prefill_flops(flops_config, length, k)
    row = {"length": length, "index_topk": k, "flops": flops, "roofline_s": flops / run.gemm_flops}
    row["ours"] = prefill_in_subprocess(model_dir, length, "ours", run)
    if length <= args.theirs_prefill_max:
        row["theirs"] = prefill_in_subprocess(model_dir, length, "theirs", run)
    for which in ("ours", "theirs"):
        if "seconds" in row.get(which, {}):
            row[f"{which}_vs_roofline"] = row[which]["seconds"] / row["roofline_s"]
    return row


@torch.no_grad()
def logits_agreement(theirs, ours, config: dict, device: torch.device) -> dict[str, float]:
    """Ours vs transformers on one forward with DSA active: max and mean |logit difference|, and max |logit| (their
    scale). In bfloat16 the two pick a few different top-k keys where index scores nearly tie (each differs from a
    float32 run as much as from the other), which the max shows and the mean hardly moves."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (1, LOGITS_CHECK_TOKENS), generator=generator).to(device)
    set_their_topk(theirs, LOGITS_CHECK_TOPK)
    their_logits = theirs(ids).logits.float()
    difference = (their_logits - ours(ids, index_topk=LOGITS_CHECK_TOPK).logits.float()).abs()
    tag = f"{LOGITS_CHECK_TOKENS}_tokens"
    return {
        f"prefill_logit_max_abs_diff_{tag}": difference.max().item(),
        f"prefill_logit_mean_abs_diff_{tag}": difference.mean().item(),
        f"prefill_logit_max_abs_{tag}": their_logits.abs().max().item(),
    }


# ---- the command ----


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mla-dsa bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model geometry (above)")
    parser.add_argument("--layers", type=_positive_int, default=2, help="decoder layers of the benchmark model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--contexts", type=_positive_int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--batch", type=_positive_int, nargs="+", default=[1], help="decode batch sizes")
    parser.add_argument("--theirs-max-context", type=int, default=65536,
                        help="skip transformers' decode beyond this many cached tokens (context x batch)")  # fmt: skip
    parser.add_argument("--prefill", type=_positive_int, nargs="*", default=[8192, 32768])
    parser.add_argument("--theirs-prefill-max", type=int, default=8192, help="skip transformers' prefill beyond this")
    parser.add_argument("--steps", type=_positive_int, default=5)
    parser.add_argument("--no-decode", action="store_true", help="prefill measurements only")
    parser.add_argument("--out", default="bench-out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    preset = PRESETS[args.preset]
    run = Run(preset, dict(preset.config, num_hidden_layers=args.layers), resolve_device(args.device),
              DTYPES[args.dtype])  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run.bandwidth, run.gemm_flops = measure_bandwidth(run.device), measure_gemm_flops(run.device, run.dtype)
    results: dict = {
        "preset": args.preset, "config": run.config, "device": run.device.type,
        "device_name": device_name(run.device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "bandwidth_gb_s": run.bandwidth / 1e9, "gemm_tflop_s": run.gemm_flops / 1e12,
        "decode": [], "prefill": [],
    }  # fmt: skip
    print(f"{results['device_name']}, {args.dtype}: copy {results['bandwidth_gb_s']:.1f} GB/s, "
          f"matmul {results['gemm_tflop_s']:.3f} TFLOP/s")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "bench-model", run.config, run.dtype)
        theirs, ours = load_models(model_dir, run.device, run.dtype)
        weight_bytes = decode_weight_bytes(ours)
        results["decode_weight_bytes"] = weight_bytes
        agreement = logits_agreement(theirs, ours, run.config, run.device)
        results.update(agreement)
        print(f"logits ours vs transformers ({LOGITS_CHECK_TOKENS} tokens, k={LOGITS_CHECK_TOPK}): "
              + ", ".join(f"{name} = {value:.2e}" for name, value in agreement.items()))  # fmt: skip

        for context in [] if args.no_decode else args.contexts:
            for batch in args.batch:
                row = decode_row(theirs, ours, run, context, batch, args, weight_bytes)
                print(json.dumps(row))
                results["decode"].append(row)

        flops_config = theirs.config  # the DeepseekV32Config both implementations were loaded from
        del theirs, ours  # each prefill process loads its own copy
        if run.device.type == "cuda":
            torch.cuda.empty_cache()  # hand this process's cached blocks back, for those processes to use
        for length in args.prefill:
            row = prefill_row(model_dir, length, run, args, flops_config)
            print(json.dumps(row))
            results["prefill"].append(row)

    cfg = run.config
    results["cache_bytes_per_token_per_layer"] = {
        "fp32": (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + cfg["index_head_dim"]) * 4,
        "bf16": (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + cfg["index_head_dim"]) * 2,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    written = [out / "results.json"]
    if plot_decode(results, out / "decode.png"):
        written.append(out / "decode.png")
    if plot_prefill(results, out / "prefill.png"):
        written.append(out / "prefill.png")
    print("wrote " + ", ".join(str(path) for path in written))


# ---- plots: each draws only the series that have rows ----


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    return plt


def _title(results: dict, what: str) -> str:
    where = f"{results['device_name']}" + (f", {results['threads']} threads" if results["device"] == "cpu" else "")
    layers = results["config"]["num_hidden_layers"]
    return f"{what}, {results['preset']} ({layers} layers), {results['dtype']}\n{where}"


def plot_decode(results: dict, path: Path) -> bool:
    """ms per decode step vs context, one colour per batch size; False (nothing written) without decode rows."""
    rows = results["decode"]
    plt = _pyplot() if rows else None
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for number, batch in enumerate(sorted({r["batch"] for r in rows})):
        mine = [r for r in rows if r["batch"] == batch]
        colour, tag = f"C{number}", "" if batch == 1 else f", batch {batch}"
        series = [
            ("ours_dsa_ms", "o-", "ours, DSA (absorbed, top-k gather)"),
            ("ours_dense_mqa_ms", "s-", "ours, dense MLA (absorbed MQA)"),
            ("theirs_ms", "^-", "transformers DeepseekV32 (DSA as a mask)"),
            ("roofline_dsa_ms", "x--", "roofline, DSA (bytes / bandwidth)"),  # markers: a lone context shows too
            ("roofline_dense_ms", "+:", "roofline, dense"),
        ]
        for key, style, label in series:
            points = [(r["context"], r[key]) for r in mine if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=colour, label=label + tag)
    _save_log_plot(plt, fig, ax, path, "context (tokens)", "ms per decode step (one token per sequence)",
                   _title(results, "Decode"))  # fmt: skip
    return True


def plot_prefill(results: dict, path: Path) -> bool:
    """Prefill seconds vs length with the compute roofline; False (nothing written) without prefill rows."""
    rows = results["prefill"]
    plt = _pyplot() if rows else None
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for which, style, label in (("ours", "o-", "ours, DSA"), ("theirs", "^-", "transformers DeepseekV32")):
        points = [(r["length"], r[which]["seconds"]) for r in rows if "seconds" in r.get(which, {})]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.plot(
        [r["length"] for r in rows], [r["roofline_s"] for r in rows], "kx--", label="roofline (FLOPs / matmul rate)"
    )
    _save_log_plot(plt, fig, ax, path, "prefill length (tokens)", "seconds", _title(results, "Prefill"))
    return True


def _save_log_plot(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes (x in powers of two), labels, grid and legend; written to `path` and closed."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
