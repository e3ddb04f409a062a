"""`mla-dsa convert SRC DST` with a GQA SRC (Llama, Mistral, Qwen2, ...): GQA -> MLA, then MLA -> DSA as for any MLA
checkpoint.

Stage 1 (here) writes, next to DST (`.DST.mla-dsa-gqa`), a dense MLA checkpoint in DeepSeek-V3's format, which
transformers' own `DeepseekV3ForCausalLM` loads: SRC's embeddings, norms and MLP unchanged (DeepSeek's dense MLP is
Llama's), each attention rewritten by `gqa_math.mla_attention_weights` from calibration statistics gathered by
running SRC's own layers (transformers' class for its model type) on the calibration text. Stage 2 is the ordinary
conversion of that checkpoint into DST (indexers, `--indexer-init`, `--verify` against DeepseekV3, the atomic
rename); the stage directory is removed once DST is in place.

Streaming: one SRC decoder layer is in memory at a time, in float32, beside the calibration activations
[windows, L, hidden] and that layer's attention [1, H, L, L]; finished output shards are written as they fill (up to
`max_shard_size`) and recorded, so `--resume` reruns SRC's layers (cheap) but refits and rewrites nothing finished.
"""

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .calibrate import CalibrationOptions, calibration_windows
from .gqa_math import (
    GqaGeometry,
    LayerStats,
    mla_attention_weights,
    mla_attention_weights_with_biases,
    rope_frequencies,
)
from .plan import DTYPES, ConvertOptions, latent_dtype
from .source import SINGLE_NAME, ConversionError, SourceCheckpoint
from .write import save_state, start_state

# Model types read as GQA sources: transformers' Llama-style decoders (q/k/v/o projections, RoPE on the whole head,
# RMSNorm, a gated MLP); each is checked by `gqa_refusals` for what MLA cannot carry.
GQA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# SRC's RoPE types the conversion carries: frequencies that are the same at every length, so the MLA key is rotated
# exactly as SRC's keys were. "linear" and "llama3" (Llama 3.x's) rescale the frequencies; "yarn" also multiplies
# cos and sin by an attention factor, every score by its square, which the queries take on. "dynamic" and "longrope"
# change the frequencies with the length.
CARRIED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
STAGE_STATE = ".mla-dsa-gqa-state.json"
REPORT_NAME = "mla_conversion.json"  # kept in DST: how its attention was made
_LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                  "mlp.up_proj.weight", "mlp.down_proj.weight")  # fmt: skip
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def is_gqa_source(config: dict) -> bool:
    return config.get("model_type") in GQA_MODEL_TYPES


def gqa_refusals(source: SourceCheckpoint) -> list[str]:
    """What DeepSeek's MLA cannot carry of SRC, one reason each (empty: convertible)."""
    config, reasons = source.config, []
    model_type = config.get("model_type")
    if model_type not in GQA_MODEL_TYPES:
        reasons.append(f"model_type {model_type!r} is not a GQA family mla-dsa converts ({', '.join(GQA_MODEL_TYPES)})")
        return reasons
    names = source.tensors
    if any(name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) for name in names):
        reasons.append("QK-norm (self_attn.q_norm/k_norm): each head's key is normalised on its own before RoPE, "
                       "which one shared latent cannot reproduce")  # fmt: skip
    window = config.get("sliding_window")
    sliding_layers = [kind for kind in config.get("layer_types") or () if kind != "full_attention"]
    uses_window = window is not None and (model_type != "qwen2" or config.get("use_sliding_window", False))
    if uses_window or sliding_layers:
        reasons.append(f"sliding-window attention (sliding_window={window}): DSA attends over the whole context")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in CARRIED_ROPE_TYPES:
        reasons.append(f"rope_type {rope_type!r}: the GQA conversion carries RoPE whose frequencies are the same at "
                       f"every length ({', '.join(CARRIED_ROPE_TYPES)})")  # fmt: skip
    if (rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0) != 1.0:
        reasons.append("partial_rotary_factor != 1: only RoPE on the whole head is carried")
    if any(".mlp." in name and name.endswith(".bias") for name in names):
        reasons.append("MLP biases (mlp_bias): DeepSeek's MLP has none")
    heads = config.get("num_attention_heads", 0)
    kv_heads = config.get("num_key_value_heads") or heads  # absent (Llama 1's configs): one per head, as transformers
    if not kv_heads or heads % kv_heads:
        reasons.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return reasons


