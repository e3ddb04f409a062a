"""GQA -> MLA -> DSA (issue #19): `mla-dsa convert` on checkpoints written by transformers' own LlamaForCausalLM /
Qwen2ForCausalLM / MistralForCausalLM / Qwen3ForCausalLM.

Exact where the math is: with one key/value head, or with key heads whose RoPE pairs are linearly dependent, the
full-width conversion equals the source within float error; otherwise RoPE decoupling loses what docs/results.md
measures, and less latent rank loses more. What MLA cannot carry is refused naming it. Downstream: remote code,
generate(), PEFT (never on the prescaled latent), the export to DeepSeek-V3.2's format, resume after a crash.
"""

import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    DeepseekV32ForCausalLM,
    GlmMoeDsaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mla_dsa.conversion.convert import convert_checkpoint
from mla_dsa.conversion.gqa_math import (
    GqaGeometry,
    LayerStats,
    decouple_rope,
    factor_latent,
    mla_attention_weights,
    pairs,
    rope_frequencies,
)
from mla_dsa.conversion.source import ConversionError
from mla_dsa.data import byte_tokenizer, stdlib_files
from mla_dsa.indexer_loss import IndexerLoss
from mla_dsa.modeling.modeling_mla_dsa import LATENT_MODULES

from peers import perturb_

SEQ_LEN = 64
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip


@pytest.fixture(scope="module")
def data_files() -> list[str]:
    return [str(p) for p in stdlib_files("train")[:3]]


def calibration(files) -> dict:
    return dict(calibration_data=files, calibration_tokens=4 * SEQ_LEN, calibration_seq_len=SEQ_LEN, progress=False)


def save_gqa(directory: Path, model_class=LlamaForCausalLM, config_class=LlamaConfig, seed: int = 0,
             edit=None, **overrides) -> torch.nn.Module:  # fmt: skip
    torch.manual_seed(seed)
    model = perturb_(model_class(config_class(**{**SMALL, "num_key_value_heads": 2, **overrides})), seed=seed + 1)
    if edit is not None:
        edit(model)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return model.eval()


def converted(directory: Path, **kwargs) -> torch.nn.Module:
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **kwargs).eval()


def max_logit_error(source, model, seed: int = 0, **kwargs) -> float:
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (source(ids).logits - model(ids, **kwargs).logits).abs().max().item()


