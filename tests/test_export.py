"""`mla-dsa convert SRC DST --export deepseek_v32`: DeepSeek-V3.2's native format, proven by transformers' own
DeepseekV32ForCausalLM (what vLLM and SGLang serve; vLLM's CPU build refuses sparse attention, so a GPU would be
needed to serve it there). The export loads with no custom code and no loading complaint, computes what ours computes
(logits, greedy generation) and converts back to ours bit for bit; what the format cannot say is refused."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV32ForCausalLM

import mla_dsa
from mla_dsa import ConversionError, MlaDsaConfig, MlaDsaForCausalLM
from mla_dsa.cli import main

from checkpoints import edit_config, read_checkpoint
from peers import VOCAB, perturb_, save_peer

TOPK = 5
# The fields of DeepSeek's published DeepSeek-V3.2(-Exp) config.json, less quantization_config (the export is bf16
# or wider, not FP8). Serving engines read them: vLLM fails without topk_method and scoring_func.
PUBLISHED_V32_FIELDS = """architectures attention_bias attention_dropout bos_token_id eos_token_id ep_size
first_k_dense_replace hidden_act hidden_size index_head_dim index_n_heads index_topk initializer_range
intermediate_size kv_lora_rank max_position_embeddings model_type moe_intermediate_size moe_layer_freq n_group
n_routed_experts n_shared_experts norm_topk_prob num_attention_heads num_experts_per_tok num_hidden_layers
num_key_value_heads num_nextn_predict_layers q_lora_rank qk_nope_head_dim qk_rope_head_dim rms_norm_eps rope_scaling
rope_theta routed_scaling_factor scoring_func tie_word_embeddings topk_group topk_method torch_dtype
transformers_version use_cache v_head_dim vocab_size""".split()


def _ours(tmp: Path, name: str = "ours", **peer_overrides) -> Path:
    """A DeepSeek-V3 peer converted to our DSA format (top-5 of longer inputs), its indexer 16 random heads of 32
    dims. The SVD init's correlated heads ReLU many keys to exactly 0.0 at once, and such ties at the top-k boundary
    are decided by key position in ours (tests/test_topk_ties.py) and arbitrarily by transformers' topk: these
    inputs have none."""
    save_peer("deepseek_v3", tmp / f"{name}-v3", **peer_overrides)
    return mla_dsa.convert_checkpoint(tmp / f"{name}-v3", tmp / name, index_topk=TOPK, indexer_init="random",
                                      index_n_heads=16, index_head_dim=32, progress=False)  # fmt: skip


def _load_native(directory: Path) -> DeepseekV32ForCausalLM:
    model, info = DeepseekV32ForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model.eval()


def _input_ids(seq_len: int = 24, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("export")
    ours = _ours(tmp)
    return ours, mla_dsa.convert_checkpoint(ours, tmp / "exported", export="deepseek_v32", progress=False)


@pytest.mark.compat
def test_transformers_native_class_loads_the_export_with_no_custom_code(exported):
    _, export = exported
    assert not list(export.glob("*.py"))
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["architectures"] == ["DeepseekV32ForCausalLM"]
    assert "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(export)  # no trust_remote_code
    assert type(model) is DeepseekV32ForCausalLM
    _load_native(export)


def test_export_config_has_every_field_deepseek_publishes(exported):
    _, export = exported
    config = json.loads((export / "config.json").read_text())
    assert [name for name in PUBLISHED_V32_FIELDS if name not in config] == []
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert config["num_nextn_predict_layers"] == 0  # no multi-token-prediction layer is written
    assert config["index_topk"] == TOPK and config["rope_scaling"] is None and config["rope_theta"] == 10000.0
    assert not any(name in config for name in ("use_sparse_attention", "attention_mode", "indexer_cache_dtype"))
    assert config.get("indexer_rope_interleave", False) is False  # what vLLM and SGLang assume without it: half-split


# What vLLM 0.34 and SGLang 0.5.23 read from a deepseek_v32 / glm_moe_dsa checkpoint beyond transformers' own fields
# (docs/serving_engines.md, read from their wheels): routing (SGLang fails without topk_method / scoring_func /
# moe_layer_freq), the indexer's shape, the layer placement.
ENGINE_FIELDS = """index_topk index_n_heads index_head_dim topk_method scoring_func moe_layer_freq n_group topk_group
routed_scaling_factor norm_topk_prob kv_lora_rank q_lora_rank qk_rope_head_dim qk_nope_head_dim v_head_dim
first_k_dense_replace num_nextn_predict_layers n_routed_experts n_shared_experts""".split()
INDEXER_TENSORS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")


def test_export_has_the_fields_and_tensor_names_serving_engines_load(exported):
    """The engines load HF names only: one tensor per expert (vLLM cannot load fused 3-D experts), the indexer's
    five tensors in every layer (vLLM's strict check fails on a missing `k_norm.bias`), `lm_head.weight` (vLLM never
    ties it to the embeddings)."""
    _, export = exported
    config = json.loads((export / "config.json").read_text())
    assert [name for name in ENGINE_FIELDS if config.get(name) is None] == []
    names = set(read_checkpoint(export))
    assert "lm_head.weight" in names and not any("gate_up_proj" in name for name in names)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        assert {f"{prefix}self_attn.indexer.{tensor}" for tensor in INDEXER_TENSORS} <= names
        if layer >= config["first_k_dense_replace"]:
            experts = {f"{prefix}mlp.experts.{e}.{p}_proj.weight" for e in range(config["n_routed_experts"])
                       for p in ("gate", "up", "down")}  # fmt: skip
            assert experts <= names and f"{prefix}mlp.gate.e_score_correction_bias" in names


@pytest.mark.compat
def test_export_computes_what_ours_computes(exported):
    ours_dir, export = exported
    ours, native = MlaDsaForCausalLM.from_pretrained(ours_dir).eval(), _load_native(export)
    input_ids = _input_ids()  # 24 tokens, top-5: the selection decides the result
    with torch.no_grad():
        torch.testing.assert_close(native(input_ids).logits, ours(input_ids).logits, rtol=0, atol=2e-5)
        dense = ours(input_ids, use_sparse_attention=False).logits
        assert (dense - ours(input_ids).logits).abs().max() > 1e-3  # the top-k mattered
    prompt = _input_ids(seq_len=12, batch=1)
    expected = ours.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(native.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_export_converts_back_to_ours_bit_identically(exported, tmp_path):
    ours, export = exported
    back = mla_dsa.convert_checkpoint(export, tmp_path / "back", progress=False)
    original, returned = read_checkpoint(ours), read_checkpoint(back)
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name
    versionless = [json.loads((d / "config.json").read_text()) for d in (ours, back)]
    for config in versionless:
        config.pop("transformers_version")
    assert versionless[0] == versionless[1]
    assert sorted(p.name for p in back.glob("*.py")) == sorted(p.name for p in ours.glob("*.py"))


def test_dense_checkpoint_exports_in_one_step_with_verify(exported, tmp_path, capsys):
    """`convert V3 DST --export deepseek_v32 --verify`: the indexer grafted and the serving format written at once,
    checked by running SRC and the export through transformers' own classes."""
    ours, export = exported
    status = main(["convert", str(ours.parent / "ours-v3"), str(tmp_path / "direct"), "--export", "deepseek_v32",
                   "--index-topk", str(TOPK), "--indexer-init", "random", "--index-n-heads", "16",
                   "--index-head-dim", "32", "--verify", "--no-progress"])  # fmt: skip
    assert status == 0 and "verify: max |logit difference|" in capsys.readouterr().out
    assert json.loads((tmp_path / "direct" / "config.json").read_text()) == json.loads(
        (export / "config.json").read_text()
    )
    direct, via_ours = read_checkpoint(tmp_path / "direct"), read_checkpoint(export)
    assert direct.keys() == via_ours.keys() and all(torch.equal(direct[k], via_ours[k]) for k in direct)


