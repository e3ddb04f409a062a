"""`--export deepseek_v32 | glm_moe_dsa`: a checkpoint in DeepSeek-V3.2's or GLM-5's native format, what
transformers' `DeepseekV32ForCausalLM` / `GlmMoeDsaForCausalLM`, vLLM and SGLang load with no custom code.

The tensors are ours (our names are DeepSeek's and GLM's: per-expert MoE weights, `self_attn.indexer.*`); config.json
is the format's, and no payload is written. The two formats differ in how the indexer rotates its RoPE dims
(DeepSeek: half-split pairs, GLM: adjacent pairs): a model in the other layout is exported with its indexer's RoPE rows
permuted (`permute_indexer_rope`), which leaves every index score unchanged. What a format cannot express is refused
(`export_refusals`), not approximated: the exported model computes what ours computes with its sparse attention on.
"""

from typing import Any

import torch

from ..modeling.configuration_mla_dsa import MlaDsaConfig

EXPORT_FORMATS = ("deepseek_v32", "glm_moe_dsa")
FORMAT_NAMES = {"deepseek_v32": "DeepSeek-V3.2's", "glm_moe_dsa": "GLM-5's"}
# How each format's indexer rotates RoPE pairs (its transformers class): adjacent (True) or half-split (False).
INDEXER_ROPE_INTERLEAVE = {"deepseek_v32": False, "glm_moe_dsa": True}

# The fields of DeepSeek's published DeepSeek-V3.2 config.json (less `quantization_config`: the export is not FP8),
# every one written. Serving engines read some that transformers' DeepseekV32Config does not write (vLLM 0.34 and
# SGLang 0.5.23, read from their sources): `topk_method` and `scoring_func` (SGLang fails without them; vLLM then
# routes by softmax or fails on `e_score_correction_bias`), `moe_layer_freq`, `rope_scaling`/`rope_theta`.
DEEPSEEK_V32_FIELDS = (
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "ep_size",
    "first_k_dense_replace", "hidden_act", "hidden_size", "index_head_dim", "index_n_heads", "index_topk",
    "initializer_range", "intermediate_size", "kv_lora_rank", "max_position_embeddings", "model_type",
    "moe_intermediate_size", "moe_layer_freq", "n_group", "n_routed_experts", "n_shared_experts", "norm_topk_prob",
    "num_attention_heads", "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads",
    "num_nextn_predict_layers", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "rms_norm_eps", "rope_scaling",
    "rope_theta", "routed_scaling_factor", "scoring_func", "tie_word_embeddings", "topk_group", "topk_method",
    "torch_dtype", "transformers_version", "use_cache", "v_head_dim", "vocab_size",
)  # fmt: skip
# Our fields that say how to run the model, not what it computes: they do not travel into the export.
EXECUTION_FIELDS = (
    "attention_mode", "mha_max_length", "query_chunk_size", "indexer_cache_dtype", "indexer_scale_fmt",
    "latent_cache_dtype",
)  # fmt: skip
# Ours, checked by `export_refusals` and then left out: the format has one fixed value for each.
FIXED_FIELDS = ("use_sparse_attention", "dense_attention_layers", "rope_interleave", "indexer_rope_interleave")


def export_refusals(config: MlaDsaConfig, export: str) -> list[str]:
    """Why `config` cannot be written as `export` (empty when it can): each reason names the field."""
    if export not in EXPORT_FORMATS:
        return [f"--export must be one of {list(EXPORT_FORMATS)}, got {export!r}"]
    name = FORMAT_NAMES[export]
    reasons = []
    if config.dense_attention_layers:
        reasons.append(f"dense_attention_layers={config.dense_attention_layers}: {name} format runs sparse "
                       "attention in every layer")  # fmt: skip
    if not config.use_sparse_attention:
        reasons.append(f"use_sparse_attention=False: {name} format always attends to the index_topk keys its "
                       "indexer selects")  # fmt: skip
    if config.indexer_types and export == "deepseek_v32":
        reasons.append(f"indexer_types={config.indexer_types}: DeepSeek-V3.2's format has no shared-indexer layers "
                       "(export to glm_moe_dsa, whose format has)")  # fmt: skip
    if config.q_lora_rank is None:
        reasons.append(f"q_lora_rank=None: {name} format always compresses the query (q_a_proj, q_b_proj)")
    if not config.rope_interleave:
        reasons.append(f"rope_interleave=False: {name} attention rotates interleaved RoPE pairs")
    moe = any(config.is_moe_layer(layer) for layer in range(config.num_hidden_layers))
    if moe and (config.scoring_func, config.topk_method) != ("sigmoid", "noaux_tc"):
        reasons.append(f"scoring_func={config.scoring_func!r}, topk_method={config.topk_method!r}: {name} router is "
                       "sigmoid scores with a correction bias (noaux_tc), not DeepSeek-V2's")  # fmt: skip
    return reasons


def permutes_indexer_rope(config: MlaDsaConfig, export: str | None) -> bool:
    """Whether the export's indexer rotates RoPE pairs in the other layout than `config`'s."""
    return export is not None and INDEXER_ROPE_INTERLEAVE[export] != config.indexer_rope_interleave