def test_one_kv_head_full_width_equals_source(tmp_path, data_files, capsys):
    """MQA (one key/value head): nothing to decouple; at the full width the converted DSA model, every key selected,
    equals transformers' LlamaForCausalLM, and greedy generation is the same; --verify holds both steps to it."""
    source = save_gqa(tmp_path / "src", num_key_value_heads=1)
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", verify=True, **calibration(data_files))
    assert "verify GQA -> MLA: max |logit difference|" in capsys.readouterr().out
    model = converted(dst, use_sparse_attention=False)
    assert model.config.kv_lora_rank == 16 and model.config.qk_rope_head_dim == 16
    assert max_logit_error(source, model) < 1e-4
    prompt = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        expected = source.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_a_config_without_num_key_value_heads_has_one_per_head(tmp_path, data_files):
    """Llama 1's config.json has no num_key_value_heads, which transformers reads as one key/value head per query
    head (MHA): converted exactly, where it was refused ("not a multiple of num_key_value_heads 0")."""
    source = save_gqa(tmp_path / "src", num_key_value_heads=SMALL["num_attention_heads"])
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    del config["num_key_value_heads"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", **calibration(data_files))
    assert max_logit_error(source, converted(dst, use_sparse_attention=False)) < 1e-4


def test_a_gqa_source_without_its_tokenizer_is_refused_naming_the_conversion(tmp_path, data_files):
    """The GQA -> MLA step reads the calibration text with SRC's tokenizer, whatever --indexer-init says: the error
    names that step (it named --indexer-init calibrate) and leaves no stage directory beside DST."""
    save_gqa(tmp_path / "src")
    for path in (tmp_path / "src").glob("tokenizer*"):
        path.unlink()
    with pytest.raises(ConversionError, match="the GQA -> MLA conversion reads the text with this checkpoint's tok"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", **calibration(data_files))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_dependent_rope_keys_full_width_equals_source(tmp_path, data_files):
    """Two key heads whose keys are multiples of one another: per RoPE frequency the mix of heads puts all the keys'
    energy into the shared RoPE key, so decoupling loses nothing and the full width is exact with a RoPE key of one
    head, with query heads of both groups reading it (each with its own weight)."""

    def dependent_keys(model):
        for layer in model.model.layers:
            k = layer.self_attn.k_proj.weight.data.view(2, 16, -1)
            k[1] = -0.5 * k[0]

    source = save_gqa(tmp_path / "src", edit=dependent_keys)
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", qk_rope_head_dim=16, **calibration(data_files))
    assert max_logit_error(source, converted(dst, use_sparse_attention=False)) < 1e-4


def test_less_rank_loses_more(tmp_path, data_files):
    """Independent key heads: decoupling loses a little at the full width; a narrower latent loses more."""
    source = save_gqa(tmp_path / "src")
    errors = {}
    for rank in (48, 24, 8):  # full width (2 x 2 - 1) x 16 = 48
        dst = convert_checkpoint(tmp_path / "src", tmp_path / f"r{rank}", kv_lora_rank=rank, **calibration(data_files))
        errors[rank] = max_logit_error(source, converted(dst, use_sparse_attention=False))
    assert 0 < errors[48] < errors[24] < errors[8], errors
    report = json.loads((tmp_path / "r24" / "mla_conversion.json").read_text())
    assert report["kv_lora_rank"] == 24 and report["full_rank"] == 48 and report["source_model_type"] == "llama"


def test_verify_reports_a_lossy_conversion_and_holds_it_to_a_tolerance_given(tmp_path, data_files, capsys):
    """A narrower latent is lossy by design: --verify reports its difference and passes, unless --verify-tolerance
    sets a bound, which it then holds (it printed a tolerance beside a larger difference and passed)."""
    save_gqa(tmp_path / "src")
    options = dict(kv_lora_rank=8, verify=True, **calibration(data_files))
    convert_checkpoint(tmp_path / "src", tmp_path / "lossy", **options)
    report = capsys.readouterr().out
    assert "not exact" in report and "reported: --verify-tolerance sets a bound" in report, report
    difference = float(report.split("max |logit difference| = ")[1].split()[0])
    with pytest.raises(ConversionError, match="--verify failed: GQA -> MLA"):
        convert_checkpoint(tmp_path / "src", tmp_path / "bounded", verify_tolerance=difference / 2, **options)
    convert_checkpoint(tmp_path / "src", tmp_path / "loose", verify_tolerance=difference * 2, **options)


def test_a_rope_key_of_every_key_head_is_exact_at_any_distance():
    """With the shared RoPE key as wide as all G key heads (rope_heads = G), every mixed key direction keeps its
    rotation at its own frequency (pair p = i * G + j at frequency i): the decoupled scores equal the source's RoPE
    scores at every distance, whatever the calibration's distances were, and nothing is position-free."""
    geometry = GqaGeometry(heads=4, kv_heads=2, head_dim=8, rope_heads=2)
    torch.manual_seed(0)
    w_q, w_k, x_moment = torch.randn(32, 12), torch.randn(16, 12), torch.eye(12)
    inv_freq = 1.0 / 10.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    stats = LayerStats(x_moment, 1.0, torch.rand(4, 16))  # distances 0..15 only
    q_rope, k_rope, q_nope, k_nope = decouple_rope(w_q, w_k, stats, geometry, inv_freq)
    assert q_rope.shape == (4, 16, 12) and k_rope.shape == (16, 12) and q_nope.shape[1] == k_nope.shape[0] == 0
    x_t, x_s = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)

    def rotate(v, position, frequencies):  # half-split RoPE
        angle, half = position * frequencies, len(v) // 2
        a, b = v[:half], v[half:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])

    wide = rope_frequencies(inv_freq, 2)
    assert torch.equal(wide, inv_freq.repeat_interleave(2))
    for t, s in ((10, 7), (5000, 3), (70_000, 69_000)):
        for head in range(4):
            q = w_q.double().view(4, 8, 12)[head] @ x_t
            k = w_k.double().view(2, 8, 12)[head // 2] @ x_s
            expected = rotate(q, t, inv_freq) @ rotate(k, s, inv_freq)
            actual = rotate(q_rope[head] @ x_t, t, wide) @ rotate(k_rope @ x_s, s, wide)
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_a_bfloat16_source_verifies_at_its_precision(tmp_path, data_files, monkeypatch):
    """A bfloat16 Llama (as published ones are) with --dtype auto: the stage's new attention weights are rounded to
    bfloat16, which the float32 tolerance of 1e-4 had refused (1.4e-3 here); the tolerance follows the dtype's
    precision, and a wrong weight still fails."""
    import mla_dsa.conversion.gqa as gqa

    model = save_gqa(tmp_path / "src")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", verify=True, **calibration(data_files))
    assert converted(tmp_path / "dst").model.layers[0].self_attn.q_b_proj.weight.dtype == torch.float32  # loaded so
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"

    exact = gqa.mla_attention_weights

    def off_by_a_tenth(*args, **kwargs):
        tensors = exact(*args, **kwargs)
        tensors["o_proj.weight"] = tensors["o_proj.weight"] * 1.1
        return tensors

    monkeypatch.setattr(gqa, "mla_attention_weights", off_by_a_tenth)
    with pytest.raises(ConversionError, match="--verify failed: GQA -> MLA"):
        convert_checkpoint(tmp_path / "src", tmp_path / "wrong", verify=True, **calibration(data_files))


def test_a_float16_conversion_stays_as_close_as_its_source_in_float16(tmp_path, data_files):
    """The latents sit in their norms' linear regime, far below float16's normal range: a float16 checkpoint (a
    float16 source with --dtype auto, or --dtype float16) stores the latent down-projections and norms in float32,
    and a float16 model keeps and runs them in float32. Before, the converted model in float16 was 0.1-0.5 logits
    off where its source in float16 is 2e-3 off (top-1 agreement 0.78), without a word."""
    source = save_gqa(tmp_path / "src", num_key_value_heads=1)  # exact in float32
    source.to(torch.float16).save_pretrained(tmp_path / "src16")
    byte_tokenizer().save_pretrained(tmp_path / "src16")
    source16 = AutoModelForCausalLM.from_pretrained(tmp_path / "src16", dtype=torch.float16).eval()
    for name, src, options in (("auto", "src16", {}), ("cast", "src", {"dtype": "float16"})):
        dst = convert_checkpoint(tmp_path / src, tmp_path / name, **options, **calibration(data_files))
        with safe_open(dst / "model.safetensors", "pt") as weights:
            dtypes = {key: weights.get_slice(key).get_dtype() for key in weights.keys()}
        latents = {key for key in dtypes if any(f".{module}." in key for module in LATENT_MODULES)}
        assert len(latents) == 4 * SMALL["num_hidden_layers"]
        # float32 too: the indexer's head weights, as transformers keeps (and saves) them in a float16 model
        latents |= {key for key in dtypes if key.endswith(".indexer.weights_proj.weight")}
        assert {dtypes[key] for key in latents} == {"F32"} and {dtypes[key] for key in dtypes.keys() - latents} == {
            "F16"}, dtypes  # fmt: skip
        assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"
        model = converted(dst, dtype=torch.float16, use_sparse_attention=False)
        attention = model.model.layers[0].self_attn
        assert attention.q_a_proj.weight.dtype == attention.kv_a_layernorm.weight.dtype == torch.float32
        assert attention.q_b_proj.weight.dtype == torch.float16
        ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), _LogRecords(type(model).__module__) as records:
            reference = source(ids).logits
            source_error = (source16(ids).logits.float() - reference).abs().max().item()
            error = (model(ids).logits.float() - reference).abs().max().item()
        assert not records.messages, records.messages
        assert error < 3 * source_error + 1e-3, (name, error, source_error)
    halved = converted(tmp_path / "cast").half()  # float16 everywhere: say so, once
    records = _LogRecords(type(halved).__module__)
    with records, torch.no_grad():
        halved(ids)
        halved(ids)
    assert [message for message in records.messages if "cannot hold their latents" in message] == [
        "MlaDsaModel: this GQA conversion's latent projections are float16 (`.half()`?), which cannot hold their "
        "latents (see LATENT_MODULES): load it with from_pretrained(..., dtype=torch.float16), which keeps them "
        "float32, or use bfloat16"]  # fmt: skip
    with pytest.warns(UserWarning, match="dtype float16 with a GQA conversion's latents"):
        convert_checkpoint(tmp_path / "auto", tmp_path / "export", export="deepseek_v32")
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys() if ".q_a_proj." in key} == {"F32"}


