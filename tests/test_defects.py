"""Defects a transformers user hit (issue 12), each pinned where it was fixed: gradient checkpointing with a cache,
validation that from_pretrained overrides and the CLI could bypass, the CLI's one-line errors, the public names."""

import hashlib
import json
import shutil

import pytest
import torch
import transformers

import mla_dsa
from mla_dsa.cli import main as cli
from mla_dsa.data import byte_tokenizer, stdlib_files
from mla_dsa.modeling.compat_mla_dsa import CACHE_NAME
from mla_dsa.modeling.deepseek_format_mla_dsa import deepseek_family

from peers import save_byte_level_dsa, save_peer

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = [str(stdlib_files("train")[0])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("v32")
    return save_peer("deepseek_v32", directory, index_topk=5), directory


def test_gradient_checkpointing_with_use_cache_trains_as_the_peer(saved):
    """transformers' DeepseekV32: one warning, use_cache turned off, no cache returned; the loss and its gradients are
    those of an unchecked step (a cache passed positionally used to raise CheckpointError in backward)."""
    peer, directory = saved
    input_ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, model in (("peer", peer), ("ours", mla_dsa.MlaDsaForCausalLM.from_pretrained(directory))):
        model.gradient_checkpointing_enable()
        model.train()
        out = model(input_ids, labels=input_ids, use_cache=True)
        out.loss.backward()
        results[name] = (out.loss.detach(), getattr(out, CACHE_NAME), model.lm_head.weight.grad.clone())
        model.gradient_checkpointing_disable()
        model.zero_grad()
        model.eval()
    (peer_loss, peer_cache, peer_grad), (loss, cache, grad) = results["peer"], results["ours"]
    assert peer_cache is None and cache is None
    torch.testing.assert_close(loss, peer_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, peer_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("override", [{"index_topk": -1}, {"index_topk": 0}, {"kv_lora_rank": 0},
                                      {"attention_mode": "fast"}])  # fmt: skip
def test_from_pretrained_overrides_are_validated(saved, override):
    _, directory = saved
    name = next(iter(override))
    with pytest.raises(ValueError, match=name):
        mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, **override)
    with pytest.raises(ValueError, match=name):
        mla_dsa.MlaDsaConfig.from_pretrained(directory, **override)


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
        ["eval", "SRC", "--data", "x", "--batch-size", "0"],
        ["eval", "SRC", "--data", "x", "--windows", "two"],
    ],
    ids=lambda argv: " ".join(argv[:1] + argv[-2:]),
)
def test_bad_numbers_on_the_command_line_stop_before_any_work(saved, tmp_path, capsys, argv):
    _, directory = saved
    argv = [str(directory) if a == "SRC" else str(tmp_path / "dst") if a == "DST" else a for a in argv]
    with pytest.raises(SystemExit) as stopped:
        cli(argv)
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    assert "must be a positive" in err.splitlines()[-1], err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("command", ["eval", "train-indexer"])
def test_a_missing_checkpoint_is_one_line(tmp_path, capsys, command):
    argv = [command, str(tmp_path / "nowhere"), "--data", *DATA]
    if command == "train-indexer":
        argv += ["--stage", "dense", "--out", str(tmp_path / "out")]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err and "no such checkpoint" in err, err
    assert not (tmp_path / "out").exists()


def test_the_documented_names_are_at_the_top_level():
    from mla_dsa import training

    for name in ("prepare_indexer_training", "indexer_lora_config"):
        assert getattr(mla_dsa, name) is getattr(training, name) and name in mla_dsa.__all__
    for name in ("convert_checkpoint", "upgrade_code", "MlaDsaConfig", "MlaDsaForCausalLM", "MlaDsaModel",
                 "MlaDsaCache", "MlaDsaCacheLayer"):  # fmt: skip
        assert hasattr(mla_dsa, name) and name in mla_dsa.__all__
    with pytest.raises(AttributeError):
        mla_dsa.no_such_name  # noqa: B018


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


# ----------------------------------------------------------------- MLA checkpoints of other names (Kimi-K2, ...)
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


# ------------------------------------------------------------------------- training CLI checks before any work
@pytest.fixture(scope="module")
def byte_dsa(tmp_path_factory):
    root = tmp_path_factory.mktemp("bytes")
    return save_byte_level_dsa(root / "dense", root / "dsa", index_topk=4)


