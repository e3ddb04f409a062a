"""Reading config.json files written for transformers' DeepseekV2/V3/V32 and GlmMoeDsa (and DeepSeek-format
checkpoints of other names, such as Kimi-K2's) as MlaDsaConfig fields: what the converter reads its sources with, and
what lets `mla_dsa.MlaDsaForCausalLM.from_pretrained` read such a checkpoint directly (`install`, run when the package
is imported, sets it as `MlaDsaConfig.foreign_config_reader`). The checkpoints' own code never needs it.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

from .modeling.configuration_mla_dsa import MODEL_TYPE, PAYLOAD_VERSION_KEY, MlaDsaConfig

logger = logging.getLogger(__name__)

DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa")
# What makes a config Multi-head Latent Attention: a compressed KV latent and a query/key split into a position-free
# part and a decoupled RoPE part. Checkpoints of other names in DeepSeek's format (Kimi-K2's "kimi_k2", ...) are read
# as the DeepSeek family their `architectures` names, or, without one, the one their fields describe.
MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
DEEPSEEK_ARCHITECTURES = {
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
}


def deepseek_family(config_dict: dict[str, Any]) -> str:
    """Which of DEEPSEEK_MODEL_TYPES (or "mla_dsa") a config dict is read as; ValueError if it is not MLA."""
    model_type = config_dict.get("model_type", MODEL_TYPE)
    if model_type == MODEL_TYPE or model_type in DEEPSEEK_MODEL_TYPES:
        return model_type
    missing = [name for name in MLA_FIELDS if not isinstance(config_dict.get(name), int)]
    if missing:
        raise ValueError(
            f"model_type {model_type!r} is not a Multi-head Latent Attention model: an MLA config has "
            f"{', '.join(MLA_FIELDS)} (this one lacks {', '.join(missing)})"
        )
    for architecture in config_dict.get("architectures") or ():
        if architecture in DEEPSEEK_ARCHITECTURES:
            return DEEPSEEK_ARCHITECTURES[architecture]
    if config_dict.get("index_n_heads") is not None:
        return "deepseek_v32"
    return "deepseek_v2" if config_dict.get("scoring_func") == "softmax" else "deepseek_v3"


def config_from_deepseek(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Maps a DeepSeek-format config dict onto MlaDsaConfig's fields (a copy; our own configs pass through)."""
    config = dict(config_dict)
    source_type = deepseek_family(config)
    config.pop("model_type", None)
    if source_type == MODEL_TYPE:
        return config
    for name in (
        "architectures",
        "auto_map",
        "quantization_config",
        "head_dim",
        "qk_head_dim",
        "layer_types",
        "ep_size",  # how DeepSeek's own inference code splits experts over processes, not the model
        PAYLOAD_VERSION_KEY,
    ):
        config.pop(name, None)
    if source_type != "deepseek_v3" and config.get("rope_interleave", True) is not True:
        # Only transformers' DeepseekV3 reads `rope_interleave`: DeepseekV2 (complex rotation), DeepseekV32 and
        # GlmMoeDsa, as DeepSeek's and GLM's own code, always rotate the attention's RoPE dims in adjacent pairs, and
        # their configs keep the field only as an unused extra.
        logger.warning(
            f"config.json of a {source_type} checkpoint sets rope_interleave={config['rope_interleave']!r}, which "
            f"transformers' {source_type} model ignores (its attention rotates interleaved pairs): read as True"
        )
    if source_type != "deepseek_v3":
        config["rope_interleave"] = True
    if source_type == "glm_moe_dsa":
        config.setdefault("indexer_rope_interleave", True)  # GLM's indexer rotates adjacent pairs (its peer code)
        config.setdefault("n_group", 1)
        config.setdefault("topk_group", 1)
        config.setdefault("rms_norm_eps", 1e-5)
        config["indexer_types"] = glm_indexer_types(config)
    if source_type == "deepseek_v2":
        config.setdefault("scoring_func", "softmax")
        config.setdefault("topk_method", "greedy")
        config.setdefault("norm_topk_prob", False)
        config.setdefault("first_k_dense_replace", 0)
        config.setdefault("routed_scaling_factor", 1.0)
    else:
        config.setdefault("scoring_func", "sigmoid")
        config.setdefault("topk_method", "noaux_tc")
    _drop_mlp_layer_types(config)
    for name in ("n_group", "topk_group"):
        if config.get(name) is None:
            config[name] = 1
    # V3 configs count MTP layers; the model never builds them, conversion drops their tensors.
    config.setdefault("num_nextn_predict_layers", 0)
    return config