class _LogRecords(logging.Handler):
    """The messages a logger (and transformers' loggers, made verbose) emits while installed."""

    def __init__(self, name: str):
        super().__init__(level=logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        transformers.logging.set_verbosity_warning()
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        transformers.logging.set_verbosity_error()


def test_full_rope_key_converts_exactly_far_past_the_calibration(tmp_path, data_files, capsys):
    """`qk_rope_head_dim = kv_heads x head_dim` at the full latent width (the values alone: the same cache as SRC):
    the conversion is exact at positions far past the calibration windows (64 tokens; measured at 250), through
    transformers' DeepseekV3 (--verify), ours (dense and DSA, every key selected), greedy generation, and the
    exports transformers' DeepseekV32 and GlmMoeDsa load, whose RoPE (transformers' "longrope" with one factor per
    pair) they read the same way, with a warning that vLLM and SGLang would not. It is the default without
    --kv-lora-rank (the exports here)."""
    source = save_gqa(tmp_path / "src")
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", qk_rope_head_dim=32, index_topk=256, verify=True,
                             **calibration(data_files))  # fmt: skip
    assert "exact: every key/value head keeps its RoPE" in capsys.readouterr().out
    model = converted(dst)
    config = model.config
    assert (config.qk_rope_head_dim, config.qk_nope_head_dim, config.kv_lora_rank) == (32, 0, 32)
    assert config.rope_parameters["rope_type"] == "longrope"
    ids = torch.randint(0, 256, (2, 250), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(ids).logits
        assert (model(ids).logits - expected).abs().max() < 1e-4
        assert (model(ids, use_sparse_attention=False).logits - expected).abs().max() < 1e-4
        prompt = ids[:1, :200]
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                           source.generate(prompt, max_new_tokens=8, do_sample=False))  # fmt: skip
    for export, peer_class in (("deepseek_v32", DeepseekV32ForCausalLM), ("glm_moe_dsa", GlmMoeDsaForCausalLM)):
        with pytest.warns(UserWarning, match="vLLM's and SGLang's DeepSeek attention read any rope_scaling as YaRN"):
            exported = convert_checkpoint(tmp_path / "src", tmp_path / export, index_topk=256, export=export,
                                          **calibration(data_files))  # fmt: skip
        native = peer_class.from_pretrained(exported, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (native(ids).logits - expected).abs().max() < 1e-4, export


def test_each_rope_head_kept_loses_less(tmp_path, data_files):
    """Three independent key heads at the full latent width: keeping 1, 2, then all 3 mixed key directions rotated
    (qk_rope_head_dim 16, 32, 48) loses less each time, and nothing with all 3."""
    source = save_gqa(tmp_path / "src", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    errors = {}
    for rope in (16, 32, 48):
        dst = convert_checkpoint(tmp_path / "src", tmp_path / f"rope{rope}", qk_rope_head_dim=rope, index_topk=256,
                                 **calibration(data_files))  # fmt: skip
        model = converted(dst)
        assert model.config.kv_lora_rank == 96 - rope  # the full width: (2 x 3) x 16 less the RoPE key
        errors[rope] = max_logit_error(source, model)
    assert errors[48] < 1e-4 < errors[32] < errors[16], errors


def test_expected_rotation_is_exact_for_one_distance():
    """A head that reads only keys at distance d: the rotation its position-free keys lose is exactly R(-d f), so
    the decoupled scores at distance d equal the source's RoPE scores for every frequency and both key heads."""
    geometry = GqaGeometry(heads=2, kv_heads=2, head_dim=8)
    d, distance = 3, torch.zeros(2, 16)
    distance[:, d] = 1.0
    torch.manual_seed(0)
    w_q, w_k, x_moment = torch.randn(16, 12), torch.randn(16, 12), torch.eye(12)
    inv_freq = 1.0 / 10.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    q_rope, k_rope, q_nope, k_nope = decouple_rope(w_q, w_k, LayerStats(x_moment, 1.0, distance), geometry, inv_freq)
    x_t, x_s = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    first, second = pairs(8)

    def rotate(v, position):  # half-split RoPE of one head's vector
        angle = position * inv_freq
        a, b = v[first], v[second]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])

    t, s = 10, 10 - d
    for head in range(2):
        group = head  # two heads, two groups
        q = w_q.double().view(2, 8, 12)[head] @ x_t
        k = w_k.double().view(2, 8, 12)[group] @ x_s
        expected = rotate(q, t) @ rotate(k, s)
        actual = rotate(q_rope[head] @ x_t, t) @ rotate(k_rope @ x_s, s) + (q_nope[head] @ x_t) @ (k_nope @ x_s)
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_the_published_alternatives_compared_against_are_what_they_say():
    """benchmarks/gqa_ablation.py compares our two choices with TransMLA's. `fold=False`: the queries of the keys that
    lose RoPE stay as they are (the identity rotation, which is what a head reading only distance 0 expects).
    `fit="activation"`: the latent is the keys' and values' own principal subspace, blind to the queries and
    `o_proj` that `fit="attention"` weights by; both are exact at the full width."""
    geometry = GqaGeometry(heads=4, kv_heads=2, head_dim=8)
    torch.manual_seed(0)
    w_q, w_k, w_v, w_o = torch.randn(32, 12), torch.randn(16, 12), torch.randn(16, 12), torch.randn(12, 32)
    a = torch.randn(12, 12)
    inv_freq = 1.0 / 10.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    spread, at_zero = torch.rand(4, 16), torch.zeros(4, 16)
    at_zero[:, 0] = 1.0
    stats = LayerStats(a @ a.T / 12, 1.0, spread)
    unfolded = decouple_rope(w_q, w_k, stats, geometry, inv_freq, fold=False)[2]
    expected = decouple_rope(w_q, w_k, LayerStats(stats.x_moment, 1.0, at_zero), geometry, inv_freq)[2]
    torch.testing.assert_close(unfolded, expected)
    _, _, q_nope, k_nope = decouple_rope(w_q, w_k, stats, geometry, inv_freq)
    assert not torch.allclose(q_nope, unfolded)
    # YaRN's factor on every score (score_scale) goes into the queries, RoPE and position-free alike, and nowhere else
    one_rope_head = GqaGeometry(heads=4, kv_heads=2, head_dim=8, rope_heads=1)
    plain = mla_attention_weights(w_q, w_k, w_v, w_o, stats, one_rope_head, inv_freq, rank=6)
    yarn = mla_attention_weights(w_q, w_k, w_v, w_o, stats, one_rope_head, inv_freq, rank=6, score_scale=1.3)
    for name, tensor in plain.items():
        torch.testing.assert_close(yarn[name], tensor * 1.3 if name == "q_b_proj.weight" else tensor, msg=name)
    other_q, other_o = torch.randn_like(q_nope), torch.randn_like(w_o)
    for fit, blind in (("activation", True), ("attention", False)):
        a_1, b_k1, b_v1 = factor_latent(k_nope, q_nope, w_v, w_o, stats, geometry, 6, 1.0, fit)
        a_2, b_k2, b_v2 = factor_latent(k_nope, other_q, w_v, other_o, stats, geometry, 6, 1.0, fit)
        same = torch.allclose(torch.cat([b_k1, b_v1]) @ a_1, torch.cat([b_k2, b_v2]) @ a_2, atol=1e-8)
        assert same == blind, fit
        a_full, b_k, b_v = factor_latent(k_nope, q_nope, w_v, w_o, stats, geometry, 24, 1.0, fit)
        torch.testing.assert_close(torch.cat([b_k, b_v]) @ a_full, torch.cat([k_nope, w_v.double()]))