def has_attention_biases(source: SourceCheckpoint) -> bool:
    """Whether any of SRC's q/k/v/o projections has a nonzero bias (Qwen2's q/k/v; Llama's `attention_bias`): the
    MLA model then carries DeepSeek's `attention_bias` (gqa_math.py, step 4). All-zero biases are left out."""
    return any(source.read(name).abs().max() > 0 for name in source.tensors
               if ".self_attn." in name and name.endswith(".bias"))  # fmt: skip


def geometry_of(config: dict, rope_dim: int | None = None) -> GqaGeometry:
    """SRC's attention shape; `rope_dim` (a multiple of its head_dim, default one head) is the shared RoPE key's."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return GqaGeometry(heads, config.get("num_key_value_heads") or heads, head_dim, (rope_dim or head_dim) // head_dim)


def mla_rope_parameters(config: dict, geometry: GqaGeometry) -> dict:
    """SRC's RoPE for a shared key of `geometry.rope_dim` dims. One head's worth is SRC's own RoPE. A wider key
    carries each of SRC's frequencies `rope_heads` times over (gqa_math.rope_frequencies), which no frequency
    ladder theta^(-2i/dim) holds: it is written as transformers' "longrope" with one factor per pair (the same
    short and long factors, `factor` 1: no attention scaling), which DeepseekV3 and our model both read; so are a
    "linear" or "llama3" SRC's rescaled frequencies, and a "yarn" SRC's for any key (its attention factor is in the
    queries: `score_scale`)."""
    rope = _source_rope(config)
    if geometry.rope_heads == 1 and rope["rope_type"] != "yarn":
        return rope
    theta = rope["rope_theta"]
    factors = longrope_factors(rope_frequencies(_inv_freq(config), geometry.rope_heads).float(), theta)
    max_positions = config.get("max_position_embeddings", 4096)
    return {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors, "long_factor": factors,
            "factor": 1.0, "original_max_position_embeddings": max_positions}  # fmt: skip


def longrope_factors(wanted: torch.Tensor, theta: float) -> list[float]:
    """Per-pair factors f with which transformers' "longrope" computes exactly the float32 frequencies `wanted` [F]:
    it computes 1 / (f * theta ** (2i / 2F)) in float32. The float64 quotient can land one float32 step off, and a
    frequency one step off turns the key by an angle that grows with distance (measured on a converted Llama: logits
    5e-4 off at 2K, 2e-3 at 16K): each factor is nudged a step at a time until the frequency is SRC's (or, where no
    float32 factor gives it, one step from it)."""
    ladder = theta ** (torch.arange(0, 2 * len(wanted), 2, dtype=torch.int64).float() / (2 * len(wanted)))
    factors = (1.0 / (wanted.double() * ladder.double())).float()
    for _ in range(4):
        computed = 1.0 / (factors * ladder)  # as transformers' longrope computes it
        if torch.equal(computed, wanted):
            break
        larger, smaller = torch.full_like(factors, math.inf), torch.full_like(factors, -math.inf)
        factors = torch.where(computed > wanted, torch.nextafter(factors, larger),  # a larger factor: lower frequency
                              torch.where(computed < wanted, torch.nextafter(factors, smaller), factors))  # fmt: skip
    return factors.tolist()


def mla_config_fields(config: dict, rank: int, rope_dim: int | None = None, biased: bool = False) -> dict:
    """SRC's architecture as a dense DeepSeek-V3 config with `rank` latent dims (every layer's MLP dense) and a
    shared RoPE key of `rope_dim` dims (default: one head); `biased`: SRC's attention has biases
    (`has_attention_biases`)."""
    geometry = geometry_of(config, rope_dim)
    rope = mla_rope_parameters(config, geometry)
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "moe_intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "first_k_dense_replace": config["num_hidden_layers"],  # no MoE layers: Llama's MLP is DeepSeek's dense one
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "num_attention_heads": geometry.heads,
        "num_key_value_heads": geometry.heads,
        "q_lora_rank": config["hidden_size"] + biased,  # the identity (on [x; 1] with biases), exact: gqa_math.py
        "kv_lora_rank": rank,
        "qk_nope_head_dim": geometry.nope_dim,
        "qk_rope_head_dim": geometry.rope_dim,
        "v_head_dim": geometry.head_dim,
        "hidden_act": config.get("hidden_act", "silu"),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_parameters": rope,
        "rope_interleave": True,
        "attention_bias": biased,
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "num_nextn_predict_layers": 0,
        "linear_latent_norm": True,  # c_Q, c_KV are scaled into their norms' linear regime: gqa_math.py, step 3
    }


def full_rank(config: dict) -> int:
    return geometry_of(config).full_rank


def default_rope_dim(config: dict, kv_lora_rank: int | None) -> int:
    """Without --kv-lora-rank: every key head keeps its RoPE (the latent holds the values), the same cache as SRC and
    exact at any length. With one: one head's RoPE key, the rest of the cache for the latent."""
    geometry = geometry_of(config)
    return geometry.head_dim * (geometry.kv_heads if kv_lora_rank is None else 1)


