"""MlaDsaConfig: DeepSeek-V3.2 defaults, both RoPE spellings, DeepSeek config.json files, validation, round trip."""

import json
import re

import pytest
import torch
from transformers import AutoConfig, DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

import mla_dsa
from mla_dsa import MlaDsaConfig
from mla_dsa.modeling.configuration_mla_dsa import AUTO_MAP
from mla_dsa.modeling.modeling_mla_dsa import MlaDsaAttention, MlaDsaRotaryEmbedding, yarn_softmax_scale

from peers import PEER_CLASSES

# Attention geometry shared by the RoPE comparisons (small, so attention modules build instantly).
GEOMETRY = dict(
    hidden_size=64,
    num_attention_heads=4,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=163840,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    index_head_dim=32,
    index_n_heads=8,
)


def _write_config(directory, config_dict: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict))


# ------------------------------------------------------------------------------------------------------ defaults
def test_defaults_are_deepseek_v32():
    config = MlaDsaConfig()
    expected = dict(
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=2048,
        use_sparse_attention=True,
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        first_k_dense_replace=3,
        rope_interleave=True,
    )
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.model_type == "mla_dsa"
    assert config.qk_head_dim == 192
    assert config.num_key_value_heads == 128


# ---------------------------------------------------------------------------------------------------------- RoPE
YARN_VARIANTS = {
    "deepseek_v3": dict(mscale=1.0, mscale_all_dim=1.0),
    "deepseek_v2_lite": dict(mscale=0.707, mscale_all_dim=0.707),
    "no_mscale_all_dim": dict(mscale=1.0, mscale_all_dim=0.0),
    "unequal_mscales": dict(mscale=1.0, mscale_all_dim=0.5),
}
YARN_COMMON = dict(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)


@pytest.mark.parametrize("legacy_key", ["type", "rope_type"])
@pytest.mark.parametrize("variant", YARN_VARIANTS)
def test_rope_old_and_new_style_agree(variant, legacy_key):
    yarn = {**YARN_COMMON, **YARN_VARIANTS[variant]}
    old = MlaDsaConfig(**GEOMETRY, rope_theta=10000.0, rope_scaling={legacy_key: "yarn", **yarn})
    new = MlaDsaConfig(**GEOMETRY, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **yarn})
    peer = DeepseekV3Config(**GEOMETRY, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **yarn})

    # transformers keeps the legacy "type" alias beside "rope_type" (as DeepseekV3Config does); nothing else differs.
    old_parameters = dict(old.rope_parameters)
    assert old_parameters.pop("type", "yarn") == "yarn"
    assert old_parameters == new.rope_parameters
    assert new.rope_parameters["rope_type"] == "yarn" and new.rope_parameters["rope_theta"] == 10000.0

    positions = torch.tensor([[0, 1, 7, 4095, 4096, 50000, 163839]])
    x = torch.zeros(1, positions.shape[1], GEOMETRY["qk_rope_head_dim"])
    cos_old, sin_old = MlaDsaRotaryEmbedding(old)(x, positions)
    cos_new, sin_new = MlaDsaRotaryEmbedding(new)(x, positions)
    cos_peer, sin_peer = DeepseekV3RotaryEmbedding(peer)(x, positions)
    torch.testing.assert_close(cos_old, cos_new, rtol=0, atol=0)
    torch.testing.assert_close(sin_old, sin_new, rtol=0, atol=0)
    torch.testing.assert_close(cos_new, cos_peer, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_new, sin_peer, rtol=0, atol=1e-6)

    expected_scale = DeepseekV3Attention(peer, layer_idx=0).scaling
    assert yarn_softmax_scale(old) == pytest.approx(expected_scale, rel=1e-12)
    assert yarn_softmax_scale(new) == pytest.approx(expected_scale, rel=1e-12)
    assert MlaDsaAttention(new, layer_idx=0).scaling == pytest.approx(expected_scale, rel=1e-12)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_theta=5000.0),
        dict(rope_theta=5000.0, rope_scaling=None),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    ],
    ids=["rope_theta", "rope_scaling_null", "rope_parameters"],
)
def test_rope_default(rope):
    config = MlaDsaConfig(**GEOMETRY, **rope)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}
    peer = DeepseekV3Config(**GEOMETRY, rope_theta=5000.0)
    positions = torch.arange(20).unsqueeze(0)
    x = torch.zeros(1, 20, GEOMETRY["qk_rope_head_dim"])
    for ours, theirs in zip(
        MlaDsaRotaryEmbedding(config)(x, positions), DeepseekV3RotaryEmbedding(peer)(x, positions), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert yarn_softmax_scale(config) == pytest.approx(24**-0.5, rel=1e-12)


# ------------------------------------------------------------------------------------- DeepSeek config.json files
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias",
)  # fmt: skip