@pytest.mark.parametrize(
    "model_class, config_class, overrides",
    [(Qwen2ForCausalLM, Qwen2Config, {}), (LlamaForCausalLM, LlamaConfig, {"attention_bias": True})],
    ids=["qwen2-qkv-bias", "llama-attention-bias"],
)
def test_attention_biases_convert_exactly(tmp_path, data_files, capsys, model_class, config_class, overrides):
    """Qwen2's q/k/v biases and Llama's `attention_bias` (o_proj's too), made large: the projections are linear in
    [x; 1], the constant coordinate becomes q_a_proj's and kv_a_proj_with_mqa's bias (so RoPE turns the query and key
    biases as the source does) and the value bias o_proj's. At the full width the converted model, every key
    selected, equals the source (MHA and absorbed modes, greedy tokens), and so do transformers' DeepseekV3
    (--verify) and DeepseekV32 on the export, which warns that vLLM and SGLang would drop the biases; training never
    moves the prescaled projections' biases. All-zero biases leave `attention_bias` off."""
    source = save_gqa(tmp_path / "src", model_class, config_class, edit=_enlarge_attention_biases, **overrides)
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", index_topk=256, verify=True,
                             **calibration(data_files))  # fmt: skip
    assert "exact: every key/value head keeps its RoPE" in capsys.readouterr().out
    config = converted(dst).config
    assert config.attention_bias and config.q_lora_rank == SMALL["hidden_size"] + 1
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(ids).logits
        for mode in ("mha", "absorbed"):
            assert (converted(dst, attention_mode=mode)(ids).logits - expected).abs().max() < 1e-4, mode
        prompt = ids[:1, :32]
        assert torch.equal(converted(dst).generate(prompt, max_new_tokens=8, do_sample=False),
                           source.generate(prompt, max_new_tokens=8, do_sample=False))  # fmt: skip
    with pytest.warns(UserWarning, match="vLLM's and SGLang's DeepSeek attention build those projections without"):
        exported = convert_checkpoint(tmp_path / "src", tmp_path / "v32", index_topk=256, export="deepseek_v32",
                                      **calibration(data_files))  # fmt: skip
    with torch.no_grad():
        native = DeepseekV32ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        assert (native(ids).logits - expected).abs().max() < 1e-4

    from mla_dsa.training import prepare_indexer_training

    attention = prepare_indexer_training(converted(dst), "sparse").model.layers[0].self_attn
    assert not attention.q_a_proj.bias.requires_grad and not attention.kv_a_proj_with_mqa.bias.requires_grad
    assert attention.o_proj.bias.requires_grad

    save_gqa(tmp_path / "zero", model_class, config_class, edit=_zero_attention_biases, **overrides)
    zero = convert_checkpoint(tmp_path / "zero", tmp_path / "dst_zero", **calibration(data_files))
    assert not converted(zero).config.attention_bias


