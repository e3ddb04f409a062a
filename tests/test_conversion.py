"""`mla-dsa convert` / `mla_dsa.convert_checkpoint`: every input family, dtype and format converts exactly.

Each source is a tiny checkpoint written by transformers' own DeepseekV2/V3/V32ForCausalLM (peers.py), or that
checkpoint re-sharded, cast, block-quantized to FP8 or given a multi-token-prediction layer (checkpoints.py). The
output must hold every source tensor bit for bit (FP8: its exact dequantization), a well-shaped indexer per layer, an
MlaDsaConfig with auto_map and the payload, and compute the peer's logits with every token selected. Same inputs and
seed give the same bytes; `--verify` reports the logit difference and fails on corrupted weights.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM

import mla_dsa
from mla_dsa import ConversionError, MlaDsaConfig, MlaDsaForCausalLM, convert_checkpoint
from mla_dsa.cli import main
from mla_dsa.conversion.payload import PAYLOAD_DIR, payload_files
from mla_dsa.conversion.plan import ConvertOptions
from mla_dsa.conversion.source import SourceCheckpoint
from mla_dsa.conversion.verify import verify_logits
from mla_dsa.modeling.configuration_mla_dsa import AUTO_MAP

from checkpoints import (
    INDEX_NAME,
    INDEXER_PARAMS,
    SCALE_SUFFIX,
    add_mtp_layer,
    add_tokenizer_files,
    dequantize_reference,
    edit_config,
    file_bytes,
    make_fp8_checkpoint,
    read_checkpoint,
    read_shards,
    snapshot,
    weight_map,
    write_shards,
)
from peers import build_peer, left_padded_batch, save_peer

FAMILIES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
PAYLOAD = [path.name for path in payload_files()]
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
    "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "rope_interleave", "tie_word_embeddings",
)  # fmt: skip
ATOL = 1e-4
VERIFY_LINE = re.compile(r"max \|logit difference\| = ([0-9.e+-]+)")


def convert(src: Path, dst: Path, **options) -> Path:
    """`convert_checkpoint`, asserting that SRC is byte-for-byte (and mtime-for-mtime) untouched."""
    before = snapshot(src)
    out = convert_checkpoint(src, dst, progress=False, **options)
    assert snapshot(src) == before, "SRC was modified"
    assert out == Path(dst).resolve()
    return out


def cli(src: Path, dst: Path, *args: str) -> int:
    """`mla-dsa convert SRC DST ARGS` in this process, asserting that SRC is untouched."""
    before = snapshot(src)
    rc = main(["convert", str(src), str(dst), *args, "--no-progress"])
    assert snapshot(src) == before, "SRC was modified"
    return rc


@pytest.fixture(autouse=True)
def _module_sources_untouched(request):
    """The module-scoped sources a test uses are byte-for-byte the same after it."""
    sources = []
    if "family" in request.fixturenames:
        sources.append(request.getfixturevalue("family")["src"])
    if "fp8" in request.fixturenames:
        sources.append(request.getfixturevalue("fp8")["src"])
    if "sharded_src" in request.fixturenames:
        sources.append(request.getfixturevalue("sharded_src"))
    if "converted_v3" in request.fixturenames:
        sources.append(request.getfixturevalue("converted_v3") / "src")
    before = [snapshot(src) for src in sources]
    yield
    assert [snapshot(src) for src in sources] == before, "a module source was modified"


def indexer_names(num_layers: int) -> set[str]:
    return {f"model.layers.{i}.self_attn.indexer.{p}" for i in range(num_layers) for p in INDEXER_PARAMS}


def is_indexer(name: str) -> bool:
    return ".self_attn.indexer." in name


def config_of(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def load_converted(directory: Path, **overrides) -> MlaDsaForCausalLM:
    """The converted model in float32, asserting every weight in the checkpoint is used and none is missing."""
    model, info = MlaDsaForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True, **overrides
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_logits_match(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits.float()
        actual = model(input_ids, attention_mask=attention_mask).logits.float()
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)


def verify_difference(output: str) -> float:
    match = VERIFY_LINE.search(output)
    assert match, f"no logit difference printed: {output!r}"
    return float(match.group(1))


# -------------------------------------------------------------------------------------------- the three families
@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """A peer of each DeepSeek family (V2 without query compression), with tokenizer files, converted by default."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    src, dst = root / "src", root / "dst"
    peer = save_peer(model_type, src)
    add_tokenizer_files(src)
    convert(src, dst)
    return {
        "model_type": model_type,
        "peer": peer,
        "src": src,
        "dst": dst,
        "source": read_checkpoint(src),
        "output": read_checkpoint(dst),
    }