def permute_indexer_rope(name: str, tensor: torch.Tensor, config: MlaDsaConfig, to_interleave: bool) -> torch.Tensor:
    """An indexer tensor with the rows that feed its RoPE dims reordered from one pair layout to the other.

    Half-split pairs (i, i + d/2) and adjacent pairs (2i, 2i + 1) rotate by the same frequency i, so moving dim i to
    2i and i + d/2 to 2i + 1 in both queries and keys (wq_b's rows per head, wk's rows, k_norm's per-dim weight and
    bias: LayerNorm's statistics do not depend on the order) gives the same rotated dot products. Other tensors are
    returned as they are."""
    rope, head_dim = config.qk_rope_head_dim, config.index_head_dim
    suffix = name.split(".self_attn.indexer.")[-1]
    if suffix not in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias"):
        return tensor
    half = torch.arange(rope // 2)
    interleaved = torch.stack([half, half + rope // 2], dim=-1).flatten()  # new dim j reads old dim interleaved[j]
    order = interleaved if to_interleave else torch.argsort(interleaved)
    order = torch.cat([order, torch.arange(rope, head_dim)])
    rows = tensor.view(-1, head_dim, *tensor.shape[1:])  # [heads (1 for wk and k_norm), head_dim, ...]
    return rows[:, order].reshape(tensor.shape).contiguous()


def export_warnings(config: MlaDsaConfig, export: str) -> list[str]:
    """What the format holds but the serving engines are known to misread (transformers reads it right)."""
    found = []
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "longrope":
        found.append(
            f"rope_type {rope_type!r} (an exact GQA conversion's RoPE key carries each source frequency once per key "
            f"head, written as one longrope factor per pair): transformers' {FORMAT_NAMES[export]} class reads it, "
            "but vLLM's and SGLang's DeepSeek attention read any rope_scaling as YaRN and would rotate these keys "
            "at other frequencies; serve this export through transformers, or (a GQA source with plain RoPE) convert "
            "it with --qk-rope-head-dim set to its head_dim (one RoPE head, lossy past the calibration length) for them"
        )
    elif rope_type not in ("default", "yarn"):
        found.append(
            f"rope_type {rope_type!r} (the GQA source's own RoPE scaling): transformers' {FORMAT_NAMES[export]} class "
            "reads it, but vLLM's and SGLang's DeepSeek attention read any rope_scaling as YaRN and would rotate the "
            "keys at other frequencies; serve this export through transformers"
        )
    if config.attention_bias:
        found.append(
            "attention_bias=True (a GQA source's q/k/v/o biases, carried by q_a_proj, kv_a_proj_with_mqa and o_proj): "
            f"transformers' {FORMAT_NAMES[export]} class reads them, but vLLM's and SGLang's DeepSeek attention build "
            "those projections without biases (vLLM's loader skips bias tensors it has no place for) and would "
            "compute without them; serve this export through transformers or `mla-dsa serve`"
        )
    if getattr(config, "linear_latent_norm", False) and str(config.dtype).removeprefix("torch.") == "float16":
        found.append(
            "dtype float16 with a GQA conversion's latents (scaled into their norms' linear regime, below float16's "
            "normal range: the export keeps q_a_proj, kv_a_proj_with_mqa and their norms in float32): run it in "
            "bfloat16 or float32 (vLLM and SGLang: --dtype bfloat16); a float16 model that casts those tensors loses "
            "its attention (logits 0.1-0.5 off on a small model)"
        )
    return found


def export_config(config: MlaDsaConfig, export: str) -> dict[str, Any]:
    """The config.json of the export: the fields of transformers' class for the format plus the ones serving engines
    read (`DEEPSEEK_V32_FIELDS`), built through that class so a field it refuses fails here, not in the engine."""
    import transformers

    fields = config.to_dict()
    for field_name in (*EXECUTION_FIELDS, *FIXED_FIELDS, "auto_map", "model_type", "transformers_version",
                       "_name_or_path"):  # fmt: skip
        fields.pop(field_name, None)
    fields = {key: value for key, value in fields.items() if not key.startswith("mla_dsa_")}
    layers = range(config.num_hidden_layers)
    fields["mlp_layer_types"] = ["sparse" if config.is_moe_layer(layer) else "dense" for layer in layers]
    if export == "glm_moe_dsa":
        fields["architectures"] = ["GlmMoeDsaForCausalLM"]
        fields["indexer_types"] = list(config.indexer_types or ["full"] * config.num_hidden_layers)
        exported = transformers.GlmMoeDsaConfig(**fields).to_dict()
        # transformers' GLM class rotates adjacent pairs without a field; vLLM and SGLang read this one and default
        # to half-split pairs (DeepSeek-V3.2's layout), so without it they would select other keys than transformers.
        exported["indexer_rope_interleave"] = INDEXER_ROPE_INTERLEAVE[export]
    else:
        fields.pop("indexer_types", None)
        fields["architectures"] = ["DeepseekV32ForCausalLM"]
        exported = transformers.DeepseekV32Config(**fields).to_dict()
    exported.pop("layer_types", None)  # derived by the class: every layer's attention is indexed
    rope = dict(config.rope_parameters)
    exported.update(
        ep_size=1,
        num_nextn_predict_layers=0,  # no multi-token-prediction layer is written
        rope_theta=rope.pop("rope_theta"),
        rope_scaling=None if rope.get("rope_type") == "default" else rope,
        torch_dtype=exported.get("dtype"),
    )
    if not any(config.is_moe_layer(layer) for layer in layers):
        # No MoE layer: expert groups mean nothing, and llama.cpp refuses a group count not below the expert count
        # (SmolLM2's conversions: one placeholder expert, one group). transformers reads 0 as "no grouping" too.
        exported["n_group"] = 0
    missing = [key for key in DEEPSEEK_V32_FIELDS if key not in exported]
    if missing:
        raise RuntimeError(f"the installed transformers' {export} config no longer writes {missing}")
    return exported


__all__ = [
    "DEEPSEEK_V32_FIELDS",
    "EXPORT_FORMATS",
    "export_config",
    "export_refusals",
    "export_warnings",
    "permute_indexer_rope",
    "permutes_indexer_rope",
]