# Llama 3.x's RoPE (frequencies past `original_max_position_embeddings / low_freq_factor` in wavelength divided by
# `factor`, smoothed down to the high-frequency band) at sizes where all three bands exist for a 16-dim head, linear
# position interpolation, and YaRN (its own frequency ramp, and cos and sin multiplied by 0.1 ln(factor) + 1).
SCALED_ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
}  # fmt: skip


@pytest.mark.parametrize("rope_type", SCALED_ROPES)
def test_frequency_scaled_rope_converts_exactly(tmp_path, data_files, rope_type):
    """A source whose RoPE rescales its frequencies (Llama 3.x's "llama3", "linear", "yarn"): the default conversion
    keeps every key head's rotation at those frequencies (transformers' "longrope", one factor per pair) and equals
    the source at positions far past the calibration windows and past `original_max_position_embeddings`; one
    key/value head keeps the source's own RoPE type (YaRN's as longrope too: its attention factor is in the queries),
    and transformers' DeepseekV32 reads it from the export alike."""
    rope = SCALED_ROPES[rope_type]
    ids = torch.randint(0, 256, (2, 250), generator=torch.Generator().manual_seed(0))
    one_head = "longrope" if rope_type == "yarn" else rope_type
    for kv_heads, written in ((2, "longrope"), (1, one_head)):
        source = save_gqa(tmp_path / f"src{kv_heads}", num_key_value_heads=kv_heads, rope_parameters=rope)
        dst = convert_checkpoint(tmp_path / f"src{kv_heads}", tmp_path / f"dst{kv_heads}", index_topk=256,
                                 **calibration(data_files))  # fmt: skip
        model = converted(dst)
        assert model.config.rope_parameters["rope_type"] == written
        with torch.no_grad():
            expected = source(ids).logits
            assert (model(ids).logits - expected).abs().max() < 1e-4, kv_heads
    with pytest.warns(UserWarning, match=f"rope_type '{one_head}' .*read any rope_scaling as YaRN"):
        exported = convert_checkpoint(tmp_path / "src1", tmp_path / "v32", index_topk=256, export="deepseek_v32",
                                      **calibration(data_files))  # fmt: skip
    with torch.no_grad():
        native = DeepseekV32ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        assert (native(ids).logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("rope_type", SCALED_ROPES)
def test_source_rope_frequencies_are_those_of_its_rotary_embedding(rope_type):
    """What the RoPE fold and the written RoPE key use: SRC's frequencies and the factor on cos and sin as
    transformers' LlamaRotaryEmbedding computes them, from `rope_parameters` and from the older `rope_theta` +
    `rope_scaling` of a config.json."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mla_dsa.conversion.gqa import _inv_freq, _source_rotary

    rope = SCALED_ROPES[rope_type]
    config = LlamaConfig(**SMALL, num_key_value_heads=2, rope_parameters=rope)
    expected = LlamaRotaryEmbedding(config).inv_freq.double()
    assert not torch.allclose(expected, _inv_freq(LlamaConfig(**SMALL, num_key_value_heads=2).to_dict()))  # plain
    older = {key: value for key, value in rope.items() if key != "rope_theta"}
    for form in ({"rope_parameters": rope}, {"rope_theta": rope["rope_theta"], "rope_scaling": older}):
        config_json = {**config.to_dict(), "rope_parameters": None, **form}
        assert torch.allclose(_inv_freq(config_json), expected, rtol=1e-6, atol=0), form
        assert _source_rotary(config_json)[1] == pytest.approx(LlamaRotaryEmbedding(config).attention_scaling)


@pytest.mark.parametrize(
    "head_dim, kv_heads, rope, most_off",
    [(64, 3, {"rope_type": "default", "rope_theta": 100000.0}, 0),  # SmolLM2-135M's attention
     (64, 8, {**SCALED_ROPES["llama3"], "rope_theta": 500000.0, "factor": 32.0,
              "original_max_position_embeddings": 8192}, 12)],  # Llama-3.2-1B's
    ids=["smollm2", "llama-3.2-1b"],
)  # fmt: skip
def test_the_wide_rope_key_has_the_source_frequencies_in_float32(head_dim, kv_heads, rope, most_off):
    """The longrope factors of the wide RoPE key make transformers' float32 longrope frequencies (DeepseekV3's, ours)
    SRC's own, bit for bit: a frequency one float32 step off turns a key by an angle that grows with the distance
    (SmolLM2's geometry: 55 of 96 pairs were, before the factors were fitted in float32). Where no float32 factor
    gives SRC's frequency (12 of Llama-3.2-1B's 256 pairs; 9 of Llama-3.1-8B's 512) it is one step away."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mla_dsa.conversion.gqa import mla_config_fields

    source = LlamaConfig(vocab_size=256, hidden_size=9 * head_dim, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=8192, rope_parameters=rope)  # fmt: skip
    wanted = LlamaRotaryEmbedding(source).inv_freq.repeat_interleave(kv_heads)
    fields = mla_config_fields(source.to_dict(), kv_heads * head_dim, rope_dim=kv_heads * head_dim)
    written = DeepseekV3RotaryEmbedding(DeepseekV3Config(**fields)).inv_freq
    off = written != wanted
    assert off.sum() <= most_off
    assert torch.equal(torch.nextafter(written[off], wanted[off]), wanted[off])  # one step where not equal


def _attention_biases(model) -> list[torch.Tensor]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    projections = [getattr(layer.self_attn, name) for layer in model.model.layers for name in names]
    return [proj.bias for proj in projections if proj.bias is not None]


def _enlarge_attention_biases(model):
    with torch.no_grad():
        for bias in _attention_biases(model):
            bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(bias.numel()))