def checked_shape(source: SourceCheckpoint, opts: ConvertOptions) -> tuple[GqaGeometry, int]:
    """SRC's geometry with the asked RoPE key, and the latent rank; a ConversionError naming what MLA cannot carry
    of SRC (`gqa_refusals`), or the flag if either cannot be built."""
    reasons = gqa_refusals(source)
    if reasons:
        raise ConversionError(
            source.path / "config.json", "cannot convert this GQA model to MLA: " + "; ".join(reasons)
        )
    geometry = geometry_of(source.config, opts.qk_rope_head_dim or default_rope_dim(source.config, opts.kv_lora_rank))
    if opts.qk_rope_head_dim is not None and not (
        opts.qk_rope_head_dim % geometry.head_dim == 0 and 1 <= geometry.rope_heads <= geometry.kv_heads
    ):
        widest = geometry.kv_heads * geometry.head_dim
        raise ConversionError(source.path, f"--qk-rope-head-dim must be a multiple of SRC's head_dim "
                                           f"{geometry.head_dim} up to its {geometry.kv_heads} key/value heads' "
                                           f"{widest}, got {opts.qk_rope_head_dim}")  # fmt: skip
    rank = opts.kv_lora_rank or geometry.full_rank
    if not 0 < rank <= geometry.full_rank:
        raise ConversionError(source.path, f"--kv-lora-rank must be in 1..{geometry.full_rank} (the GQA key/value "
                                           f"width less the shared RoPE key), got {rank}")  # fmt: skip
    return geometry, rank


