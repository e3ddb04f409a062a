"""`--export deepseek_v32`: a checkpoint in DeepSeek-V3.2's native format, what transformers'
`DeepseekV32ForCausalLM`, vLLM and SGLang load with no custom code.

The tensors are ours unchanged (our names are DeepSeek's: per-expert MoE weights, `self_attn.indexer.*`); only
config.json differs, and no payload is written. What the format cannot express is refused (`export_refusals`), not
approximated: the exported model computes exactly what ours computes with its sparse attention on.
"""

from typing import Any

from ..modeling.configuration_mla_dsa import MlaDsaConfig

EXPORT_FORMATS = ("deepseek_v32",)

# The fields of DeepSeek's published DeepSeek-V3.2 config.json (less `quantization_config`: the export is not FP8),
# every one written. Serving engines read some that transformers' DeepseekV32Config does not write: vLLM reads
# `topk_method` and `scoring_func` (without them, KeyError on `e_score_correction_bias`), `moe_layer_freq`,
# `rope_scaling`/`rope_theta`, `ep_size`.
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
FIXED_FIELDS = ("use_sparse_attention", "dense_attention_layers", "rope_interleave", "indexer_types",
                "indexer_rope_interleave")  # fmt: skip


def export_refusals(config: MlaDsaConfig, export: str) -> list[str]:
    """Why `config` cannot be written as `export` (empty when it can): each reason names the field."""
    if export not in EXPORT_FORMATS:
        return [f"--export must be one of {list(EXPORT_FORMATS)}, got {export!r}"]
    reasons = []
    if config.dense_attention_layers:
        reasons.append(f"dense_attention_layers={config.dense_attention_layers}: DeepSeek-V3.2's format runs its "
                       "indexer in every layer (GLM-5's glm_moe_dsa format will carry per-layer choices)")  # fmt: skip
    if not config.use_sparse_attention:
        reasons.append("use_sparse_attention=False: DeepSeek-V3.2's format always attends to the index_topk keys its "
                       "indexer selects")  # fmt: skip
    if config.indexer_types:
        reasons.append(f"indexer_types={config.indexer_types}: DeepSeek-V3.2's format has no shared-indexer layers "
                       "(GLM-5's glm_moe_dsa format has)")  # fmt: skip
    if config.indexer_rope_interleave:
        reasons.append("indexer_rope_interleave=True: DeepSeek-V3.2's indexer rotates half-split RoPE pairs (GLM-5's "
                       "rotates adjacent ones)")  # fmt: skip
    if config.q_lora_rank is None:
        reasons.append("q_lora_rank=None: DeepSeek-V3.2's format always compresses the query (q_a_proj, q_b_proj)")
    if not config.rope_interleave:
        reasons.append("rope_interleave=False: DeepSeek-V3.2's attention rotates interleaved RoPE pairs")
    moe = any(config.is_moe_layer(layer) for layer in range(config.num_hidden_layers))
    if moe and (config.scoring_func, config.topk_method) != ("sigmoid", "noaux_tc"):
        reasons.append(f"scoring_func={config.scoring_func!r}, topk_method={config.topk_method!r}: DeepSeek-V3.2's "
                       "router is sigmoid scores with a correction bias (noaux_tc), not DeepSeek-V2's")  # fmt: skip
    return reasons


def deepseek_v32_config(config: MlaDsaConfig) -> dict[str, Any]:
    """The config.json of the export: transformers' DeepseekV32Config fields plus DeepSeek's own
    (`DEEPSEEK_V32_FIELDS`), built through transformers' class so a field it refuses fails here, not in the serving
    engine."""
    from transformers import DeepseekV32Config

    fields = config.to_dict()
    for name in (*EXECUTION_FIELDS, *FIXED_FIELDS, "auto_map", "model_type", "transformers_version", "_name_or_path"):
        fields.pop(name, None)
    fields = {name: value for name, value in fields.items() if not name.startswith("mla_dsa_")}
    fields["architectures"] = ["DeepseekV32ForCausalLM"]
    layers = range(config.num_hidden_layers)
    fields["mlp_layer_types"] = ["sparse" if config.is_moe_layer(layer) else "dense" for layer in layers]
    exported = DeepseekV32Config(**fields).to_dict()
    exported.pop("layer_types", None)  # derived by DeepseekV32Config: every layer runs its indexer
    rope = dict(config.rope_parameters)
    exported.update(
        ep_size=1,
        num_nextn_predict_layers=0,  # no multi-token-prediction layer is written
        rope_theta=rope.pop("rope_theta"),
        rope_scaling=None if rope.get("rope_type") == "default" else rope,
        torch_dtype=exported.get("dtype"),
    )
    missing = [name for name in DEEPSEEK_V32_FIELDS if name not in exported]
    if missing:
        raise RuntimeError(f"the installed DeepseekV32Config no longer writes {missing}")
    return exported


__all__ = ["DEEPSEEK_V32_FIELDS", "EXPORT_FORMATS", "deepseek_v32_config", "export_refusals"]
