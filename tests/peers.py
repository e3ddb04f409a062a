"""Tiny checkpoints built by transformers' own DeepSeek classes: the peers our model is checked against.

Every tensor is perturbed away from its initial value (norm weights are not all ones, the routing bias is not zero),
so a weight that fails to load, or loads into the wrong place, changes the logits. Test configs use 8 indexer heads,
so ReLU ties in the index score cannot decide the top-k (with a single head, many keys score exactly 0 and the
order among them is arbitrary).
"""

from pathlib import Path

import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
    GlmMoeDsaConfig,
    GlmMoeDsaForCausalLM,
)

from mla_dsa.modeling.modeling_mla_dsa import CACHE_NAME

VOCAB = 97

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_V3_MOE = dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1)

INDEXER = dict(index_n_heads=8, index_head_dim=32)


def v3_config(**overrides) -> DeepseekV3Config:
    """DeepSeek-V3 geometry in miniature: query compression, sigmoid routing with bias (noaux_tc), MoE."""
    return DeepseekV3Config(**{**_COMMON, **_V3_MOE, "q_lora_rank": 48, **overrides})


def v32_config(index_topk: int = 5, **overrides) -> DeepseekV32Config:
    """DeepSeek-V3.2: V3 plus the lightning indexer; `index_topk` below the test sequence lengths."""
    return DeepseekV32Config(
        **{**_COMMON, **_V3_MOE, "q_lora_rank": 48, **INDEXER, "index_topk": index_topk, **overrides}
    )


def glm_config(index_topk: int = 5, **overrides) -> GlmMoeDsaConfig:
    """GLM-5: V3.2's shapes, its indexer rotating adjacent RoPE pairs; `indexer_types` for shared layers."""
    return GlmMoeDsaConfig(
        **{**_COMMON, **_V3_MOE, "q_lora_rank": 48, **INDEXER, "index_topk": index_topk, **overrides}
    )


def v2_config(**overrides) -> DeepseekV2Config:
    """DeepSeek-V2-Lite in miniature: no query compression (q_proj), softmax greedy routing, first layer dense."""
    moe = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1)
    return DeepseekV2Config(**{**_COMMON, **moe, "q_lora_rank": None, "topk_method": "greedy", **overrides})


PEER_CLASSES = {
    "deepseek_v2": (v2_config, DeepseekV2ForCausalLM),
    "deepseek_v3": (v3_config, DeepseekV3ForCausalLM),
    "deepseek_v32": (v32_config, DeepseekV32ForCausalLM),
    "glm_moe_dsa": (glm_config, GlmMoeDsaForCausalLM),
}


def perturb_(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """Moves every parameter and routing bias off its initial value, deterministically."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model


def build_peer(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A perturbed, eval-mode peer model of `model_type` (a key of PEER_CLASSES)."""
    make_config, model_class = PEER_CLASSES[model_type]
    torch.manual_seed(seed)
    model = model_class(make_config(**overrides))
    return perturb_(model, seed=seed + 1).eval()


def save_peer(model_type: str, directory: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Builds a peer, writes it with its own `save_pretrained`, returns it."""
    model = build_peer(model_type, seed=seed, **overrides)
    model.save_pretrained(directory)
    return model


def save_peers(tmp_path_factory, peers: dict[str, dict]) -> dict[str, tuple[torch.nn.Module, Path]]:
    """{model_type: (peer, directory)} for {model_type: overrides}, each written once into a fresh directory."""
    result = {}
    for model_type, overrides in peers.items():
        directory = tmp_path_factory.mktemp(model_type)
        result[model_type] = (save_peer(model_type, directory, **overrides), directory)
    return result


def save_byte_level_dsa(dense_dir: Path, dsa_dir: Path, index_topk: int) -> Path:
    """A tiny byte-level DeepSeek-V3 written by transformers (with the byte tokenizer), converted to DSA."""
    import mla_dsa
    from mla_dsa.data import byte_tokenizer

    save_peer("deepseek_v3", dense_dir, vocab_size=256)
    byte_tokenizer().save_pretrained(dense_dir)
    mla_dsa.convert_checkpoint(dense_dir, dsa_dir, index_topk=index_topk, progress=False)
    return dsa_dir


def left_padded_batch(batch_size: int = 3, seq_len: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a left-padding mask: row 0 full, the others padded by a growing amount."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row in range(1, batch_size):
        pad = min(seq_len - 1, row * seq_len // (batch_size + 1))
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = _COMMON["pad_token_id"]
    return input_ids, attention_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate()` makes them: counting real tokens only."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def peer_cache_kwarg(cache) -> dict:
    """A cache for a transformers peer's forward, under the name the installed transformers uses (`cache` from 5.24,
    `past_key_values` before). Our own model takes `cache=` on every version."""
    return {CACHE_NAME: cache}
