"""Reading MLA checkpoints written for other names and families (mla_dsa/deepseek_format.py): DeepSeek's
own configs with every layer dense, Kimi-K2's, configs that name no family, and what is refused (a config without
MLA's fields, transformers' own MLA variants)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

import mla_dsa
from mla_dsa.cli import main as cli
from mla_dsa.deepseek_format import deepseek_family

from peers import save_peer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_dense_only_deepseek_config_loads_and_converts(tmp_path):
    """transformers' DeepseekV3 with every layer dense keeps its MoE defaults (n_group=8 with 4 routed experts) and
    runs; so does ours, and the converter takes it. Routing fields are still checked where a layer routes."""
    peer = save_peer("deepseek_v3", tmp_path / "dense", first_k_dense_replace=3, n_routed_experts=4, n_group=8,
                     topk_group=4)  # fmt: skip
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "dense", use_sparse_attention=False).eval()
    input_ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, peer(input_ids).logits, atol=1e-4, rtol=0)
    mla_dsa.convert_checkpoint(tmp_path / "dense", tmp_path / "dsa", progress=False)
    assert mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "dsa").config.n_group == 8
    with pytest.raises(ValueError, match="n_group"):
        mla_dsa.MlaDsaConfig(
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=8
        )


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_a_kimi_k2_checkpoint_converts_and_equals_deepseek_v3(tmp_path, capsys):
    """Kimi-K2's config.json says model_type "kimi_k2" (its own remote code) with DeepSeek-V3's fields and tensors:
    it converts (verified against transformers' DeepseekV3 on the same weights) and loads with the same logits."""
    peer = save_peer("deepseek_v3", tmp_path / "kimi")
    _edit_config(tmp_path / "kimi", model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
                 auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                           "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})  # fmt: skip
    assert cli(["convert", str(tmp_path / "kimi"), str(tmp_path / "dsa"), "--verify", "--no-progress"]) == 0
    assert "verify: max |logit difference|" in capsys.readouterr().out
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "dsa", use_sparse_attention=False).eval()
    input_ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, peer(input_ids).logits, atol=1e-4, rtol=0)


TOKENIZER_CODE = """import json
import os
import shutil

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


class TikTokenTokenizer(PreTrainedTokenizerFast):
    vocab_files_names = {"vocab_file": "kimi_vocab.json"}

    def __init__(self, vocab_file=None, **kwargs):
        backend = Tokenizer(models.WordLevel(json.load(open(vocab_file)), unk_token="<t0>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        super().__init__(tokenizer_object=backend, vocab_file=vocab_file, **kwargs)
        self.vocab_file = vocab_file

    def save_vocabulary(self, save_directory, filename_prefix=None):  # as Kimi-K2's copies its tiktoken.model
        target = os.path.join(save_directory, "kimi_vocab.json")
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
"""


def _kimi_k2_source(tmp_path, tokenizer_code: bool = False) -> list[str]:
    """A Kimi-K2-like SRC at tmp_path / "kimi" (kimi_k2, DeepSeek's YaRN in the older rope_scaling form, a word-level
    tokenizer; with `tokenizer_code`, a tokenizer class of its own, as Kimi-K2's): the `mla-dsa convert` arguments that
    calibrate its conversion into tmp_path / "dsa"."""
    from checkpoints import add_tokenizer_files

    src = tmp_path / "kimi"
    save_peer("deepseek_v3", src)
    add_tokenizer_files(src)
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    words = {**tokenizer, "added_tokens": [], "pre_tokenizer": {"type": "WhitespaceSplit"}}
    (src / "tokenizer.json").write_text(json.dumps(words))
    if tokenizer_code:  # its vocabulary in a file only its class reads (Kimi-K2's tiktoken.model), no tokenizer.json
        (src / "kimi_vocab.json").write_text(json.dumps(words["model"]["vocab"]))
        (src / "tokenizer.json").unlink()
        tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
        tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
        (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (src / "tokenization_kimi.py").write_text(TOKENIZER_CODE)
    yarn = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 1, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
    _edit_config(src, model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], rope_theta=50000.0,
                 rope_scaling=yarn, rope_parameters=None)  # fmt: skip
    text = " ".join(f"<t{token}>" for token in torch.randint(3, 97, (512,), generator=torch.Generator().manual_seed(0)))
    (tmp_path / "text.txt").write_text(text)
    return ["convert", str(src), str(tmp_path / "dsa"), "--index-topk", "4", "--calibration-data",
            str(tmp_path / "text.txt"), "--calibration-seq-len", "64", "--calibration-tokens", "256",
            "--calibration-steps", "2", "--no-progress"]  # fmt: skip


def test_a_kimi_k2_checkpoint_with_yarn_calibrates_with_its_tokenizer(tmp_path):
    """Kimi-K2's config.json (kimi_k2 with YaRN): transformers' AutoTokenizer fails reading it (an AttributeError on a
    config class it does not have), where the tokenizer files themselves load: the calibration reads the text with
    them."""
    assert cli(_kimi_k2_source(tmp_path)) == 0
    assert mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "dsa").config.rope_parameters["rope_type"] == "yarn"