MAPPED = {
    "deepseek_v2": dict(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1),
    "deepseek_v3": dict(q_lora_rank=48, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1),
    "deepseek_v32": dict(
        q_lora_rank=48,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=2,
        topk_group=1,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=5,
    ),
}
MAPPED["glm_moe_dsa"] = {**MAPPED["deepseek_v32"], "indexer_rope_interleave": True}  # V3.2's fields, GLM's RoPE pairs


@pytest.mark.parametrize("model_type", list(PEER_CLASSES))
def test_reads_transformers_deepseek_config(tmp_path, model_type):
    make_config, _ = PEER_CLASSES[model_type]
    make_config().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == model_type

    config = MlaDsaConfig.from_pretrained(tmp_path)
    assert isinstance(config, MlaDsaConfig) and config.model_type == "mla_dsa"
    for name in SHARED_FIELDS:
        if name in written:
            assert getattr(config, name) == written[name], name
    for name, value in MAPPED[model_type].items():
        assert getattr(config, name) == value, name
    assert config.rope_interleave is True
    assert config.head_dim == written["qk_rope_head_dim"]
    assert config.qk_head_dim == written["qk_nope_head_dim"] + written["qk_rope_head_dim"]
    assert config.auto_map == AUTO_MAP


def _real_style_v3(**overrides) -> dict:
    """A config.json as DeepSeek publishes it (legacy rope keys, remote-code auto_map, fp8 quantization), shrunk."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "model_type": "deepseek_v3",
        "aux_loss_alpha": 0.001,
        "ep_size": 1,
        "first_k_dense_replace": 3,
        "hidden_size": 7168,
        "kv_lora_rank": 512,
        "moe_intermediate_size": 2048,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "v_head_dim": 128,
        "vocab_size": 129280,
        **overrides,
    }


def test_reads_deepseek_published_v3_config(tmp_path):
    _write_config(tmp_path, _real_style_v3())
    config = MlaDsaConfig.from_pretrained(tmp_path)
    assert config.model_type == "mla_dsa"
    assert config.auto_map == AUTO_MAP  # never DeepSeek's own remote code
    assert getattr(config, "quantization_config", None) is None
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters["factor"] == 40 and config.rope_parameters["rope_theta"] == 10000
    assert (config.n_group, config.topk_group, config.scoring_func) == (8, 4, "sigmoid")
    yarn = {**YARN_COMMON, "mscale": 1.0, "mscale_all_dim": 1.0}
    peer = DeepseekV3Config(
        **{**GEOMETRY, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "kv_lora_rank": 512},
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **yarn},
    )
    assert yarn_softmax_scale(config) == pytest.approx(DeepseekV3Attention(peer, layer_idx=0).scaling, rel=1e-12)


def test_reads_deepseek_v2_lite_style_config(tmp_path):
    v2 = _real_style_v3(
        model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1,
        topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
    )  # fmt: skip
    _write_config(tmp_path, v2)
    config = MlaDsaConfig.from_pretrained(tmp_path)
    assert config.q_lora_rank is None
    assert (config.scoring_func, config.topk_method, config.norm_topk_prob) == ("softmax", "greedy", False)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (64, 6, 2)


@pytest.mark.parametrize("load", ["from_pretrained", "from_dict"])
def test_llama_config_is_rejected(tmp_path, load):
    llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "intermediate_size": 96, "vocab_size": 97}  # fmt: skip
    with pytest.raises(ValueError, match="llama"):
        if load == "from_pretrained":
            _write_config(tmp_path, llama)
            MlaDsaConfig.from_pretrained(tmp_path)
        else:
            MlaDsaConfig.from_dict(llama)


# ---------------------------------------------------------------------------------------------------- validation
INVALID = [
    ("kv_lora_rank", dict(kv_lora_rank=0)),
    ("kv_lora_rank", dict(kv_lora_rank=-4)),
    ("q_lora_rank", dict(q_lora_rank=-1)),
    ("q_lora_rank", dict(q_lora_rank=0)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=7)),
    ("qk_nope_head_dim", dict(qk_nope_head_dim=-1)),
    ("index_head_dim", dict(index_head_dim=32)),  # below qk_rope_head_dim=64
    ("index_topk", dict(index_topk=0)),
    ("index_n_heads", dict(index_n_heads=0)),
    ("num_attention_heads", dict(num_attention_heads=0)),
    ("query_chunk_size", dict(query_chunk_size=0)),
    ("mha_max_length", dict(mha_max_length=0)),
    ("attention_mode", dict(attention_mode="bogus")),
    ("indexer_cache_dtype", dict(indexer_cache_dtype="fp16")),
    ("indexer_scale_fmt", dict(indexer_scale_fmt="e8m0")),
    ("scoring_func", dict(scoring_func="relu")),
    ("topk_method", dict(topk_method="x")),
    ("n_group", dict(n_group=3)),  # 256 experts
    ("topk_group", dict(topk_group=9)),  # n_group=8
    ("num_experts_per_tok", dict(num_experts_per_tok=257)),
    ("num_experts_per_tok", dict(num_experts_per_tok=0)),
    ("first_k_dense_replace", dict(first_k_dense_replace=-1)),
    ("dense_attention_layers", dict(dense_attention_layers=[61])),  # 61 layers: 0..60
    ("dense_attention_layers", dict(dense_attention_layers=[-1])),
    ("latent_cache_dtype", dict(latent_cache_dtype="int8")),
    ("kv_lora_rank", dict(latent_cache_dtype="fp8", kv_lora_rank=200)),  # FP8 scales cover blocks of 128
    ("index_head_dim", dict(indexer_cache_dtype="fp8", index_head_dim=96)),  # Hadamard rotation: a power of two
    ("indexer_types", dict(indexer_types=["full"])),  # one per layer
    ("indexer_types", dict(indexer_types=["shared"] + ["full"] * 60)),  # the first layer has nothing to share
    ("dense_attention_layers", dict(indexer_types=["full", "shared"] + ["full"] * 59, dense_attention_layers=[0])),
    ("rope_parameters", dict(rope_parameters={"rope_type": "bogus", "rope_theta": 1.0})),
    ("scoring_func", dict(scoring_func="softmax")),  # noaux_tc routes sigmoid scores
    ("moe_layer_freq", dict(moe_layer_freq=0)),
    ("moe_intermediate_size", dict(moe_intermediate_size=0)),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}={list(k.values())[0]}" for f, k in INVALID])
def test_invalid_value_names_field(field, kwargs):
    with pytest.raises(ValueError) as error:
        MlaDsaConfig(**kwargs)
    assert re.search(rf"\b{field}\b", str(error.value)), str(error.value)


def test_invalid_value_in_config_json_fails_on_load(tmp_path):
    bad = MlaDsaConfig(**GEOMETRY).to_dict()
    bad["kv_lora_rank"] = 0
    _write_config(tmp_path, bad)
    with pytest.raises(ValueError, match=r"\bkv_lora_rank\b"):
        MlaDsaConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------- round trip
NON_DEFAULT = dict(
    vocab_size=101, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=5,
    num_attention_heads=6, num_key_value_heads=3, hidden_act="gelu", max_position_embeddings=999,
    initializer_range=0.01, rms_norm_eps=1e-5, use_cache=False, pad_token_id=3, bos_token_id=4, eos_token_id=[5, 6],
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0, "mscale": 0.9, "mscale_all_dim": 0.8,
                     "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2},
    rope_interleave=False, attention_bias=True, attention_dropout=0.1, mlp_bias=True, kv_lora_rank=24,
    q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20, n_routed_experts=12,
    n_shared_experts=2, num_experts_per_tok=3, routed_scaling_factor=1.5, scoring_func="softmax",
    topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=False, first_k_dense_replace=2,
    dense_attention_layers=[0, 3], indexer_types=["full", "full", "shared", "full", "full"],
    indexer_rope_interleave=True, output_router_logits=True,
    moe_layer_freq=2, num_nextn_predict_layers=1, index_n_heads=4, index_head_dim=32, index_topk=7,
    use_sparse_attention=False, attention_mode="mha", mha_max_length=100, query_chunk_size=16,
    indexer_cache_dtype="fp8", indexer_scale_fmt="ue8m0", latent_cache_dtype="fp8",
)  # fmt: skip


def _comparable(config) -> dict:
    """to_dict() without what a load is expected to change: the version stamp and the path it was read from."""
    return {
        key: value for key, value in config.to_dict().items() if key not in ("transformers_version", "_name_or_path")
    }


def test_every_field_round_trips(tmp_path):
    own_fields = set(MlaDsaConfig.__annotations__)
    assert set(NON_DEFAULT) == own_fields, "keep NON_DEFAULT covering every field"
    default = MlaDsaConfig()
    config = MlaDsaConfig(**NON_DEFAULT)
    for name, value in NON_DEFAULT.items():
        assert getattr(config, name) == value, name
        assert getattr(default, name) != value, f"{name}: the round trip must see a non-default value"

    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "mla_dsa"
    assert written["auto_map"] == AUTO_MAP
    assert set(written["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
    }

    for loaded in (MlaDsaConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is MlaDsaConfig
        assert _comparable(loaded) == _comparable(config)
        for name, value in NON_DEFAULT.items():
            assert getattr(loaded, name) == value, name


def test_default_config_round_trips(tmp_path):
    config = MlaDsaConfig()
    config.save_pretrained(tmp_path)
    assert _comparable(MlaDsaConfig.from_pretrained(tmp_path)) == _comparable(config)


def test_package_registers_auto_config():
    assert type(AutoConfig.for_model("mla_dsa", **GEOMETRY)) is mla_dsa.MlaDsaConfig


def test_missing_and_misspelled_fields_are_named(tmp_path, caplog):
    """A config.json that lacks an MLA shape field, or carries an unknown MLA-looking one, says which."""
    import logging

    import transformers

    config = MlaDsaConfig(**GEOMETRY).to_dict()
    config.pop("kv_lora_rank")
    config["index_topK"] = 5
    _write_config(tmp_path, config)
    transformers.logging.set_verbosity_warning()
    logger = logging.getLogger("mla_dsa")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            loaded = MlaDsaConfig.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(caplog.handler)
        transformers.logging.set_verbosity_error()
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "no kv_lora_rank" in messages and "index_topK" in messages
    assert loaded.kv_lora_rank == 512
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        MlaDsaConfig.from_dict(MlaDsaConfig(**GEOMETRY).to_dict())
    assert not [r for r in caplog.records if "MlaDsaConfig" in r.getMessage()]


def test_validation_runs_through_transformers_hooks(tmp_path):
    """`validate()` is transformers' hook: save_pretrained runs it (a field broken after construction is refused
    before anything is written), and transformers' own checks surface as one ValueError too, not wrapped."""
    config = MlaDsaConfig(**GEOMETRY)
    config.index_topk = -1
    with pytest.raises(ValueError, match=r"\bindex_topk\b"):
        config.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()
    config.index_topk = 8
    config.output_attentions = True
    config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="output_attentions"):  # transformers' validate_output_attentions
        config.validate()


@pytest.mark.parametrize("override", [{"index_topk": -1}, {"index_topk": 0}, {"kv_lora_rank": 0},
                                      {"attention_mode": "fast"}])  # fmt: skip
def test_from_pretrained_overrides_are_validated(v32_checkpoint, override):
    name = next(iter(override))
    with pytest.raises(ValueError, match=name):
        mla_dsa.MlaDsaForCausalLM.from_pretrained(v32_checkpoint, **override)
    with pytest.raises(ValueError, match=name):
        mla_dsa.MlaDsaConfig.from_pretrained(v32_checkpoint, **override)