def _zero_attention_biases(model):
    with torch.no_grad():
        for bias in _attention_biases(model):
            bias.zero_()


@pytest.mark.parametrize(
    "model_class, config_class, overrides, reason",
    [
        (Qwen3ForCausalLM, Qwen3Config, {}, "QK-norm"),
        (MistralForCausalLM, MistralConfig, {"sliding_window": 32}, "sliding-window attention"),
        (LlamaForCausalLM, LlamaConfig, {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                             "long_factor": [2.0] * 8, "rope_theta": 10000.0,
                                                             "original_max_position_embeddings": 64}},
         "rope_type 'longrope'"),
        (LlamaForCausalLM, LlamaConfig, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                             "rope_theta": 10000.0}}, "rope_type 'dynamic'"),
    ],
)  # fmt: skip
def test_what_mla_cannot_carry_is_refused(tmp_path, data_files, model_class, config_class, overrides, reason):
    save_gqa(tmp_path / "src", model_class, config_class, **overrides)
    with pytest.raises(ConversionError, match=reason):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", **calibration(data_files))
    assert not (tmp_path / "dst").exists() and not (tmp_path / ".dst.mla-dsa-gqa").exists()


def test_option_errors(tmp_path, data_files):
    save_gqa(tmp_path / "src")
    with pytest.raises(ConversionError, match="pass --calibration-data"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    with pytest.raises(ConversionError, match=r"--kv-lora-rank must be in 1\.\.48"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", kv_lora_rank=49, **calibration(data_files))
    for rope in (24, 48):  # not a multiple of head_dim 16; wider than the 2 key/value heads
        with pytest.raises(ConversionError, match=rf"--qk-rope-head-dim must be a multiple of SRC's head_dim 16 up to "
                                                  rf"its 2 key/value heads' 32, got {rope}"):  # fmt: skip
            convert_checkpoint(tmp_path / "src", tmp_path / "dst", qk_rope_head_dim=rope, **calibration(data_files))
    with pytest.raises(ConversionError, match=r"--kv-lora-rank must be in 1\.\.32"):  # values only, with rope 32
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", qk_rope_head_dim=32, kv_lora_rank=48,
                           **calibration(data_files))  # fmt: skip
    mla = tmp_path / "mla"
    convert_checkpoint(tmp_path / "src", mla, **calibration(data_files))
    with pytest.raises(ConversionError, match="--kv-lora-rank applies to GQA sources"):
        convert_checkpoint(mla, tmp_path / "again", kv_lora_rank=8, progress=False)
    with pytest.raises(ConversionError, match="--qk-rope-head-dim applies to GQA sources"):
        convert_checkpoint(mla, tmp_path / "again", qk_rope_head_dim=16, progress=False)
    with pytest.raises(ConversionError, match="--from-gqa: model_type 'mla_dsa' is not one of llama"):
        convert_checkpoint(mla, tmp_path / "again", from_gqa=True, progress=False)


@pytest.mark.slow
def test_resume_after_a_crash_gives_the_same_bytes(tmp_path, data_files, monkeypatch):
    """A write failure in the GQA stage (one shard per layer here) leaves finished shards; --resume finishes with the
    bytes of an uninterrupted run."""
    import mla_dsa.conversion.gqa as gqa

    save_gqa(tmp_path / "src", num_hidden_layers=3)
    options = dict(max_shard_size=60_000, **calibration(data_files))
    clean = convert_checkpoint(tmp_path / "src", tmp_path / "clean", **options)
    real_save, calls = gqa.save_file, []

    def failing_save(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", path)
        return real_save(tensors, path, **kwargs)

    monkeypatch.setattr(gqa, "save_file", failing_save)
    with pytest.raises(ConversionError, match="--resume"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", **options)
    monkeypatch.setattr(gqa, "save_file", real_save)
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", resume=True, **options)
    files = sorted(p.name for p in clean.iterdir())
    assert files == sorted(p.name for p in dst.iterdir())
    for name in files:
        assert (clean / name).read_bytes() == (dst / name).read_bytes(), name
    assert not (tmp_path / ".dst.mla-dsa-gqa").exists()


@pytest.mark.slow
def test_downstream_export_peft_and_training(tmp_path, data_files):
    """The converted checkpoint exports to DeepSeek-V3.2's format (transformers' DeepseekV32ForCausalLM loads it with
    equal logits); PEFT LoRA never targets the prescaled latent projection, and training leaves it unchanged."""
    from peft import get_peft_model

    from mla_dsa.training import has_routed_experts, indexer_lora_config, prepare_indexer_training

    save_gqa(tmp_path / "src")
    ours = converted(convert_checkpoint(tmp_path / "src", tmp_path / "ours", index_topk=16, **calibration(data_files)))
    exported = convert_checkpoint(tmp_path / "src", tmp_path / "v32", index_topk=16, export="deepseek_v32",
                                  **calibration(data_files))  # fmt: skip
    native = DeepseekV32ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert max_logit_error(native, ours) < 1e-4

    assert not has_routed_experts(ours)  # a dense MLP: PEFT is asked for no expert parameters, so it has no warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no parameter was matched")
        lora = get_peft_model(ours, indexer_lora_config(("attention", "mlp"), prescaled_latent=True,
                                                        routed_experts=False))  # fmt: skip
    adapted = {name.split(".base_layer")[0] for name, _ in lora.named_parameters() if "lora_A" in name}
    assert any(name.endswith("kv_b_proj.lora_A.default.weight") for name in adapted)
    assert not any("kv_a_proj_with_mqa" in name or "q_a_proj" in name for name in adapted)

    model = prepare_indexer_training(converted(tmp_path / "ours"), "sparse")
    attention = model.model.layers[0].self_attn
    frozen = [attention.kv_a_proj_with_mqa.weight, attention.q_a_proj.weight]
    before = [p.detach().clone() for p in frozen]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with IndexerLoss(model, "sparse") as indexer_loss:
        loss = model(ids, labels=ids).loss
    loss = loss + indexer_loss.kl
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and attention.q_b_proj.weight.requires_grad
    assert not any(p.requires_grad for p in frozen) and all(map(torch.equal, frozen, before))


def test_cli_converts_a_gqa_checkpoint_and_eval_reads_it(tmp_path, data_files, capsys):
    """`mla-dsa convert SRC DST --from-gqa --kv-lora-rank R --calibration-data ...` then `mla-dsa eval`. The text
    given fits the indexers too, without --indexer-init calibrate (the default where text is given: they were left
    random)."""
    from mla_dsa.cli import main

    save_gqa(tmp_path / "src")
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--from-gqa", "--kv-lora-rank", "24",
            "--calibration-data", *data_files, "--calibration-tokens", "256", "--calibration-seq-len", "64",
            "--calibration-steps", "5", "--index-topk", "16", "--verify", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["kv_lora_rank"] == 24
    printed = capsys.readouterr().out
    assert "calibrated 2 indexers on 256 tokens" in printed and "note:" not in printed, printed
    assert main(["eval", str(tmp_path / "dst"), "--data", *data_files, "--seq-len", "64", "--windows", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["sparse_loss"]) and result["index_topk"] == 16


def test_code_parses_reads_the_first_code_block():
    from mla_dsa.demo_smollm2 import code_parses

    good = "Here:\n```python\ndef f(n):\n    return n\n```\nDone."
    assert code_parses(good) and code_parses("def f(n):\n    return n\n")
    assert not code_parses("```python\ndef f(n)\n    return n\n```")  # missing colon
    assert not code_parses("```python\nx = 1\n```")  # parses, defines nothing


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip


def test_chat_healing_data_answers_documented_functions_with_their_code(tmp_path):
    from mla_dsa.data import chat_code_files, documented_functions

    source = tmp_path / "module.py"
    source.write_text('''
def public(a, b=2):
    """Add two numbers.

    A second paragraph that is not part of the request.
    """
    total = a + b
    return total


def _private(x):
    """Hidden."""
    y = x
    return y + 1


def undocumented(x):
    y = x
    z = y
    return z


class Box:
    @staticmethod
    def make(size):
        """Build a box of SIZE."""
        box = [0] * size
        return box
''')
    pairs = documented_functions(source)
    assert [request for request, _ in pairs] == [
        "Write a Python function `public(a, b=2)`: Add two numbers.",
        "Write a Python method of the class `Box` `make(size)`: Build a box of SIZE.",
    ]
    assert pairs[1][1].startswith("@staticmethod\ndef make(size):")  # dedented, decorator kept
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    bare = tmp_path / "bare.py"
    bare.write_text("def f(x):\n    y = x\n    z = y\n    return z\n")
    (written,) = chat_code_files([bare, source], tokenizer, tmp_path / "chat")  # bare.py has nothing to ask for
    text = Path(written).read_text()
    assert text.count("<|user|>") == 2 and text.count("<|assistant|>") == 2
    reply = text.split("<|assistant|>")[1].split("<|end|>")[0]
    assert reply.startswith("```python\n") and reply.endswith("\n```")
    namespace = {}
    exec(compile(reply[len("```python\n") : -len("\n```")], "reply", "exec"), namespace)
    assert namespace["public"](1) == 3  # the answer is the function itself


@pytest.mark.slow
def _fail_after_the_gqa_stage(tmp_path, data_files, monkeypatch) -> None:
    """Converts src into dst with the DSA step's write failing (disk full): the finished GQA stage stays."""
    import mla_dsa.conversion.convert as convert

    real_write = convert.write_shards

    def failing_write(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "dst"))

    monkeypatch.setattr(convert, "write_shards", failing_write)
    with pytest.raises(ConversionError, match="--resume"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", **calibration(data_files))
    monkeypatch.setattr(convert, "write_shards", real_write)


def test_resume_after_the_gqa_stage_reuses_it(tmp_path, data_files, monkeypatch):
    """A failure in the DSA step keeps the finished MLA stage: --resume goes on from it without rerunning SRC."""
    import mla_dsa.conversion.gqa as gqa

    save_gqa(tmp_path / "src")
    clean = convert_checkpoint(tmp_path / "src", tmp_path / "clean", **calibration(data_files))
    _fail_after_the_gqa_stage(tmp_path, data_files, monkeypatch)
    assert (tmp_path / ".dst.mla-dsa-gqa" / "config.json").is_file()
    monkeypatch.setattr(gqa, "gqa_layer_stats", lambda *a: pytest.fail("the finished stage was recomputed"))
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", resume=True, **calibration(data_files))
    for path in clean.iterdir():
        assert path.read_bytes() == (dst / path.name).read_bytes(), path.name


def test_resume_never_reuses_a_stage_with_another_rope_key(tmp_path, data_files, monkeypatch):
    """The default stage (rank 32 = the values, RoPE key 32) and `--kv-lora-rank 32` (RoPE key of one head, 16) have
    the same rank: --resume after the first failed must rebuild the stage for the second, not reuse it."""
    save_gqa(tmp_path / "src")
    _fail_after_the_gqa_stage(tmp_path, data_files, monkeypatch)
    stage_config = json.loads((tmp_path / ".dst.mla-dsa-gqa" / "config.json").read_text())
    assert (stage_config["kv_lora_rank"], stage_config["qk_rope_head_dim"]) == (32, 32)
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst", kv_lora_rank=32, resume=True,
                             **calibration(data_files))  # fmt: skip
    config = json.loads((dst / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"]) == (32, 16, 16)