def test_a_tokenizer_of_its_own_code_calibrates_with_trust_remote_code_only(tmp_path, capsys):
    """Kimi-K2's and Moonlight's tokenizers are code of their own: without --trust-remote-code the conversion stops in
    one line saying so (it had asked [y/N] mid-conversion, or told the user to save tokenizer files), with it the
    calibration reads the text through that class, and DST carries its code."""
    args = _kimi_k2_source(tmp_path, tokenizer_code=True)
    assert cli(args) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pass --trust-remote-code" in error
    assert cli([*args, "--trust-remote-code", "--overwrite"]) == 0
    assert (tmp_path / "dsa" / "tokenization_kimi.py").is_file()


def test_train_indexer_and_eval_read_a_tokenizer_of_its_own_code_with_trust_remote_code_only(tmp_path, capsys):
    """A DST whose tokenizer is code of its own (a Kimi-K2 conversion) trains and evaluates through the CLI with
    --trust-remote-code; without it each command stops in one line saying to pass it. The trained checkpoint carries
    the tokenizer's code, so `eval` reads it back."""
    assert cli([*_kimi_k2_source(tmp_path, tokenizer_code=True), "--trust-remote-code"]) == 0
    capsys.readouterr()
    text, dst, out = str(tmp_path / "text.txt"), str(tmp_path / "dsa"), str(tmp_path / "trained")
    train = ["train-indexer", dst, "--stage", "dense", "--data", text, "--out", out, "--steps", "1", "--seq-len", "32",
             "--batch-size", "1", "--no-progress"]  # fmt: skip
    evaluate = ["eval", out, "--data", text, "--seq-len", "32", "--windows", "2", "--no-progress"]
    assert cli(train) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pass --trust-remote-code" in error, error
    assert cli([*train, "--trust-remote-code"]) == 0
    tokenizers = [AutoTokenizer.from_pretrained(path, trust_remote_code=True) for path in (dst, out)]
    assert [type(tokenizer).__name__ for tokenizer in tokenizers] == ["TikTokenTokenizer"] * 2
    sample = (tmp_path / "text.txt").read_text()[:400]
    assert tokenizers[0](sample).input_ids == tokenizers[1](sample).input_ids
    capsys.readouterr()
    assert cli(evaluate) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pass --trust-remote-code" in error, error
    assert cli([*evaluate, "--trust-remote-code"]) == 0
    assert json.loads(capsys.readouterr().out)["dense_loss"] > 0


@pytest.mark.parametrize(
    "fields, family",
    [
        ({"architectures": ["DeepseekV2ForCausalLM"]}, "deepseek_v2"),
        ({"scoring_func": "softmax"}, "deepseek_v2"),
        ({"scoring_func": "sigmoid"}, "deepseek_v3"),
        ({"index_n_heads": 8}, "deepseek_v32"),
    ],
)
def test_an_unnamed_mla_config_is_read_as_the_family_it_describes(fields, family):
    mla = {"model_type": "my_mla", "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
    assert deepseek_family({**mla, **fields}) == family


def test_a_config_without_mla_fields_is_told_what_makes_one(tmp_path):
    with pytest.raises(ValueError) as error:
        deepseek_family({"model_type": "qwen3", "hidden_size": 64, "kv_lora_rank": 8})
    message = str(error.value)
    for name in ("qwen3", "not a Multi-head Latent Attention model", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "lacks"):  # fmt: skip
        assert name in message, message


def test_transformers_own_mla_variants_are_refused_unless_they_name_deepseek(tmp_path, capsys):
    """GLM-4-MoE-Lite has MLA fields but transformers runs it with its own code: not silently read as DeepSeek."""
    save_peer("deepseek_v3", tmp_path / "glm")
    _edit_config(tmp_path / "glm", model_type="glm4_moe_lite", architectures=["Glm4MoeLiteForCausalLM"])
    assert cli(["convert", str(tmp_path / "glm"), str(tmp_path / "dsa"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "glm4_moe_lite" in err and "transformers' own MLA variant" in err, err
    assert not (tmp_path / "dsa").exists()


def test_only_the_package_reads_a_deepseek_config_as_ours(tmp_path, monkeypatch):
    """The checkpoints' own config class reads its own config.json; a DeepSeek-format one is read as ours by the
    package's reader (`mla_dsa.deepseek_format`), and without it is refused with the way to read it."""
    save_peer("deepseek_v3", tmp_path)
    assert mla_dsa.MlaDsaConfig.from_pretrained(tmp_path).topk_method == "noaux_tc"
    monkeypatch.setattr(mla_dsa.MlaDsaConfig, "foreign_config_reader", None)
    with pytest.raises(ValueError, match=r"model_type 'deepseek_v3' is read as ours by the mla_dsa package"):
        mla_dsa.MlaDsaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"])
def test_rope_interleave_is_read_as_the_family_reads_it(tmp_path, model_type, caplog):
    """transformers' DeepseekV2/V32 and GlmMoeDsa configs keep a `rope_interleave: false` they are given, and their
    models ignore it (their attention always rotates adjacent pairs); only DeepseekV3 reads it. Read otherwise, the
    same weights gave logits 0.1-0.8 away from the peer's."""
    peer = save_peer(model_type, tmp_path, rope_interleave=False).eval()
    assert json.loads((tmp_path / "config.json").read_text())["rope_interleave"] is False
    with caplog.at_level("WARNING", logger="mla_dsa.deepseek_format"):
        ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.rope_interleave is (model_type != "deepseek_v3")
    warned = [record.message for record in caplog.records if "rope_interleave" in record.message]
    assert bool(warned) is (model_type != "deepseek_v3"), warned
    input_ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, peer(input_ids).logits, rtol=1e-4, atol=1e-4)