def _train_argv(checkpoint, out, *extra, data=DATA, stage="dense"):
    return ["train-indexer", str(checkpoint), "--stage", stage, "--data", *data, "--out", str(out),
            "--steps", "1", "--batch-size", "1", "--seq-len", "16", "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("command", ["train-indexer", "eval"])
@pytest.mark.parametrize("problem", ["beyond the data", "beyond max_position_embeddings"])
def test_a_seq_len_the_run_cannot_have_is_one_line_before_loading(byte_dsa, tmp_path, capsys, command, problem):
    short = tmp_path / "short.py"
    short.write_text("x = 1\n" * 10)  # 60 bytes
    seq_len, data = ("100", [str(short)]) if problem == "beyond the data" else ("4096", DATA)
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


# -------------------------------------------------------------------------------- Hugging Face cache snapshots
def test_a_symlinked_single_file_snapshot_keeps_its_tokenizer_and_generation_files(tmp_path):
    """A Hugging Face cache snapshot: every file a link into blobs/. With follow_symlinks every one is carried over
    (without it, the conversion is refused naming the first link: see test_conversion_safety)."""
    dense = tmp_path / "dense"
    save_peer("deepseek_v3", dense)
    byte_tokenizer().save_pretrained(dense)
    snapshot, blobs = tmp_path / "snapshots" / "abc123", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in dense.iterdir():
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(blob)
    mla_dsa.convert_checkpoint(snapshot, tmp_path / "dsa", follow_symlinks=True, progress=False)
    carried = [p.name for p in dense.iterdir() if p.name not in ("config.json", "model.safetensors")]
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(carried)
    for name in carried:
        assert (tmp_path / "dsa" / name).read_bytes() == (dense / name).read_bytes(), name


# ------------------------------------------------------------------ saving in the middle of indexer training
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_a_checkpoint_saved_mid_training_loads_for_inference(byte_dsa, tmp_path, stage):
    """The stage's loss is computed beside the model: preparing a model for it changes no config, so what it saves
    mid-run is the inference checkpoint it was (with no hooks of the loss in it), and the live run keeps training."""
    from mla_dsa.indexer_loss import IndexerLoss

    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(byte_dsa)
    before = model.config.to_dict()
    mla_dsa.prepare_indexer_training(model, stage)
    input_ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    indexer_loss = IndexerLoss(model, stage).install()
    model(input_ids, labels=input_ids, index_topk=4)
    assert indexer_loss.kl is not None
    model.save_pretrained(tmp_path / "mid")
    assert model.config.to_dict() == before
    written = json.loads((tmp_path / "mid" / "config.json").read_text())
    assert written["use_sparse_attention"] is True and "indexer_loss" not in written and "indexer_stage" not in written
    loaded = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "mid").eval()
    out = loaded(input_ids, labels=input_ids)
    indexer_loss.reset()
    model(input_ids, labels=input_ids, index_topk=4)  # the live run still has its loss
    assert indexer_loss.kl is not None
    indexer_loss.remove()
    reference = mla_dsa.MlaDsaForCausalLM.from_pretrained(byte_dsa).eval()
    with torch.no_grad():
        torch.testing.assert_close(out.logits, reference(input_ids).logits)
        torch.testing.assert_close(loaded(input_ids).logits, model.eval()(input_ids).logits)


@pytest.mark.compat  # generate() passes our DSA arguments on to every step on the oldest transformers too
def test_runtime_choices_leave_the_config_alone(byte_dsa):
    """evaluate_indexer, oracle_recall and generate with DSA arguments run with other settings, never by writing
    them into the loaded model's config; the old config switch `indexer_loss` is refused, not silently ignored."""
    from mla_dsa.training import evaluate_indexer, oracle_recall

    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(byte_dsa).eval()
    before = model.config.to_dict()
    windows = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    evaluate_indexer(model, windows, index_topk=4)
    oracle_recall(model, windows, k=4)
    greedy = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    generated = model.generate(windows[:1, :8], index_topk=2, **greedy)
    dense = model.generate(windows[:1, :8], use_sparse_attention=False, **greedy)
    assert model.config.to_dict() == before
    # Every step used the call's choice: the scores are those of models loaded with it as their default.
    for out, default in ((generated, {"index_topk": 2}), (dense, {"use_sparse_attention": False})):
        reference = mla_dsa.MlaDsaForCausalLM.from_pretrained(byte_dsa, **default).eval()
        expected = reference.generate(windows[:1, :8], **greedy)
        assert torch.equal(out.sequences, expected.sequences)
        for step, (score, want) in enumerate(zip(out.scores, expected.scores, strict=True)):
            torch.testing.assert_close(score, want, msg=f"step {step}")
    assert not all(torch.equal(a, b) for a, b in zip(generated.scores, dense.scores, strict=True))
    model.config.indexer_loss = "dense"
    with pytest.raises(ValueError, match="IndexerLoss"):
        model(windows)


# ----------------------------------------------------------------------------------------- --no-progress
def test_no_progress_silences_every_bar(byte_dsa, tmp_path, capsys):
    """Our bars and transformers' own (loading weights, writing shards), in every command that has the flag."""
    dense = byte_dsa.parent / "dense"
    runs = [
        ["convert", str(dense), str(tmp_path / "dsa"), "--verify", "--no-progress"],
        _train_argv(byte_dsa, tmp_path / "out"),
        ["eval", str(byte_dsa), "--data", *DATA, "--seq-len", "16", "--windows", "2", "--no-progress"],
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