def write_mla_stage(source: SourceCheckpoint, stage: Path, opts: ConvertOptions) -> Path:
    """Stage 1: the dense MLA checkpoint of GQA `source` in `stage` (resumable); returns `stage`."""
    geometry, rank = checked_shape(source, opts)  # refuses what MLA cannot carry first
    if not opts.calibration_data:
        raise ConversionError(source.path, "converting a GQA model to MLA fits the latent to the model's attention on "
                                           "text: pass --calibration-data FILES (a few thousand tokens)")  # fmt: skip
    from transformers import DeepseekV3Config

    biased = has_attention_biases(source)
    mla_config = DeepseekV3Config(**mla_config_fields(source.config, rank, geometry.rope_dim, biased))
    fingerprint = _stage_fingerprint(source, opts, rank, geometry.rope_dim)
    # the text first: a checkpoint without its tokenizer is refused before the stage's directory exists
    windows = calibration_windows(source, mla_config, CalibrationOptions.of(opts), "the GQA -> MLA conversion")
    state = start_state(stage, fingerprint, opts.resume, name=STAGE_STATE, progress="shards", kept=())
    if state.get("complete"):
        return stage
    dtype = _stage_dtype(source, opts)
    writer = _ShardWriter(stage, state, opts.max_shard_size)
    report = {"source_model_type": source.model_type, "kv_lora_rank": rank, "qk_rope_head_dim": geometry.rope_dim,
              "full_rank": geometry.full_rank, "calibration_tokens": int(windows.numel())}  # fmt: skip
    bar = tqdm(total=source.config["num_hidden_layers"], desc="GQA -> MLA", unit="layer", disable=not opts.progress)
    inv_freq, attention_factor = _source_rotary(source.config)
    score_scale = attention_factor**2  # YaRN's cos and sin both carry it: every score, into the queries
    for layer_idx, stats in gqa_layer_stats(source, windows):
        prefix = f"model.layers.{layer_idx}."
        if not writer.done(prefix):
            attention = [source.read(f"{prefix}self_attn.{p}.weight", torch.float32).float() for p in _ATTENTION]
            if biased:
                biases = {p: source.read(f"{prefix}self_attn.{p}.bias", torch.float32).float() for p in _ATTENTION
                          if f"{prefix}self_attn.{p}.bias" in source.tensors}  # fmt: skip
                tensors = mla_attention_weights_with_biases(*attention, biases, stats, geometry, inv_freq, rank,
                                                            score_scale=score_scale)  # fmt: skip
            else:
                tensors = mla_attention_weights(*attention, stats, geometry, inv_freq, rank, score_scale=score_scale)
            out = {prefix + "self_attn." + name: tensor for name, tensor in tensors.items()}
            out.update({prefix + name: source.read(prefix + name, torch.float32).float() for name in _LAYER_TENSORS})
            out = {name: tensor.to(latent_dtype(name, dtype)).contiguous() for name, tensor in out.items()}
            writer.add(prefix, out)
        bar.update(1)
    bar.close()
    if not writer.done("top"):  # embeddings, final norm, LM head: unchanged
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        names += [] if mla_config.tie_word_embeddings else ["lm_head.weight"]
        writer.add("top", {name: source.read(name, torch.float32).to(dtype).contiguous() for name in names})
    writer.finish()
    mla_config.save_pretrained(stage)
    for extra in source.extra_files():
        shutil.copyfile(extra, stage / extra.name)
    (stage / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    state["complete"] = True
    save_state(stage, state, STAGE_STATE)
    return stage


def verify_mla_stage(source: SourceCheckpoint, stage: Path, opts: ConvertOptions) -> float:
    """--verify for the GQA step: SRC through transformers' class for its model type and the MLA stage through
    transformers' DeepseekV3ForCausalLM, on a short random input in float32. Exact with one key/value head at the full
    width (held to the tolerance); otherwise RoPE decoupling's loss, reported (and held to --verify-tolerance where
    given). Returns the max logit difference.

    The stage's attention weights are new numbers (mixed heads, scaled latents) rounded to the stage's dtype, which the
    source's are not: in bfloat16 or float16 the tolerance is 4 x what rounding them once more costs (each weight moved
    by a random fraction of the dtype's rounding step, `_rounding_noise`), so a systematic error still shows."""
    import transformers

    generator = torch.Generator().manual_seed(opts.seed)
    input_ids = torch.randint(0, source.config["vocab_size"], (2, 16), generator=generator)
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
        expected = reference(input_ids).logits
        del reference
        mla = transformers.DeepseekV3ForCausalLM.from_pretrained(stage, dtype=torch.float32).eval()
        logits = mla(input_ids).logits
        diff = (expected - logits).abs().max().item()
        dtype = _stage_dtype(source, opts)
        noise = _rounding_noise(mla, input_ids, logits, dtype, opts.seed) if dtype != torch.float32 else 0.0
    geometry, rank = geometry_of(source.config, mla.config.qk_rope_head_dim), mla.config.kv_lora_rank
    exact = geometry.rope_heads == geometry.kv_heads and rank == geometry.full_rank
    tolerance = opts.verify_tolerance or max(1e-4 * max(1.0, expected.abs().max().item()), 4 * noise)
    why = (
        "exact: every key/value head keeps its RoPE, the latent at the full width"
        if exact
        else (
            f"not exact: {geometry.kv_heads} key/value heads share a RoPE key of {geometry.rope_heads} head(s), "
            f"latent {rank} of {geometry.full_rank}"
        )
    )
    checked = exact or opts.verify_tolerance is not None  # a lossy conversion is held only to a bound the user set
    bound = f"tolerance {tolerance:.1e}" if checked else "reported: --verify-tolerance sets a bound"
    print(f"verify GQA -> MLA: max |logit difference| = {diff:.3e} ({why}; {bound})")
    if checked and not diff <= tolerance:
        raise ConversionError(stage, f"--verify failed: GQA -> MLA max logit difference {diff:.3e} > {tolerance:.1e}")
    return diff


def _rounding_noise(model, input_ids: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype, seed: int) -> float:
    """The max logit change when every attention weight of `model` (float32, loaded from `dtype`) moves by a uniform
    random fraction of half its rounding step in `dtype`: the size of the error rounding to `dtype` makes."""
    generator = torch.Generator().manual_seed(seed)
    half_step = torch.finfo(dtype).eps / 2
    for name, param in model.named_parameters():
        if ".self_attn." in name:
            shift = torch.rand(param.shape, generator=generator).mul_(2).sub_(1)
            param.mul_(1 + half_step * shift)
    return (model(input_ids).logits - logits).abs().max().item()


def gqa_layer_stats(source: SourceCheckpoint, windows: torch.Tensor):
    """(layer index, LayerStats) for each SRC layer, run densely in float32 with transformers' own decoder layer on
    `windows` [N, L] one window at a time, each layer's output feeding the next."""
    import transformers

    fields = {k: v for k, v in source.config.items() if k not in ("model_type", "quantization_config", "dtype")}
    config = transformers.AutoConfig.for_model(source.model_type, **fields)
    config._attn_implementation = "eager"  # the attention probabilities come back from eager attention only
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with torch.device("meta"):
        skeleton = model_class(config)
    rotary = type(skeleton.model.rotary_emb)(config)
    length = windows.shape[1]
    hidden = source.read("model.embed_tokens.weight", torch.float32).float()[windows]  # [N, L, hidden]
    position_embeddings = rotary(hidden[:1], torch.arange(length)[None])
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]  # [1, 1, L, L]
    delta = (torch.arange(length)[:, None] - torch.arange(length)[None]).clamp_min(0).flatten()
    for layer_idx in range(config.num_hidden_layers):
        layer = skeleton.model.layers[layer_idx]
        prefix = f"model.layers.{layer_idx}."
        state = {name[len(prefix):]: source.read(name, torch.float32).float()
                 for name in source.tensors if name.startswith(prefix)}  # fmt: skip
        layer.load_state_dict(state, assign=True, strict=True)
        heads = config.num_attention_heads
        moment = torch.zeros(config.hidden_size, config.hidden_size, dtype=torch.float64)
        distance = torch.zeros(heads, length, dtype=torch.float64)
        largest, total = 0.0, torch.zeros(config.hidden_size, dtype=torch.float64)
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            layer.self_attn.register_forward_pre_hook(partial(_keep_input, captured), with_kwargs=True),
            layer.self_attn.register_forward_hook(partial(_keep_probabilities, captured)),
        ]
        outputs = []
        with torch.no_grad():
            for window in hidden:
                outputs.append(layer(window[None], attention_mask=causal, position_embeddings=position_embeddings)[0])
                x = captured["x"][0].double()  # [L, hidden]
                moment += x.T @ x
                total += x.sum(0)
                largest = max(largest, x.pow(2).sum(-1).max().item())
                distance.index_add_(1, delta, captured["p"][0].double().reshape(heads, -1))
        for hook in hooks:
            hook.remove()
        hidden = torch.stack(outputs)
        skeleton.model.layers[layer_idx] = torch.nn.Identity()  # drop the layer's tensors
        count = hidden[..., 0].numel()
        yield layer_idx, LayerStats(moment / count, largest, distance, total / count)