@pytest.mark.compat  # it reads transformers' DeepseekV32 indexer's output, on the oldest release too
def test_verify_checks_the_sparse_path_against_transformers_own_indexer(exported, tmp_path, capsys, monkeypatch):
    """--verify's dense check never runs the indexer (16 tokens, every key selected); its sparse check runs ours
    against transformers' DeepseekV32 (top-16 of 64 keys) in both attention modes. The SVD init's exact ties at the
    k-th place, which transformers' topk breaks otherwise than ours, pass it; an indexer rotating its RoPE pairs in
    GLM-5's layout (mlx-lm's DSA bug) and a sparse attention that ignores the selection fail it, where the dense
    check passes."""
    from mla_dsa.modeling import modeling_mla_dsa

    args = ["convert", str(exported[0].parent / "ours-v3"), "", "--index-topk", str(TOPK), "--indexer-init", "svd",
            "--verify", "--no-progress"]  # fmt: skip

    def convert(name: str) -> tuple[int, str]:
        status = main([*args[:2], str(tmp_path / name), *args[3:]])
        captured = capsys.readouterr()
        return status, captured.out + captured.err

    status, output = convert("ties")
    assert status == 0, output
    sparse = next(line for line in output.splitlines() if line.startswith("verify sparse:"))
    assert int(re.search(r"ties in (\d+) of", sparse).group(1)) > 0, sparse  # ties were broken otherwise

    rotate = modeling_mla_dsa._rotate_leading_dims
    with monkeypatch.context() as patch:
        patch.setattr(modeling_mla_dsa, "_rotate_leading_dims", lambda x, cos, sin, dim, interleave: rotate(
            x, cos, sin, dim, not interleave))  # fmt: skip
        status, output = convert("other-rope-layout")
    assert status == 1 and "verify: max |logit difference|" in output, output  # the dense check passed
    assert "the indexers differ" in output, output

    with monkeypatch.context() as patch:
        patch.setattr(modeling_mla_dsa.MlaDsaAttention, "_mha_mask", staticmethod(
            lambda visible, selection, start, end, num_keys: (visible.mask(start, end)[..., :num_keys],
                                                              visible.mask(start, end)[..., :1])))  # fmt: skip
        status, output = convert("selection-ignored")
    assert status == 1 and "verify: max |logit difference|" in output, output
    assert "sparse max logit difference" in output, output
    assert not any((tmp_path / name).exists() for name in ("other-rope-layout", "selection-ignored"))

    save_peer("deepseek_v2", tmp_path / "v2")  # softmax routing, no query latent: V3.2's class cannot run it
    status = main(["convert", str(tmp_path / "v2"), str(tmp_path / "v2-dsa"), "--verify", "--no-progress"])
    output = capsys.readouterr().out
    assert status == 0 and "verify sparse: not checked, transformers' deepseek_v32 class cannot express" in output


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 128,
            }
        },  # fmt: skip
        {"moe_layer_freq": 2, "num_hidden_layers": 4},
    ],
    ids=["yarn", "moe-every-2nd-layer"],
)
def test_export_keeps_rope_scaling_and_moe_placement(tmp_path, overrides):
    moe_layer_freq = overrides.pop("moe_layer_freq", None)
    ours = _ours(tmp_path, **overrides)
    if moe_layer_freq:  # DeepseekV3Config has no moe_layer_freq: our own model of that config, perturbed
        config = MlaDsaConfig.from_pretrained(ours, moe_layer_freq=moe_layer_freq)
        torch.manual_seed(0)
        perturb_(MlaDsaForCausalLM(config)).save_pretrained(ours)
    export = mla_dsa.convert_checkpoint(ours, tmp_path / "export", export="deepseek_v32", progress=False)
    if moe_layer_freq:
        assert json.loads((export / "config.json").read_text())["mlp_layer_types"] == ["dense", "dense", "sparse",
                                                                                        "dense"]  # fmt: skip
    input_ids = _input_ids(seq_len=40)
    with torch.no_grad():
        expected = MlaDsaForCausalLM.from_pretrained(ours).eval()(input_ids).logits
        torch.testing.assert_close(_load_native(export)(input_ids).logits, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"dense_attention_layers": [0]}, "dense_attention_layers"),
        ({"use_sparse_attention": False}, "use_sparse_attention"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"indexer_types": ["full", "shared", "full"]}, "indexer_types"),
    ],
)
def test_what_the_format_cannot_express_is_refused(exported, tmp_path, edit, field):
    ours, _ = exported
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in ours.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    edit_config(changed, **edit)
    with pytest.raises(ConversionError, match=f"cannot export to deepseek_v32: {field}="):
        mla_dsa.convert_checkpoint(changed, tmp_path / "out", export="deepseek_v32", progress=False)
    assert not (tmp_path / "out").exists()


def test_deepseek_v2_routing_and_uncompressed_queries_are_refused(tmp_path):
    save_peer("deepseek_v2", tmp_path / "v2")
    with pytest.raises(ConversionError, match="q_lora_rank=None.*scoring_func='softmax'"):
        mla_dsa.convert_checkpoint(tmp_path / "v2", tmp_path / "out", export="deepseek_v32", progress=False)


def test_cli_refuses_an_unknown_export_format(exported, tmp_path, capsys):
    ours, _ = exported
    with pytest.raises(SystemExit):
        main(["convert", str(ours), str(tmp_path / "out"), "--export", "vllm"])
    assert "invalid choice: 'vllm'" in capsys.readouterr().err


def test_mlp_layer_types_that_break_deepseeks_rule_are_refused():
    fields = {"model_type": "deepseek_v32", "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 8}
    assert MlaDsaConfig.from_dict({**fields, "mlp_layer_types": ["dense", "sparse", "sparse"]}).first_k_dense_replace
    with pytest.raises(ValueError, match="mlp_layer_types .* does not follow first_k_dense_replace=1"):
        MlaDsaConfig.from_dict({**fields, "mlp_layer_types": ["sparse", "dense", "sparse"]})