def test_output_has_source_names_plus_an_indexer_per_layer(family):
    config = config_of(family["src"])
    layers = config["num_hidden_layers"]
    source, output = family["source"], family["output"]
    if family["model_type"] == "deepseek_v32":
        assert indexer_names(layers) <= set(source), "the V3.2 peer should have its own indexer"
        assert set(output) == set(source)
        return
    assert not any(is_indexer(name) for name in source)
    assert set(output) == set(source) | indexer_names(layers)
    heads = min(64, max(8, config["num_attention_heads"]))  # the documented default for small models
    head_dim = min(128, max(2 * config["qk_rope_head_dim"], config["hidden_size"] // 8))
    query_input = config["q_lora_rank"] or config["hidden_size"]  # V2: no query compression
    for layer in range(layers):
        prefix = f"model.layers.{layer}.self_attn.indexer."
        assert output[prefix + "wq_b.weight"].shape == (heads * head_dim, query_input)
        assert output[prefix + "wk.weight"].shape == (head_dim, config["hidden_size"])
        assert output[prefix + "k_norm.weight"].shape == (head_dim,)
        assert output[prefix + "k_norm.bias"].shape == (head_dim,)
        assert output[prefix + "weights_proj.weight"].shape == (heads, config["hidden_size"])
        assert all(output[prefix + p].dtype == torch.float32 for p in INDEXER_PARAMS)
        assert all(torch.isfinite(output[prefix + p]).all() for p in INDEXER_PARAMS)
    out_config = config_of(family["dst"])
    assert (out_config["index_n_heads"], out_config["index_head_dim"]) == (heads, head_dim)


def test_every_source_tensor_is_bit_identical(family):
    source, output = family["source"], family["output"]
    for name, tensor in source.items():
        assert output[name].dtype == tensor.dtype, name
        assert torch.equal(output[name], tensor), name


def test_config_is_an_mla_dsa_config_with_auto_map(family):
    source_config, config = config_of(family["src"]), config_of(family["dst"])
    assert config["model_type"] == "mla_dsa"
    assert config["architectures"] == ["MlaDsaForCausalLM"]
    assert config["auto_map"] == AUTO_MAP
    for module_name in {target.split(".")[0] for target in AUTO_MAP.values()}:
        assert (family["dst"] / f"{module_name}.py").is_file()
    for key in ARCHITECTURE_KEYS:
        if key in source_config:
            assert config[key] == source_config[key], key
    if family["model_type"] == "deepseek_v2":  # complex-pair RoPE: the interleaved layout
        assert config["q_lora_rank"] is None and config["rope_interleave"] is True
        assert config["scoring_func"] == "softmax"
        assert config["topk_method"] == "greedy"
    if family["model_type"] == "deepseek_v32":
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            assert config[key] == source_config[key], key
    assert config["dtype"] == "float32"
    loaded = AutoConfig.from_pretrained(family["dst"])
    assert isinstance(loaded, MlaDsaConfig)


def test_payload_tokenizer_and_generation_files_are_copied(family):
    dst, src = family["dst"], family["src"]
    assert PAYLOAD and "modeling_mla_dsa.py" in PAYLOAD
    for name in PAYLOAD:
        assert (dst / name).read_bytes() == (PAYLOAD_DIR / name).read_bytes(), name
    assert not (dst / "__init__.py").exists()
    for name in EXTRA_FILES:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(dst.glob(".*")), "no hidden state files may be left in DST"


TOKENIZER_CODE = """from transformers import PreTrainedTokenizerFast


class TikTokenTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("export", [None, "deepseek_v32"])
def test_a_tokenizer_of_its_own_code_is_carried_and_loads(tmp_path, export):
    """Kimi-K2's and Moonlight's tokenizers are code of their own, named by tokenizer_config.json's auto_map: DST (and
    an export of it) carries that file, so its tokenizer loads; the model's own code is not carried."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_peer("deepseek_v3", src)
    add_tokenizer_files(src)
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer_json = json.loads((src / "tokenizer.json").read_text())
    (src / "tokenizer.json").write_text(json.dumps({**tokenizer_json, "added_tokens": []}))  # what the class reads
    (src / "tokenization_kimi.py").write_text(TOKENIZER_CODE)
    (src / "modeling_deepseek.py").write_text("raise ImportError('the source model's code, never carried')\n")
    convert(src, dst, index_topk=4)
    if export:
        dst = convert(dst, tmp_path / "export", export=export)
    assert (dst / "tokenization_kimi.py").read_bytes() == (src / "tokenization_kimi.py").read_bytes()
    assert not (dst / "modeling_deepseek.py").exists()
    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
    assert type(tokenizer).__name__ == "TikTokenTokenizer" and tokenizer("<t5>")["input_ids"] == [5]


def test_dense_logits_equal_the_peer(family):
    peer = family["peer"]
    if family["model_type"] == "deepseek_v32":  # the same weights with every token selected
        peer = build_peer("deepseek_v32", index_topk=64)
        same, built = peer.state_dict(), family["peer"].state_dict()
        assert same.keys() == built.keys() and all(torch.equal(same[k], built[k]) for k in same)
    assert_logits_match(load_converted(family["dst"], use_sparse_attention=False), peer)
    if family["model_type"] != "deepseek_v32":  # sparse on, index_topk (2048) >= L: every token selected
        model = load_converted(family["dst"])
        assert model.config.use_sparse_attention and model.config.index_topk >= 12
        assert_logits_match(model, peer)


def test_v32_indexer_is_kept_and_sparse_logits_equal_the_peer(tmp_path):
    src = tmp_path / "src"
    peer = save_peer("deepseek_v32", src)  # index_topk=5 < 12 tokens: the selection matters
    convert(src, tmp_path / "dst")
    model = load_converted(tmp_path / "dst")
    assert model.config.use_sparse_attention and model.config.index_topk == 5
    assert_logits_match(model, peer)


# --------------------------------------------------------------------------------- formats, dtypes, MTP, sharding
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_sharded_source_keeps_its_dtype_and_drops_mtp(tmp_path, dtype):
    src, dst = tmp_path / "src", tmp_path / "dst"
    peer = build_peer("deepseek_v3").to(dtype)
    peer.save_pretrained(src, max_shard_size="80KB")
    mtp = add_mtp_layer(src, own_shard=False)  # into the last shard, beside regular tensors
    source = read_checkpoint(src)
    assert len(set(weight_map(src).values())) >= 4 and mtp[0] in source and mtp[0].startswith("model.layers.3.")
    convert(src, dst)
    output = read_checkpoint(dst)
    assert (dst / INDEX_NAME).exists() and len(set(weight_map(dst).values())) >= 4
    assert not any(name.startswith("model.layers.3.") for name in output)
    assert set(output) == (set(source) - set(mtp)) | indexer_names(3)
    for name, tensor in output.items():
        if name.endswith("indexer.weights_proj.weight") and dtype == torch.float16:
            assert tensor.dtype == torch.float32, name  # as transformers keeps and saves it in a float16 model
        elif is_indexer(name):
            assert tensor.dtype == dtype, name
        else:
            assert tensor.dtype == source[name].dtype and torch.equal(tensor, source[name]), name
    assert config_of(dst)["dtype"] == str(dtype).removeprefix("torch.")
    index = json.loads((dst / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(output)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in output.values())
    assert_logits_match(load_converted(dst, use_sparse_attention=False), peer.float())


def test_mtp_layer_in_a_shard_of_its_own_is_dropped(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_peer("deepseek_v3", src)
    mtp = add_mtp_layer(src, own_shard=True)
    assert weight_map(src)[mtp[0]] == "model-mtp.safetensors"
    convert(src, dst)
    output = read_checkpoint(dst)
    assert not any(name.startswith("model.layers.3.") for name in output)
    assert set(output) == (set(read_checkpoint(src)) - set(mtp)) | indexer_names(3)
    assert "model-mtp.safetensors" not in set(weight_map(dst).values())


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v32"])
def fp8(request, tmp_path_factory):
    """A bf16 peer (hidden 256, kv_lora_rank 128: several and partial 128x128 blocks), block-quantized to FP8 as
    DeepSeek publishes it, with an FP8 MTP layer; and the same weights dequantized, for transformers to load."""
    model_type = request.param
    root = tmp_path_factory.mktemp(f"fp8_{model_type}")
    peer = build_peer(model_type, hidden_size=256, kv_lora_rank=128).to(torch.bfloat16)
    peer.save_pretrained(root / "bf16")
    quantized = make_fp8_checkpoint(root / "bf16", root / "src")
    mtp = add_mtp_layer(root / "src", fp8=True)
    add_tokenizer_files(root / "src")
    source = read_checkpoint(root / "src")
    reference = {}  # the dequantized checkpoint, written independently of mla_dsa
    for name, tensor in source.items():
        if name in quantized:
            reference[name] = dequantize_reference(tensor, source[name + SCALE_SUFFIX], torch.bfloat16)
        elif not name.endswith(SCALE_SUFFIX) and name not in mtp:
            reference[name] = tensor
    write_shards(root / "dequantized", {"model.safetensors": reference})
    shutil.copyfile(root / "bf16" / "config.json", root / "dequantized" / "config.json")
    return {"model_type": model_type, "root": root, "src": root / "src", "quantized": quantized, "mtp": mtp,
            "source": source, "reference": reference}  # fmt: skip


def test_fp8_checkpoint_is_quantized_as_published(fp8):
    source, quantized = fp8["source"], fp8["quantized"]
    assert config_of(fp8["src"])["quantization_config"]["weight_block_size"] == [128, 128]
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in quantized
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in quantized
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert source[name].dtype == torch.bfloat16 and name not in quantized
    scales = [source[name + SCALE_SUFFIX] for name in quantized]
    assert all(source[name].dtype == torch.float8_e4m3fn for name in quantized)
    assert any(scale.shape[0] >= 2 and scale.shape[1] >= 2 for scale in scales)  # [136, 256]: a partial row block
    if fp8["model_type"] == "deepseek_v32":
        assert "model.layers.0.self_attn.indexer.wk.weight" in quantized


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_fp8_source_is_dequantized_exactly(fp8, tmp_path, dtype):
    dst = tmp_path / "dst"
    convert(fp8["src"], dst, dtype=dtype)
    source, output = fp8["source"], read_checkpoint(dst)
    target = torch.bfloat16 if dtype == "auto" else torch.float32
    new_indexer = set() if fp8["model_type"] == "deepseek_v32" else indexer_names(3)
    kept = {name for name in source if not name.endswith(SCALE_SUFFIX) and name not in fp8["mtp"]}
    assert set(output) == kept | new_indexer
    for name in kept:
        if name in fp8["quantized"]:
            expected = dequantize_reference(source[name], source[name + SCALE_SUFFIX], target)
        elif dtype == "auto":
            expected = source[name]
        else:
            expected = source[name].to(target)
        assert output[name].dtype == expected.dtype and torch.equal(output[name], expected), name
    config = config_of(dst)
    assert "quantization_config" not in config
    assert config["dtype"] == str(target).removeprefix("torch.")
    for name in EXTRA_FILES:
        assert (dst / name).read_bytes() == (fp8["src"] / name).read_bytes()


def test_fp8_conversion_logits_equal_transformers_on_the_dequantized_weights(fp8, tmp_path, capsys):
    import logging

    from transformers.utils import logging as transformers_logging

    dst = tmp_path / "dst"
    reports = []  # what transformers logs as users run it (the suite silences it)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: reports.append(record.getMessage())
    library, verbosity = transformers_logging.get_logger("transformers"), transformers_logging.get_verbosity()
    library.addHandler(handler)
    transformers_logging.set_verbosity_warning()
    try:
        rc = cli(fp8["src"], dst, "--verify")
    finally:
        transformers_logging.set_verbosity(verbosity)
        library.removeHandler(handler)
    assert rc == 0
    assert verify_difference(capsys.readouterr().out) <= ATOL
    assert not [report for report in reports if "UNEXPECTED" in report]  # the MTP layer dropped is not loaded
    peer_class = DeepseekV32ForCausalLM if fp8["model_type"] == "deepseek_v32" else DeepseekV3ForCausalLM
    reference = peer_class.from_pretrained(fp8["root"] / "dequantized", dtype=torch.float32).eval()
    # V3.2: its dequantized indexer selects 5 of 12 tokens, in both models
    assert_logits_match(load_converted(dst, use_sparse_attention=fp8["model_type"] == "deepseek_v32"), reference)


def test_an_fp8_checkpoint_is_refused_by_the_model_and_converted_by_the_converter(fp8, tmp_path, capsys):
    """DeepSeek publishes V3/V3.1/V3.2 as block-FP8: loading one directly took the FP8 codes for the weights (logits
    5 off, and train-indexer saved them so); transformers' own dequantization on load takes its blocks from the scale
    grid and reads this one's partial block (kv_a_proj_with_mqa's 136 rows) as two of 68. The model, train-indexer,
    eval and serve refuse it in one line naming the converter, which dequantizes it exactly (test above); its config
    still reads."""
    with pytest.raises(ValueError, match="with fp8 weights .*mla-dsa convert SRC DST"):
        mla_dsa.MlaDsaForCausalLM.from_pretrained(fp8["src"])
    with pytest.raises(ValueError, match="with fp8 weights"):
        mla_dsa.load_checkpoint(fp8["src"])
    text = tmp_path / "text.txt"
    text.write_text("a b c " * 200)
    train = ["train-indexer", str(fp8["src"]), "--stage", "dense", "--data", str(text), "--out", str(tmp_path / "out")]
    for command in (train, ["eval", str(fp8["src"]), "--data", str(text)], ["serve", str(fp8["src"])]):
        assert main(command) == 1
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "mla-dsa convert SRC DST" in error, error
    assert not (tmp_path / "out").exists()
    assert MlaDsaConfig.from_pretrained(fp8["src"]).num_hidden_layers == 3
    convert(fp8["src"], tmp_path / "dst")
    assert mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "dst").config.model_type == "mla_dsa"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32"])  # an indexer grafted, or the source's
def test_dtype_option_casts_every_float_tensor(tmp_path, dtype, model_type):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_peer(model_type, src)
    name = str(dtype).removeprefix("torch.")
    assert cli(src, dst, "--dtype", name) == 0
    source, output = read_checkpoint(src), read_checkpoint(dst)
    assert set(output) == set(source) | indexer_names(3)
    router = ("e_score_correction_bias", ".mlp.gate.weight")  # float32, as transformers keeps them in any dtype
    assert sum(name.endswith(router) for name in output) == 4  # two MoE layers
    for tensor_name, tensor in output.items():
        if tensor_name.endswith(router):  # kept exact: a rounded router weight routes tokens elsewhere
            assert tensor.dtype == torch.float32 and torch.equal(tensor, source[tensor_name]), tensor_name
        elif tensor_name.endswith("indexer.weights_proj.weight") and dtype == torch.float16:
            assert tensor.dtype == torch.float32, tensor_name  # transformers keeps it float32 in float16 models
        else:
            assert tensor.dtype == dtype, tensor_name
        if tensor_name in source and not tensor_name.endswith(router):
            assert torch.equal(tensor, source[tensor_name].to(tensor.dtype)), tensor_name  # float32 kept exact
    assert config_of(dst)["dtype"] == name
    load_converted(dst)


def test_old_style_rope_scaling_config_converts(tmp_path, capsys):
    """DeepSeek's published config.json: rope_theta + rope_scaling (yarn) instead of rope_parameters."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_peer("deepseek_v3", src)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
    edit_config(src, rope_parameters=None, rope_theta=10000.0, rope_scaling=yarn)
    assert cli(src, dst, "--verify") == 0
    assert verify_difference(capsys.readouterr().out) <= ATOL
    rope = load_converted(dst).config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0


# ------------------------------------------------------------------------------------------------ indexer options
def test_indexer_shape_and_topk_options(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_peer("deepseek_v2", src)  # q_lora_rank null: wq_b reads the hidden state
    args = ["--index-n-heads", "4", "--index-head-dim", "16", "--index-topk", "7"]
    assert cli(src, dst, *args) == 0
    config = config_of(dst)
    assert (config["index_n_heads"], config["index_head_dim"], config["index_topk"]) == (4, 16, 7)
    output = read_checkpoint(dst)
    for layer in range(3):
        prefix = f"model.layers.{layer}.self_attn.indexer."
        assert output[prefix + "wq_b.weight"].shape == (4 * 16, 64)
        assert output[prefix + "wk.weight"].shape == (16, 64)
        assert output[prefix + "k_norm.weight"].shape == output[prefix + "k_norm.bias"].shape == (16,)
        assert output[prefix + "weights_proj.weight"].shape == (4, 64)
    model = load_converted(dst)
    assert model.config.index_topk == 7


def test_verify_says_why_a_v2_config_normalising_its_routing_differs_from_transformers(tmp_path, capsys):
    """norm_topk_prob=True: DeepSeek-V2's code (and ours) normalise the top-k expert weights, transformers' DeepseekV2
    scales them by routed_scaling_factor. --verify fails (it had, with a bare number) saying why and what accepts it."""
    save_peer("deepseek_v2", tmp_path / "src", norm_topk_prob=True, routed_scaling_factor=2.0)
    assert cli(tmp_path / "src", tmp_path / "dst", "--verify") == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "ignores norm_topk_prob=True" in error and "--verify-tolerance" in error
    assert cli(tmp_path / "src", tmp_path / "dst", "--verify", "--verify-tolerance", "100") == 0


def test_v32_source_keeps_its_indexer_shape_but_takes_a_new_topk(tmp_path):
    src = tmp_path / "src"
    save_peer("deepseek_v32", src)
    with pytest.raises(ConversionError, match="index_n_heads"):
        convert(src, tmp_path / "heads", index_n_heads=4)
    assert not (tmp_path / "heads").exists()
    convert(src, tmp_path / "topk", index_topk=64)
    assert config_of(tmp_path / "topk")["index_topk"] == 64
    source, output = read_checkpoint(src), read_checkpoint(tmp_path / "topk")
    assert set(output) == set(source) and all(torch.equal(output[k], source[k]) for k in source)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_svd_init_loads_and_keeps_every_source_tensor(tmp_path, model_type):
    src = tmp_path / "src"
    peer = save_peer(model_type, src)
    convert(src, tmp_path / "svd", indexer_init="svd")
    convert(src, tmp_path / "random", indexer_init="random")
    source, svd, random = (read_checkpoint(tmp_path / d) for d in ("src", "svd", "random"))
    assert set(svd) == set(source) | indexer_names(3)
    assert all(torch.equal(svd[name], tensor) for name, tensor in source.items())
    for layer in range(3):
        for param in ("wq_b.weight", "wk.weight"):
            name = f"model.layers.{layer}.self_attn.indexer.{param}"
            assert svd[name].shape == random[name].shape and torch.isfinite(svd[name]).all()
            assert not torch.equal(svd[name], random[name]), name
    assert_logits_match(load_converted(tmp_path / "svd", use_sparse_attention=False), peer)
    load_converted(tmp_path / "svd")  # and with the indexer in use


def test_mla_dsa_source_reconverts_to_the_same_tensors(tmp_path):
    src = tmp_path / "v3"
    save_peer("deepseek_v3", src)
    convert(src, tmp_path / "first", seed=3)
    convert(tmp_path / "first", tmp_path / "second", seed=4)  # a different seed: the kept indexer must not change
    first, second = read_checkpoint(tmp_path / "first"), read_checkpoint(tmp_path / "second")
    assert set(first) == set(second)
    assert all(first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)
    assert config_of(tmp_path / "second")["model_type"] == "mla_dsa"
    with pytest.raises(ConversionError, match="index_head_dim"):
        convert(tmp_path / "first", tmp_path / "third", index_head_dim=8)


# -------------------------------------------------------------------------------------------- sharding, determinism
def test_max_shard_size_splits_the_output(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_peer("deepseek_v3", src)  # one file
    limit = 100_000
    assert cli(src, dst, "--max-shard-size", "100KB") == 0
    index = json.loads((dst / INDEX_NAME).read_text())
    shards = read_shards(dst)
    assert len(shards) >= 5 and not (dst / "model.safetensors").exists()
    assert set(shards) == set(index["weight_map"].values())
    assert {name: shard for shard, tensors in shards.items() for name in tensors} == index["weight_map"]
    output = {name: tensor for tensors in shards.values() for name, tensor in tensors.items()}
    assert set(output) == set(read_checkpoint(src)) | indexer_names(3)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in output.values())
    for tensors in shards.values():
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= limit
    assert_logits_match(load_converted(dst, use_sparse_attention=False), build_peer("deepseek_v3"))


@pytest.fixture(scope="module")
def sharded_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("determinism") / "src"
    build_peer("deepseek_v3").save_pretrained(src, max_shard_size="200KB")
    add_tokenizer_files(src)
    return src


@pytest.mark.parametrize("init", ["random", "svd"])
def test_same_inputs_and_seed_give_identical_bytes(sharded_src, tmp_path, init):
    runs = []
    for name in ("a", "b"):
        dst = tmp_path / name
        args = ["--seed", "7", "--indexer-init", init, "--max-shard-size", "150KB"]
        assert cli(sharded_src, dst, *args) == 0
        runs.append(file_bytes(dst))
    assert len([name for name in runs[0] if name.endswith(".safetensors")]) >= 4
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert runs[0][name] == runs[1][name], name


def test_a_different_seed_changes_the_indexer_only(sharded_src, tmp_path):
    convert(sharded_src, tmp_path / "seed0", seed=0)
    convert(sharded_src, tmp_path / "seed1", seed=1)
    a, b = read_checkpoint(tmp_path / "seed0"), read_checkpoint(tmp_path / "seed1")
    assert a.keys() == b.keys()
    changed = {name for name in a if not torch.equal(a[name], b[name])}
    random_params = {"wq_b.weight", "wk.weight", "weights_proj.weight"}
    expected = {f"model.layers.{i}.self_attn.indexer.{p}" for i in range(3) for p in random_params}
    assert changed == expected
    files_a, files_b = file_bytes(tmp_path / "seed0"), file_bytes(tmp_path / "seed1")
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        if not name.endswith(".safetensors"):
            assert files_a[name] == files_b[name], name


# ------------------------------------------------------------------------------------------------------- verify
@pytest.fixture(scope="module")
def converted_v3(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    save_peer("deepseek_v3", root / "src")
    convert(root / "src", root / "dst")
    return root


@pytest.mark.parametrize("model_type", FAMILIES)
def test_verify_prints_the_difference_and_succeeds(tmp_path, capsys, model_type):
    save_peer(model_type, tmp_path / "src")
    assert cli(tmp_path / "src", tmp_path / "dst", "--verify") == 0
    assert verify_difference(capsys.readouterr().out) <= ATOL


def test_verify_logits_fails_on_a_corrupted_tensor(converted_v3, tmp_path):
    src = converted_v3 / "src"
    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(converted_v3 / "dst", good)
    shutil.copytree(converted_v3 / "dst", bad)
    shards = read_shards(bad)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shards["model.safetensors"][name] = shards["model.safetensors"][name] * 1.01
    write_shards(bad, shards)
    config = MlaDsaConfig.from_pretrained(good)
    assert verify_logits(SourceCheckpoint(src), good, config, ConvertOptions()) <= ATOL
    with pytest.raises(ConversionError, match="--verify failed"):
        verify_logits(SourceCheckpoint(src), bad, config, ConvertOptions())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_verify_succeeds_on_a_good_conversion_to_another_dtype(converted_v3, tmp_path, capsys, dtype):
    """Every tensor is exactly the source's cast to --dtype (see test_dtype_option_casts_every_float_tensor): a good
    conversion, so --verify must pass on it, as it does for FP8 sources dequantized to bf16."""
    dst = tmp_path / "dst"
    rc = cli(converted_v3 / "src", dst, "--dtype", dtype, "--verify")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert dst.is_dir()


# ------------------------------------------------------------------------------------------------------------ API
def test_api_returns_dst_and_raises_conversion_error(converted_v3, tmp_path):
    assert mla_dsa.convert_checkpoint is convert_checkpoint
    out = mla_dsa.convert_checkpoint(str(converted_v3 / "src"), str(tmp_path / "dst"), progress=False, seed=5)
    assert out == (tmp_path / "dst").resolve() and (out / "model.safetensors").is_file()
    assert issubclass(mla_dsa.ConversionError, Exception)
    bad_options = [{"dtype": "int8"}, {"indexer_init": "pca"}]
    for options in bad_options:
        with pytest.raises(mla_dsa.ConversionError):
            mla_dsa.convert_checkpoint(converted_v3 / "src", tmp_path / "bad", progress=False, **options)
    with pytest.raises(mla_dsa.ConversionError, match="not a directory"):
        mla_dsa.convert_checkpoint(tmp_path / "nowhere", tmp_path / "bad", progress=False)
    shutil.copytree(converted_v3 / "src", tmp_path / "not_mla")
    edit_config(tmp_path / "not_mla", model_type="gpt2")
    with pytest.raises(mla_dsa.ConversionError, match="config.json") as error:
        mla_dsa.convert_checkpoint(tmp_path / "not_mla", tmp_path / "bad", progress=False)
    assert error.value.path == str(tmp_path / "not_mla" / "config.json")
    assert not (tmp_path / "bad").exists()