def _keep_input(captured: dict, module, args, kwargs) -> None:
    captured["x"] = kwargs["hidden_states"]


def _keep_probabilities(captured: dict, module, args, output) -> None:
    captured["p"] = output[1]  # eager attention's probabilities [B, H, L, L]


def _source_rope(config: dict) -> dict:
    """SRC's RoPE as transformers reads its config.json (`rope_parameters`, or the older `rope_theta` and
    `rope_scaling`), with its `rope_type`."""
    if config.get("rope_parameters"):
        rope = dict(config["rope_parameters"])
    elif config.get("rope_scaling"):  # transformers turns the older fields into rope_parameters
        rope = dict(AutoConfig.for_model(**config).rope_parameters)
    else:
        rope = {}
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _source_rotary(config: dict) -> tuple[torch.Tensor, float]:
    """SRC's RoPE frequencies [head_dim / 2] (float64) as its own rotary embedding computes them, in float32, and the
    factor it multiplies cos and sin by: plain RoPE's as transformers' default, the others by transformers'
    `ROPE_INIT_FUNCTIONS`."""
    geometry, rope = geometry_of(config), _source_rope(config)
    if rope["rope_type"] == "default":
        exponents = torch.arange(0, geometry.head_dim, 2, dtype=torch.int64).float() / geometry.head_dim
        return (1.0 / rope["rope_theta"] ** exponents).double(), 1.0
    source_config = AutoConfig.for_model(**{**config, "rope_parameters": rope})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](source_config, torch.device("cpu"))
    return inv_freq.double(), float(attention_factor)


