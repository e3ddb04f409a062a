"""DeepSeek-V3.2's published geometry (61 layers, hidden 7168, 256 experts; tests/fixtures/deepseek-v3.2-config.json)
built as our model on the meta device, and what transformers' tensor-parallel plan leaves on each of 8 ranks.

The bytes per rank are derived from the plan the model declares (`base_model_tp_plan`, `_tp_plan`), with the sharding
rules of transformers' styles: "colwise" splits a Linear's output features (weight dim -2, its bias too), "rowwise"
its input features (weight dim -1; the bias stays whole), "colwise_gather_output" as colwise, "packed_colwise" the
fused experts' [gate ; up] rows (dim -2, each half evenly); anything else, or no entry, keeps the whole tensor.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from mla_dsa import MlaDsaConfig, MlaDsaForCausalLM

CONFIG = Path(__file__).parent / "fixtures" / "deepseek-v3.2-config.json"
RANKS = 8
SHARD_DIM = {"colwise": -2, "colwise_gather_output": -2, "packed_colwise": -2, "rowwise": -1}
# Tensors over 1 M elements every rank keeps whole, by design, and why.
REPLICATED = {
    r"model\.embed_tokens\.weight": "token embedding: transformers' DeepseekV32 plan keeps it whole too",
    r"\.self_attn\.q_a_proj\.weight": "the query latent c_Q feeds every head and the indexer",
    r"\.self_attn\.kv_a_proj_with_mqa\.weight": "the KV latent is what every head reads and every rank caches",
    r"\.self_attn\.indexer\.wq_b\.weight": "the indexer stays whole so every rank selects the same top-k",
    r"\.mlp\.gate\.weight": "the router: every rank routes every token alike",
}


def _plan(model) -> dict[re.Pattern, str]:
    plan = {f"{model.base_model_prefix}.{key}": style for key, style in model.config.base_model_tp_plan.items()}
    plan.update(model._tp_plan)
    return {re.compile("^" + re.escape(key).replace(r"\*", r"\d+") + "$"): style for key, style in plan.items()}


def _style(plan: dict[re.Pattern, str], parameter: str) -> str | None:
    """The style of a parameter: its own entry (the fused experts'), else its module's."""
    own = next((style for pattern, style in plan.items() if pattern.match(parameter)), None)
    if own is not None:
        return own
    module, _, kind = parameter.rpartition(".")
    style = next((style for pattern, style in plan.items() if pattern.match(module)), None)
    return None if style == "rowwise" and kind == "bias" else style


@pytest.fixture(scope="module")
def v32():
    config = MlaDsaConfig.from_dict(json.loads(CONFIG.read_text()))
    with torch.device("meta"):
        model = MlaDsaForCausalLM(config)
    return model


def per_rank(v32) -> dict[str, tuple[int, int]]:
    """parameter name -> (elements on one of RANKS ranks, elements in all)."""
    plan, out = _plan(v32), {}
    for name, param in v32.named_parameters():
        dim = SHARD_DIM.get(_style(plan, name))
        if dim is not None:
            assert param.shape[dim] % RANKS == 0, f"{name}: {list(param.shape)} does not split {RANKS} ways"
            out[name] = (param.numel() // RANKS, param.numel())
        else:
            out[name] = (param.numel(), param.numel())
    return out


@pytest.mark.slow  # builds the 671 B model's 45 000 modules (on the meta device)
def test_v32_builds_on_the_meta_device_with_its_parameter_count(v32):
    assert v32.config.num_hidden_layers == 61 and v32.config.n_routed_experts == 256
    total = sum(param.numel() for param in v32.parameters())
    assert 671.0e9 < total < 672.5e9  # DeepSeek-V3.2's 671 B (its MTP layer is not part of the model)
    assert all(param.device.type == "meta" for param in v32.parameters())


@pytest.mark.slow  # builds the 671 B model's 45 000 modules (on the meta device)
def test_every_large_tensor_is_sharded_or_replicated_on_purpose(v32):
    sizes = per_rank(v32)
    for name, (local, whole) in sizes.items():
        if whole > 1_000_000 and local == whole:
            assert any(re.search(pattern, name) for pattern in REPLICATED), f"{name} ({whole} elements) is whole"
    sharded = sum(whole for local, whole in sizes.values() if local < whole)
    assert sharded / sum(whole for _, whole in sizes.values()) > 0.98  # experts and attention heads


@pytest.mark.slow  # builds the 671 B model's 45 000 modules (on the meta device)
def test_bytes_per_rank_at_tp8(v32):
    """What docs/usage.md's memory table says: bf16 weights per GPU at TP = 8, from the plan."""
    sizes = per_rank(v32)
    local = sum(local for local, _ in sizes.values())
    whole = sum(whole for _, whole in sizes.values())
    replicated = sum(whole for local, whole in sizes.values() if local == whole)
    assert local == pytest.approx((whole - replicated) / RANKS + replicated)
    bf16_gib = 2 * local / 2**30
    assert 160.5 < bf16_gib < 161.5, bf16_gib  # docs/usage.md: 161 GiB of bf16 weights per GPU, more than an H200 holds


def test_the_published_config_reads_without_warnings(caplog):
    """Its legacy RoPE fields (rope_theta, rope_scaling: yarn x40) are read, not reported as unknown."""
    with caplog.at_level("WARNING"):
        config = MlaDsaConfig.from_dict(json.loads(CONFIG.read_text()))
    assert not [r for r in caplog.records if "unknown field" in r.getMessage()], caplog.text
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 40