def glm_indexer_types(config: dict[str, Any]) -> list[str] | None:
    """GLM-5's per-layer indexer types, from `indexer_types` or, as transformers' GlmMoeDsaConfig derives them, from
    an "FSS..." `index_topk_pattern` or one full layer in `index_topk_freq` from `index_skip_topk_offset` on (those
    fields are popped); None when every layer is full."""
    pattern = config.pop("index_topk_pattern", None)
    freq, offset = config.pop("index_topk_freq", 1), config.pop("index_skip_topk_offset", 2)
    types = config.get("indexer_types")
    if types is None and pattern is not None:
        types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    if types is None:
        freq, layers = max(freq or 1, 1), range(config.get("num_hidden_layers", 61))
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in layers]
    return None if all(kind == "full" for kind in types) else list(types)


def _drop_mlp_layer_types(config: dict[str, Any]) -> None:
    """DeepseekV32's `mlp_layer_types` (written by its config, and by our export) spells out DeepSeek's rule, MoE from
    `first_k_dense_replace` on, every `moe_layer_freq`-th layer; a list that breaks the rule has no MlaDsaConfig."""
    types = config.pop("mlp_layer_types", None)
    if types is None:
        return
    first, freq = config.get("first_k_dense_replace", 3), config.get("moe_layer_freq", 1)
    experts = config.get("n_routed_experts", 256)
    rule = ["sparse" if experts and i >= first and i % freq == 0 else "dense" for i in range(len(types))]
    if list(types) != rule:
        raise ValueError(
            f"mlp_layer_types {types} does not follow first_k_dense_replace={first}, moe_layer_freq={freq}: "
            "MLA+DSA models place MoE layers by those two fields"
        )


def refuse_quantized_weights(path: Any) -> None:
    """A ValueError in one line for a local DeepSeek-format checkpoint whose weights are quantized (DeepSeek publishes
    V3/V3.1/V3.2 as block-FP8, a `weight_scale_inv` per weight): MlaDsaForCausalLM took the FP8 codes for the weights
    (logits 5 off on a small model, and train-indexer saved them so), and transformers' own dequantization on load
    cannot stand in: it takes the block size from the scale grid (rows // scale rows), so a weight with a partial block
    is dequantized with the wrong blocks where that divides (136 rows: blocks of 68, not 128) and refused where it does
    not (V3.x's `kv_a_proj_with_mqa`, 576 rows). `mla-dsa convert` dequantizes them exactly."""
    config_file = Path(path) / "config.json" if isinstance(path, (str, os.PathLike)) else None
    if config_file is None or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        return  # transformers says what is wrong with it
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not quantization or config.get("model_type", MODEL_TYPE) == MODEL_TYPE:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    how = ("`mla-dsa convert SRC DST` writes them dequantized (bfloat16), then load DST" if method == "fp8"
           else "dequantize it first")  # fmt: skip
    raise ValueError(f"{path}: a {config.get('model_type')} checkpoint with {method} weights (quantization_config): "
                     f"MlaDsaForCausalLM loads unquantized weights only; {how}")  # fmt: skip


def install() -> None:
    """Makes MlaDsaConfig (the installed package's) read DeepSeek-format config.json files as its own, and its models
    refuse such a checkpoint's quantized weights (`refuse_quantized_weights`) before transformers loads them."""
    from transformers import PreTrainedModel

    from .modeling.modeling_mla_dsa import MlaDsaPreTrainedModel

    MlaDsaConfig.foreign_config_reader = staticmethod(config_from_deepseek)
    if "from_pretrained" in vars(MlaDsaPreTrainedModel):
        return  # installed already

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        refuse_quantized_weights(pretrained_model_name_or_path)
        return PreTrainedModel.from_pretrained.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained.__doc__ = PreTrainedModel.from_pretrained.__doc__
    MlaDsaPreTrainedModel.from_pretrained = classmethod(from_pretrained)


__all__ = [
    "DEEPSEEK_MODEL_TYPES",
    "MLA_FIELDS",
    "config_from_deepseek",
    "deepseek_family",
    "glm_indexer_types",
    "install",
    "refuse_quantized_weights",
]