def _inv_freq(config: dict) -> torch.Tensor:
    return _source_rotary(config)[0]


def _stage_dtype(source: SourceCheckpoint, opts: ConvertOptions) -> torch.dtype:
    if DTYPES[opts.dtype] is not None:
        return DTYPES[opts.dtype]
    anchor = source.tensors.get("model.layers.0.self_attn.q_proj.weight")
    return (
        anchor.dtype if anchor is not None and anchor.dtype.is_floating_point and not anchor.is_fp8 else torch.bfloat16
    )


class _ShardWriter:
    """Collects finished layers' tensors into shards of up to `max_shard_size`, each written atomically and recorded
    (with the layers it holds) in the stage state, so --resume skips them."""

    def __init__(self, stage: Path, state: dict, max_shard_size):
        from huggingface_hub.serialization._base import parse_size_to_int

        self.stage, self.state = stage, state
        self.limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_keys: list[str] = []

    def done(self, key: str) -> bool:
        return any(key in shard["keys"] for shard in self.state["shards"].values())

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        held = sum(t.numel() * t.element_size() for t in self.pending.values())
        if self.pending and held + size > self.limit:
            self._flush()
        self.pending.update(tensors)
        self.pending_keys.append(key)

    def _flush(self) -> None:
        name = f"stage-{len(self.state['shards']) + 1:05d}.safetensors"
        tmp = self.stage / (name + ".tmp")
        save_file(self.pending, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.stage / name)
        self.state["shards"][name] = {"keys": self.pending_keys, "tensors": sorted(self.pending)}
        save_state(self.stage, self.state, STAGE_STATE)
        self.pending, self.pending_keys = {}, []

    def finish(self) -> None:
        if self.pending:
            self._flush()
        shards = self.state["shards"]
        if len(shards) == 1:  # one file: the plain name, as transformers writes it
            os.replace(self.stage / next(iter(shards)), self.stage / SINGLE_NAME)
            self.state["shards"] = {SINGLE_NAME: next(iter(shards.values()))}
            save_state(self.stage, self.state, STAGE_STATE)
            return
        weight_map = {tensor: name for name, shard in shards.items() for tensor in shard["tensors"]}
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (self.stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _stage_fingerprint(source: SourceCheckpoint, opts: ConvertOptions, rank: int, rope_dim: int) -> str:
    options = {
        k: v
        for k, v in asdict(opts).items()
        if k in ("dtype", "calibration_data", "calibration_tokens", "calibration_seq_len", "max_shard_size")
    }
    described = {
        "options": options,
        "rank": rank,
        "rope_dim": rope_dim,
        "source": sorted((i.name, i.shard, str(i.dtype), i.shape) for i in source.tensors.values()),
        "sizes": {shard: (source.path / shard).stat().st_size for shard in source.shards},
        "calibration": [(str(p), Path(p).stat().st_size) for p in opts.calibration_data or ()],
    }
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


__all__ = [
    "GQA_MODEL_TYPES",
    "gqa_refusals",
    "has_attention_biases",
    "is_gqa_source",
    "verify_mla_stage",
    "write_mla_stage",
]
