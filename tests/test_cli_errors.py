"""Every mistake a user can make on the command line is one line naming what is wrong, never a traceback: a checkpoint
that is not MLA or whose weights are truncated (train-indexer, eval), a source config whose shape fields are not
positive integers (convert), a flag out of range (blamed on the flag, not on SRC's config)."""

import json
import shutil

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from mla_dsa.cli import main as cli
from mla_dsa.data import byte_tokenizer, stdlib_files
from mla_dsa.default_model import ASSET_DIR

DATA = str(stdlib_files("train")[0])


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        root / "gpt2"
    )
    byte_tokenizer().save_pretrained(root / "gpt2")
    shutil.copytree(ASSET_DIR, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return root


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


CANNOT_LOAD = [("gpt2", "config.json: model_type 'gpt2' is not a Multi-head"),
               ("truncated", "model.safetensors: truncated or corrupt")]  # fmt: skip


@pytest.mark.parametrize("command", ["train-indexer", "eval"])
@pytest.mark.parametrize(("checkpoint", "expected"), CANNOT_LOAD)
def test_a_checkpoint_that_cannot_load_is_one_line(broken, capsys, command, checkpoint, expected):
    options = ["--stage", "dense", "--out", str(broken / "out"), "--steps", "1"] if command == "train-indexer" else []
    assert cli([command, str(broken / checkpoint), "--data", DATA, "--seq-len", "32", *options]) == 1
    assert expected in _one_line(capsys)


@pytest.mark.parametrize(("field", "value"), [("num_attention_heads", "many"), ("num_attention_heads", None),
                                              ("num_hidden_layers", 2.5), ("hidden_size", -8)])  # fmt: skip
def test_convert_names_the_bad_shape_field_of_the_source(tmp_path, capsys, field, value):
    source = tmp_path / "source"
    shutil.copytree(ASSET_DIR, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, field: value}))
    assert cli(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    assert f"config.json: {field} must be a positive integer, got {value!r}" in _one_line(capsys)


@pytest.mark.parametrize("flag", [["--index-n-heads", "0"], ["--index-head-dim", "-4"], ["--calibration-steps", "-1"],
                                  ["--verify", "--verify-tolerance", "-1"], ["--calibration-lr", "0"]])  # fmt: skip
def test_convert_blames_a_bad_flag_on_the_flag(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", str(ASSET_DIR), str(tmp_path / "out"), *flag])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {[f for f in flag if f.startswith('--') and f != '--verify'][0]}" in line
    assert "config.json" not in line and not (tmp_path / "out").exists()


def test_the_convert_api_names_the_bad_option(tmp_path):
    import mla_dsa

    with pytest.raises(ValueError, match="--calibration-steps must be a positive number, got -1"):
        mla_dsa.convert_checkpoint(ASSET_DIR, tmp_path / "out", calibration_steps=-1)


def test_a_gqa_conversion_refuses_an_indexer_shape_before_its_calibration(tmp_path, monkeypatch):
    """--index-head-dim below the RoPE dims the GQA stage will give was refused only after minutes of its calibration;
    it is refused before the GQA stage starts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import mla_dsa
    from mla_dsa.conversion import convert

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    monkeypatch.setattr(convert, "write_mla_stage", lambda *args: pytest.fail("the GQA stage started"))
    with pytest.raises(mla_dsa.ConversionError, match="index_head_dim must be at least qk_rope_head_dim=16"):
        mla_dsa.convert_checkpoint(tmp_path / "src", tmp_path / "dst", index_head_dim=8, progress=False)
