"""`mla-dsa train-indexer` / `mla-dsa eval` on Trainer, data-parallel under accelerate, and LoRA round trips."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mla_dsa
from mla_dsa.cli import main as cli
from mla_dsa.data import stdlib_files
from mla_dsa.training import load_trained

from peers import save_byte_level_dsa

REPO = Path(__file__).resolve().parents[1]
DATA = [str(path) for path in stdlib_files("train")[:6]]


@pytest.fixture(scope="module")
def dsa_checkpoint(tmp_path_factory):
    return save_byte_level_dsa(tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("dsa") / "ckpt", 16)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.compat
def test_dense_warmup_trains_only_the_indexer_and_saves_a_dsa_checkpoint(dsa_checkpoint, tmp_path):
    out = tmp_path / "warm"
    assert cli(["train-indexer", str(dsa_checkpoint), "--stage", "dense", "--data", *DATA, "--out", str(out),
                "--steps", "8", "--seq-len", "64", "--batch-size", "2", "--no-progress"]) == 0  # fmt: skip
    before, after = weights(dsa_checkpoint), weights(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".indexer." in name for name in changed)
    assert any("wq_b" in name for name in changed)
    config = json.loads((out / "config.json").read_text())
    assert config["use_sparse_attention"] is True and config.get("indexer_loss") is None
    assert config["use_cache"] is True  # the Trainer's use_cache=False is not what inference gets
    assert (out / "modeling_mla_dsa.py").exists() and (out / "tokenizer.json").exists()
    assert not (out / "checkpoints").exists()  # no --save-steps: no optimizer state left behind
    # the run's record stays in OUT, never in what is made from it
    assert "log_history" in json.loads((out / "mla-dsa-training.json").read_text())
    export = mla_dsa.convert_checkpoint(out, tmp_path / "export", export="deepseek_v32", progress=False)
    assert (export / "tokenizer.json").exists() and not (export / "mla-dsa-training.json").exists()


@pytest.mark.parametrize("lora_save", [None, "merged", "adapter"])
def test_the_k_trained_at_is_the_k_the_output_runs_at(dsa_checkpoint, tmp_path, lora_save):
    """`--index-topk K` trains at K (the checkpoint has 16): the output's config (or, for an adapter, the run record
    that `load_trained` and `eval` read) says K, where it had kept the checkpoint's k without a word."""
    out = tmp_path / "out"
    lora = [] if lora_save is None else ["--lora", "2", "--lora-save", lora_save]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(["train-indexer", str(dsa_checkpoint), "--stage", "sparse", "--data", *DATA, "--out", str(out),
                    "--steps", "1", "--seq-len", "64", "--batch-size", "1", "--index-topk", "8", "--no-progress",
                    *lora]) == 0  # fmt: skip
    # an adapter alone cannot carry k: PEFT and Auto loading run it at the base's 16 (max |logit diff| 6.7 measured)
    told = [str(w.message) for w in caught if "trained at index_topk=8" in str(w.message)]
    assert len(told) == (lora_save == "adapter"), told
    assert json.loads((out / "mla-dsa-training.json").read_text())["index_topk"] == 8
    if lora_save != "adapter":
        assert json.loads((out / "config.json").read_text())["index_topk"] == 8
        assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert load_trained(out).config.index_topk == 8


def test_resume_continues_from_the_last_checkpoint_with_the_same_settings_only(dsa_checkpoint, tmp_path, capsys):
    common = ["--stage", "dense", "--data", *DATA, "--seq-len", "64", "--batch-size", "2", "--no-progress",
              "--save-steps", "3"]  # fmt: skip
    straight = tmp_path / "straight"
    cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(straight), "--steps", "6"])
    resumed = tmp_path / "resumed"
    cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(resumed), "--steps", "3"])
    assert (resumed / "checkpoints" / "checkpoint-3").is_dir()
    record = (resumed / "mla-dsa-training.json").read_text()
    # Another run's settings are refused, naming them, before anything is written (they were taken: the Trainer
    # kept the first run's learning rate, a LoRA resume of a full run died in torch's optimizer loading, and the
    # record then described the second run)
    for changed, named in (
        (["--seq-len", "128"], "--seq-len 64"),
        (["--lr", "0.01"], "--lr 0.001"),
        (["--lora", "4"], "full weights"),
        (["--index-topk", "4"], "--index-topk 16"),
        (["--data", *DATA[:2]], "--data of 6 file(s)"),
        (["--batch-size", "1"], "--batch-size 2"),
    ):
        assert cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(resumed), "--steps", "6", "--resume",
                    *changed]) == 1  # fmt: skip
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert named in line and "--resume continues it only with the same settings" in line, line
    assert (resumed / "mla-dsa-training.json").read_text() == record
    # A run launched under DeepSpeed continues under DeepSpeed only: its checkpoint keeps the optimizer state in
    # DeepSpeed's files, which a data-parallel resume silently went without (an AdamW run then trained on from zero)
    run = json.loads(record)
    under_deepspeed = {**run, "settings": {**run["settings"], "deepspeed": True}}
    (resumed / "mla-dsa-training.json").write_text(json.dumps(under_deepspeed))
    assert cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(resumed), "--steps", "6", "--resume"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds a run with DeepSpeed" in line and "(this command: no DeepSpeed)" in line, line
    (resumed / "mla-dsa-training.json").write_text(record)
    assert [path.name for path in (resumed / "checkpoints").iterdir()] == ["checkpoint-3"]
    cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(resumed), "--steps", "6", "--resume"])
    state = json.loads((resumed / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [path.name for path in (resumed / "checkpoints").iterdir()] == ["checkpoint-6"]  # the newest only
    a, b = weights(straight), weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("lora", [[], ["--lora", "4"]], ids=["full", "lora"])
def test_resumed_sparse_stage_equals_an_uninterrupted_run(dsa_checkpoint, tmp_path, lora):
    """The sparse stage trains the routed experts too: their checkpoint names (per expert) differ from the fused
    parameters, and a resume through Trainer's own reload kept them at their starting weights while restoring their
    optimizer state (step 4's loss and every expert differed). Weights and every logged loss equal the
    uninterrupted run's."""
    common = ["--stage", "sparse", "--data", *DATA, "--seq-len", "64", "--batch-size", "2", "--no-progress",
              "--save-steps", "3", "--logging-steps", "1", *lora]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(straight), "--steps", "6"])
    cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(resumed), "--steps", "3"])
    cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(resumed), "--steps", "6", "--resume"])
    a, b = weights(straight), weights(resumed)
    assert any(".mlp.experts." in name for name in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)

    def losses(out: Path) -> list[float]:
        state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    assert len(losses(straight)) == 6 and losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


def test_train_indexer_never_writes_over_its_input_or_a_full_out(dsa_checkpoint, tmp_path, capsys):
    """As convert treats DST: OUT may not be the input checkpoint (which it used to overwrite in place), and a
    non-empty OUT is continued with --resume or replaced with --overwrite, never silently written over, nor replaced
    while the training data lies inside it (--overwrite had deleted it, then failed to read it)."""
    import shutil

    own = tmp_path / "own"
    shutil.copytree(dsa_checkpoint, own)
    before = weights(own)
    common = ["--stage", "dense", "--data", *DATA, "--seq-len", "64", "--batch-size", "2", "--no-progress",
              "--steps", "2"]  # fmt: skip
    for flags in ([], ["--overwrite"]):
        assert cli(["train-indexer", str(own), *common, "--out", str(own), *flags]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "input checkpoint" in line
    assert all(torch.equal(before[name], tensor) for name, tensor in weights(own).items())
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert cli(["train-indexer", str(own), *common, "--out", str(full)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (full / "notes.txt").exists()
    data_inside = full / "corpus.txt"
    data_inside.write_text(Path(DATA[0]).read_text())
    inside = ["--stage", "dense", "--data", str(data_inside), *common[4:]]
    assert cli(["train-indexer", str(own), *inside, "--out", str(full), "--overwrite"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "inside OUT" in line and data_inside.exists() and (full / "notes.txt").exists()  # nothing deleted
    assert cli(["train-indexer", str(own), *common, "--out", str(full), "--overwrite"]) == 0
    assert not (full / "notes.txt").exists() and (full / "model.safetensors").exists()


def test_eval_prints_json(dsa_checkpoint, capsys):
    assert cli(["eval", str(dsa_checkpoint), "--data", *DATA, "--seq-len", "64", "--windows", "4",
                "--index-topk", "8"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["index_topk"] == 8 and result["seq_len"] == 64
    assert result["loss_ratio"] == pytest.approx(result["sparse_loss"] / result["dense_loss"])
    assert 0.0 < result["recall"] <= 1.0 and result["kl"] > 0.0
    assert result["sparse_loss"] != result["dense_loss"]


def test_eval_averages_over_tokens_whatever_the_batch_size(dsa_checkpoint):
    """Six windows in batches of 4 (a short last batch), 1 and 6 give the same figures, and the losses are the mean
    over every scored token: a single forward over all six windows. Each batch's mean used to count alike, so a
    short last batch's windows weighed more (a probe's 6 windows at the default --batch-size 4: dense loss 1.313
    against the token mean 1.331)."""
    from mla_dsa.data import byte_tokenizer, fixed_windows, text_files_corpus
    from mla_dsa.training import evaluate_indexer

    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(dsa_checkpoint).eval()
    windows = fixed_windows(text_files_corpus(DATA, byte_tokenizer()), 6, 48)
    results = [evaluate_indexer(model, windows, index_topk=8, batch_size=size) for size in (4, 1, 6)]
    with torch.no_grad():
        dense = model(windows, labels=windows, use_sparse_attention=False, use_cache=False).loss.item()
        sparse = model(windows, labels=windows, index_topk=8, use_cache=False).loss.item()
    assert results[0]["dense_loss"] == pytest.approx(dense, rel=1e-5)
    assert results[0]["sparse_loss"] == pytest.approx(sparse, rel=1e-5)
    for other in results[1:]:
        for name in ("dense_loss", "sparse_loss", "kl", "kl_uniform", "recall", "loss_ratio", "captured_kl"):
            assert other[name] == pytest.approx(results[0][name], rel=1e-5, abs=2e-6), name


def test_the_training_text_is_each_file_tokenized_on_its_own_then_eos(monkeypatch):
    """Files are tokenized a group per call: the ids are those of one call per file, each file followed by EOS, and
    `max_tokens` cuts across a group's boundary."""
    from mla_dsa import data
    from mla_dsa.data import byte_tokenizer, text_files_corpus

    tokenizer = byte_tokenizer()
    monkeypatch.setattr(data, "_FILES_PER_CALL", 2)
    per_file = [tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"] for path in DATA[:5]]
    expected = torch.tensor([token for ids in per_file for token in [*ids, tokenizer.eos_token_id]])
    assert torch.equal(text_files_corpus(DATA[:5], tokenizer), expected)
    across_a_group = len(per_file[0]) + len(per_file[1]) + 7
    assert torch.equal(text_files_corpus(DATA[:5], tokenizer, max_tokens=across_a_group), expected[:across_a_group])


def test_eval_against_the_source_reports_captured_kl(tmp_path, capsys):
    """--source: loss_ratio is over the source's dense loss, computed by transformers' model; kl_uniform is the KL
    of a uniform choice over the causal keys to the dense head-summed attention (computed here from the source's own
    attention probabilities), and captured_kl = 1 - kl / kl_uniform."""
    from transformers import DeepseekV3ForCausalLM

    from mla_dsa.data import byte_tokenizer, fixed_windows, text_files_corpus

    dense, dsa = tmp_path / "dense", save_byte_level_dsa(tmp_path / "dense", tmp_path / "dsa", 8)
    assert cli(["eval", str(dsa), "--source", str(dense), "--data", *DATA, "--seq-len", "32", "--windows", "4",
                "--batch-size", "2"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    windows = fixed_windows(text_files_corpus(DATA, byte_tokenizer()), 4, 32)
    peer = DeepseekV3ForCausalLM.from_pretrained(dense, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        halves = [peer(half, labels=half, output_attentions=True) for half in windows.split(2)]
    assert result["source_dense_loss"] == pytest.approx(sum(h.loss.item() for h in halves) / 2, abs=1e-5)
    assert result["loss_ratio"] == pytest.approx(result["sparse_loss"] / result["source_dense_loss"])
    uniform = []
    for half in halves:
        for probs in half.attentions:  # [B, H, L, L]
            p = probs.mean(1)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
            uniform.append((torch.arange(1, 33).log() - entropy).mean())
    assert result["kl_uniform"] == pytest.approx(torch.stack(uniform).mean().item(), rel=1e-4)
    assert result["captured_kl"] == pytest.approx(1 - result["kl"] / result["kl_uniform"])
    assert result["kl_uniform"] > 0


def test_eval_against_a_dsa_source_reports_its_dense_loss(tmp_path, capsys):
    """--source naming a DSA checkpoint (the one a fine-tune started from): source_dense_loss is its dense loss, which
    equals the dense loss of the same weights evaluated as the checkpoint (it was its sparse loss: loss_ratio 1.0)."""
    dsa = save_byte_level_dsa(tmp_path / "dense", tmp_path / "dsa", 8)
    args = ["eval", str(dsa), "--data", *DATA, "--seq-len", "32", "--windows", "4", "--batch-size", "2"]
    assert cli([*args, "--source", str(dsa)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source_dense_loss"] == pytest.approx(result["dense_loss"], rel=1e-6)
    assert abs(result["sparse_loss"] - result["dense_loss"]) > 1e-5  # the top-k mattered (more than rel=1e-6)
    assert result["loss_ratio"] == pytest.approx(result["sparse_loss"] / result["dense_loss"])


def test_eval_refuses_a_source_the_checkpoint_cannot_come_from(dsa_checkpoint, tmp_path, capsys):
    """A GPT-2 of the same vocabulary size used to be accepted, with a loss_ratio against it; conversion keeps the
    width, the depth and the tokenizer, so a source differing in any of them is refused in one line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mla_dsa.data import byte_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    assert cli(["eval", str(dsa_checkpoint), "--source", str(gpt2), "--data", *DATA, "--seq-len", "32",
                "--windows", "2"]) == 1  # fmt: skip
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(gpt2) in line and "not the model the checkpoint was made from" in line


def test_bad_data_file_is_one_line(dsa_checkpoint, capsys):
    assert cli(["eval", str(dsa_checkpoint), "--data", "/nonexistent.txt"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "/nonexistent.txt" in err


def test_a_checkpoint_without_its_tokenizer_is_one_line(dsa_checkpoint, tmp_path, capsys):
    """eval and train-indexer read the text with the checkpoint's tokenizer: without its files, one line naming the
    directory and what is missing (it was transformers' traceback about sentencepiece)."""
    import shutil

    bare = tmp_path / "no-tokenizer"
    shutil.copytree(dsa_checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    commands = (["eval", str(bare), "--data", *DATA, "--seq-len", "64", "--windows", "2"],
                ["train-indexer", str(bare), "--stage", "dense", "--data", *DATA, "--seq-len", "64", "--steps", "1",
                 "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    for command in commands:
        assert cli(command) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert str(bare) in line and "tokenizer" in line and "Traceback" not in line, line
    assert not (tmp_path / "out").exists()


def test_a_quantized_checkpoint_trains_adapters_only_and_says_so_first(dsa_checkpoint, tmp_path, capsys):
    """A checkpoint saved with torchao int8 weights: a full or merged run trained and then failed to save (transformers
    cannot write quantized weights it loaded), leaving OUT half-written, or stopped in a Trainer traceback. It is now
    one line before anything loads; --lora R --lora-save adapter trains and saves the adapter."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    from mla_dsa.data import byte_tokenizer

    quantized = tmp_path / "int8"
    int8 = TorchAoConfig(Int8WeightOnlyConfig())
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(dsa_checkpoint, dtype=torch.float32, quantization_config=int8)
    model.save_pretrained(quantized)
    byte_tokenizer().save_pretrained(quantized)
    common = ["--data", *DATA, "--seq-len", "64", "--steps", "1", "--batch-size", "2", "--no-progress"]
    for stage, lora in (("dense", []), ("sparse", ["--lora", "4"])):  # the second would save merged weights
        assert (
            cli(["train-indexer", str(quantized), "--stage", stage, *lora, *common, "--out", str(tmp_path / "o")]) == 1
        )
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "torchao-quantized" in line and "--lora-save adapter" in line, line
        assert not (tmp_path / "o").exists()
    out = tmp_path / "adapter"
    assert cli(["train-indexer", str(quantized), "--stage", "dense", "--lora", "4", "--lora-save", "adapter",
                *common, "--out", str(out)]) == 0  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


def _one_process_and_launched(checkpoint: Path, tmp_path: Path, launch_with: str | list[str], port: int,
                              stage: str = "dense", extra: tuple[str, ...] = ()):  # fmt: skip
    """The same run of `stage` as 1 process x batch 4 and under `accelerate launch` (2 processes x batch 2) with
    `launch_with` (an examples/ config file's name, or accelerate's arguments): the two OUT directories and the
    launch's CompletedProcess. SGD: updates are linear in the gradient, so the two compare at float precision."""
    lr = "1.0" if stage == "dense" else "0.05"  # the sparse stage trains the whole model, on the LM loss too
    common = ["--stage", stage, "--data", *DATA, "--seq-len", "64", "--steps", "3", "--no-progress",
              "--optim", "sgd", "--lr", lr, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "mla_dsa", "train-indexer", str(checkpoint), *common,
                    "--batch-size", "4", "--out", str(one)], check=True, env=env, capture_output=True)  # fmt: skip
    if isinstance(launch_with, str):
        launch_with = ["--config_file", str(REPO / "examples" / launch_with)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *launch_with, "--main_process_port", str(port)]
    command = [*launch, "-m", "mla_dsa", "train-indexer", str(checkpoint), *common, "--batch-size", "2",
               "--out", str(two)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return one, two, result


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_two_process_data_parallel_equals_one_process(dsa_checkpoint, tmp_path, stage):
    """`accelerate launch` with 2 processes x batch 2 == 1 process x batch 4."""
    port = 29517 if stage == "dense" else 29521
    one, two, _ = _one_process_and_launched(dsa_checkpoint, tmp_path, "accelerate_ddp.yaml", port, stage)
    start, a, b = weights(dsa_checkpoint), weights(one), weights(two)
    moved = max((a[n] - start[n]).abs().max().item() for n in a)
    assert moved > 1e-4  # the run trained something
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert_logged_alike(one, two)


def assert_logged_alike(one: Path, two: Path) -> None:
    """The indexer's KL and recall that a run logs are its batches' means over every process (they had been the main
    process's own), so 2 processes x batch 2 log what 1 process x batch 4 does."""

    def logged(out: Path) -> dict[str, float]:
        history = json.loads((out / "mla-dsa-training.json").read_text())["log_history"]
        return {name: entry[name] for entry in history for name in ("indexer_kl", "recall") if name in entry}

    assert "indexer_kl" in logged(one) and logged(two) == pytest.approx(logged(one), rel=1e-5)


@pytest.mark.slow
def test_fsdp_config_on_cpu_says_it_runs_data_parallel(dsa_checkpoint, tmp_path):
    """`accelerate launch` with examples/accelerate_fsdp.yaml on this CPU-only machine: accelerate turns FSDP on only
    for GPU-type devices and silently runs DDP instead. The run says so (one warning, and `sharded: false` in OUT's
    run file) and trains exactly as one process does."""
    one, two, result = _one_process_and_launched(dsa_checkpoint, tmp_path, "accelerate_fsdp.yaml", 29519)
    assert result.stderr.count("accelerate shards only on GPUs") == 1, result.stderr[-3000:]
    run = json.loads((two / "mla-dsa-training.json").read_text())
    assert run["processes"] == 2 and run["sharded"] is False
    a, b = weights(one), weights(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert json.loads((one / "mla-dsa-training.json").read_text())["processes"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("partitioned", [False, True], ids=["example-config", "every-weight-partitioned"])
def test_deepspeed_zero3_training_equals_one_process(dsa_checkpoint, tmp_path, partitioned):
    """DeepSpeed ZeRO-3 (2 processes x batch 2, over gloo) trains as 1 process x batch 4 does, and saves the whole
    trained model: the dense warm-up with examples/accelerate_deepspeed.yaml as it is, and the sparse stage with LoRA
    on every weight ZeRO-3 partitions (none kept whole for being small, none kept gathered between uses: on a tiny
    model ZeRO-3's defaults keep every weight gathered, as a large model's cannot be). Three faults, each alone
    stopping that run: the LM loss's checkpointed blocks kept the frozen head by reference, and ZeRO-3 had emptied
    it again before backward read it; ZeRO-3 refused the second step ("tracing error"): LoRA on the routed experts
    fetched their weights in a changing order, until each MoE block became a ZeRO-3 leaf; and the main process saved
    its empty shards (the weights are gathered now). The optimizer is offloaded to the CPU there too: accelerate had
    swapped --optim sgd for DeepSpeed's CPU Adam without a word."""
    pytest.importorskip("deepspeed")
    example = yaml.safe_load((REPO / "examples" / "accelerate_deepspeed.yaml").read_text())
    if partitioned:
        kept_gathered = ("stage3_param_persistence_threshold", "stage3_max_live_parameters",
                         "stage3_max_reuse_distance", "stage3_prefetch_bucket_size")  # fmt: skip
        zero3 = {"stage": example["deepspeed_config"]["zero_stage"], **dict.fromkeys(kept_gathered, 0),
                 "offload_optimizer": {"device": "cpu"}}  # fmt: skip
        config = {"zero_optimization": zero3, "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}  # fmt: skip
        (tmp_path / "zero3.json").write_text(json.dumps(config))
        launch_with = ["--use_deepspeed", "--deepspeed_config_file", str(tmp_path / "zero3.json"),
                       "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]  # fmt: skip
        stage, extra, port = "sparse", ("--lora", "4"), 29523
    else:
        launch_with, stage, extra, port = "accelerate_deepspeed.yaml", "dense", (), 29525
    one, two, _ = _one_process_and_launched(dsa_checkpoint, tmp_path, launch_with, port, stage, extra)
    assert json.loads((two / "mla-dsa-training.json").read_text())["sharded"] is True
    assert_logged_alike(one, two)
    start, a, b = weights(dsa_checkpoint), weights(one), weights(two)
    assert a.keys() == b.keys()
    moved = max((a[n] - start[n]).abs().max().item() for n in a)
    assert moved > 1e-4  # the run trained something
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_deepspeed_bf16_saves_the_trained_float32_weights_not_its_bf16_copies(dsa_checkpoint, tmp_path):
    """With --bf16 DeepSpeed trains bf16 copies of the weights and keeps float32 masters in its optimizer. The copies
    had been saved: an update below bf16's step at a weight's size (a sparse-stage step on a norm weight near 1) was
    lost whole. What is saved is the masters: in every trained tensor some value lies between bf16's."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "examples" / "accelerate_deepspeed.yaml"), "--main_process_port", "29527",
               "-m", "mla_dsa", "train-indexer", str(dsa_checkpoint), "--stage", "sparse", "--data", *DATA,
               "--seq-len", "64", "--steps", "2", "--batch-size", "2", "--bf16", "--no-progress",
               "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    start, saved = weights(dsa_checkpoint), weights(out)
    trained = [name for name in saved if not torch.equal(saved[name], start[name])]
    assert len(trained) > len(saved) // 2  # the sparse stage trains every weight (the routers' biases are buffers)
    for name in trained:
        assert not torch.equal(saved[name], saved[name].bfloat16().float()), f"{name} holds bf16 values only"


@pytest.mark.compat
@pytest.mark.slow  # trains, saves and reloads three times: ~6 s
def test_lora_adapters_train_save_load_and_merge(dsa_checkpoint, tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from finetune_lora import finetune
    finally:
        sys.path.pop(0)
    from peft import PeftModel

    out = finetune(str(dsa_checkpoint), DATA, str(tmp_path / "lora"), steps=4, seq_len=64, batch_size=2,
                   targets=("attention", "mlp", "indexer"), progress=False)  # fmt: skip
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("indexer.wq_b.lora_A" in name for name in adapter)
    assert any("kv_b_proj.lora_B" in name for name in adapter)
    # the routed experts' fused parameters, through PEFT's target_parameters
    assert any(".mlp.experts." in name and "lora_A" in name for name in adapter)
    assert any("k_norm" in name for name in adapter)  # modules_to_save
    assert any(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # it trained

    base = mla_dsa.MlaDsaForCausalLM.from_pretrained(dsa_checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = mla_dsa.MlaDsaForCausalLM.from_pretrained(out / "merged").eval()
    input_ids = torch.randint(3, 256, (2, 40))
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        for mode in ("mha", "absorbed"):  # absorbed mode reads kv_b_proj's effective (LoRA) weight
            peft_model.base_model.model.config.attention_mode = mode
            torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-4, rtol=0)
    unmerged = mla_dsa.MlaDsaForCausalLM.from_pretrained(dsa_checkpoint).eval()
    with torch.no_grad():
        assert (unmerged(input_ids).logits - expected).abs().max() > 1e-4

    code = (
        "import torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'merged')!r}, trust_remote_code=True); "
        "print(type(m).__name__, m(torch.tensor([[5, 6, 7]])).logits.shape[-1])"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MlaDsaForCausalLM 256" in result.stdout


SPARSE_RUN = ["--stage", "sparse", "--data", *DATA, "--steps", "3", "--seq-len", "64", "--batch-size", "2",
              "--lr", "1e-3", "--no-progress"]  # fmt: skip


def test_sparse_stage_through_lora_saves_merged_or_as_an_adapter(dsa_checkpoint, tmp_path, capsys, monkeypatch):
    """`--lora R`: the same run saved merged (a plain checkpoint) and as an adapter gives the same model; eval reads
    either, from any directory (the adapter records its base checkpoint's absolute path, though typed relative);
    the adapter cannot be trained from (its weights are not a checkpoint's)."""
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert cli(["train-indexer", str(dsa_checkpoint), *SPARSE_RUN, "--lora", "4", "--out", str(merged)]) == 0
    monkeypatch.chdir(dsa_checkpoint.parent)
    assert cli(["train-indexer", dsa_checkpoint.name, *SPARSE_RUN, "--lora", "4", "--lora-save", "adapter",
                "--out", str(adapter)]) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert not (merged / "adapter_config.json").exists() and (merged / "config.json").exists()
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    before, after = weights(dsa_checkpoint), weights(merged)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("kv_b_proj" in name for name in changed) and any(".indexer.wq_b" in name for name in changed)
    assert any(".mlp.experts." in name for name in changed)  # fused experts, through PEFT's target_parameters
    input_ids = torch.randint(3, 256, (2, 48))
    with torch.no_grad():
        from_adapter = load_trained(adapter).eval()(input_ids).logits
        from_merged = mla_dsa.MlaDsaForCausalLM.from_pretrained(merged).eval()(input_ids).logits
    torch.testing.assert_close(from_adapter, from_merged, atol=1e-5, rtol=0)

    capsys.readouterr()  # the training runs' output
    results = []
    for trained in (merged, adapter):
        assert cli(["eval", str(trained), "--data", *DATA, "--seq-len", "64", "--windows", "2"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["sparse_loss"] == pytest.approx(results[1]["sparse_loss"], abs=1e-5)
    assert cli(["train-indexer", str(adapter), *SPARSE_RUN, "--out", str(tmp_path / "again")]) == 1
    assert "is a LoRA adapter" in capsys.readouterr().err


def test_dense_control_trains_the_model_with_dense_attention(tmp_path):
    """`--dense-control`: the main weights learn under dense attention, so two checkpoints that differ only in their
    indexers train to the same weights (and the indexers are left alone); the sparse stage, at k < L, does not."""
    dense = tmp_path / "dense"
    first = save_byte_level_dsa(dense, tmp_path / "seed0", 16)
    second = mla_dsa.convert_checkpoint(dense, tmp_path / "seed1", index_topk=16, seed=1, progress=False)
    trained = {}
    for run, extra in (("control", ["--dense-control"]), ("sparse", [])):
        for name, checkpoint in (("seed0", first), ("seed1", second)):
            out = tmp_path / f"{run}-{name}"
            assert cli(["train-indexer", str(checkpoint), *SPARSE_RUN, *extra, "--out", str(out)]) == 0
            trained[run, name] = weights(out)
    main_weights = [name for name in trained["control", "seed0"] if ".indexer." not in name]
    assert all(torch.equal(trained["control", "seed0"][n], trained["control", "seed1"][n]) for n in main_weights)
    assert not all(torch.equal(trained["sparse", "seed0"][n], trained["sparse", "seed1"][n]) for n in main_weights)
    start, control = weights(first), trained["control", "seed0"]
    assert all(torch.equal(control[name], start[name]) for name in control if ".indexer." in name)
    assert not any(torch.equal(control[name], start[name]) for name in control if "kv_b_proj" in name)
    with pytest.raises(ValueError, match="sparse stage's control"):
        mla_dsa.train_indexer(first, "dense", DATA, tmp_path / "x", steps=1, dense_control=True, progress=False)


def test_accelerates_mixed_precision_is_the_runs(dsa_checkpoint, tmp_path, capsys, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (ACCELERATE_MIXED_PRECISION) is --bf16: the Trainer read it while
    train-indexer's arguments said float32 (under DeepSpeed transformers then stopped the first step on the
    mismatch). fp16, which train-indexer has no mode for, is refused in one line before anything is written."""
    common = ["--stage", "dense", "--data", *DATA, "--seq-len", "64", "--batch-size", "2", "--steps", "1",
              "--no-progress"]  # fmt: skip
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert cli(["train-indexer", str(dsa_checkpoint), *common, "--out", str(tmp_path / "fp16")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--mixed_precision fp16" in line and "--bf16" in line, line
    assert not (tmp_path / "fp16").exists()
    for launched, flags, expected in (("bf16", [], True), ("no", [], False), ("no", ["--bf16"], True)):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
        out = tmp_path / f"{launched}{len(flags)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on a CPU without bf16 instructions warns that it is slow
            assert cli(["train-indexer", str(dsa_checkpoint), *common, *flags, "--out", str(out)]) == 0
        assert json.loads((out / "mla-dsa-training.json").read_text())["bf16"] is expected


def test_resume_without_a_checkpoint_is_refused_where_it_would_start_over(dsa_checkpoint, tmp_path, capsys):
    """--resume where OUT holds a run but no Trainer checkpoint (no --save-steps) retrained from step 0 in silence, a
    finished run too; a new OUT still starts with --resume (a job script may always pass it)."""
    run = ["train-indexer", str(dsa_checkpoint), "--stage", "dense", "--data", *DATA, "--steps", "1", "--seq-len",
           "32", "--batch-size", "1", "--no-progress", "--resume"]  # fmt: skip
    assert cli([*run, "--out", str(tmp_path / "out")]) == 0  # a new OUT: the run starts
    written = weights(tmp_path / "out")
    assert cli([*run, "--out", str(tmp_path / "out")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds no Trainer checkpoint" in line and "--overwrite" in line, line
    after = weights(tmp_path / "out")
    assert all(torch.equal(written[name], after[name]) for name in written)


def test_a_run_of_one_step_trains(dsa_checkpoint, tmp_path):
    """Runs under 20 steps have no warm-up: its first step (a learning rate of 0) made `--steps 1` write its input."""
    out = tmp_path / "one"
    assert cli(["train-indexer", str(dsa_checkpoint), "--stage", "dense", "--data", *DATA, "--out", str(out),
                "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--no-progress"]) == 0  # fmt: skip
    before, after = weights(dsa_checkpoint), weights(out)
    assert any(not torch.equal(before[name], after[name]) for name in before if ".indexer." in name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
def test_the_output_keeps_the_checkpoints_dtype(dsa_checkpoint, tmp_path, dtype, lora):
    """A float16 or bfloat16 checkpoint trains in float32 and is written back in its dtype (it came back float32:
    twice the size, and `dtype="auto"` loaded float32), full or merged from LoRA. What transformers keeps float32
    when it loads that dtype stays float32 (the router; the indexer's head weights in float16)."""
    from mla_dsa.data import byte_tokenizer

    low = tmp_path / "low"
    mla_dsa.MlaDsaForCausalLM.from_pretrained(dsa_checkpoint, dtype=dtype).save_pretrained(low)
    byte_tokenizer().save_pretrained(low)
    out = tmp_path / "out"
    assert cli(["train-indexer", str(low), "--stage", "sparse" if lora else "dense", "--data", *DATA, "--out",
                str(out), "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--no-progress",
                *(["--lora", "2"] if lora else [])]) == 0  # fmt: skip
    stored, written = weights(low), weights(out)
    assert stored.keys() == written.keys()
    assert {name: t.dtype for name, t in written.items()} == {name: t.dtype for name, t in stored.items()}
    assert written["model.embed_tokens.weight"].dtype == dtype
    assert (written["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.float32) == (
        dtype == torch.float16
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    assert any(not torch.equal(stored[name], written[name]) for name in stored)  # trained
    loaded = mla_dsa.MlaDsaForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == dtype


def test_lr_scheduler_is_the_trainers(dsa_checkpoint, tmp_path):
    """`--lr-scheduler cosine`: the learning rate decays after the warm-up (the default stays constant)."""
    rates = {}
    for schedule in ("constant_with_warmup", "cosine"):
        out = tmp_path / schedule
        assert cli(["train-indexer", str(dsa_checkpoint), "--stage", "dense", "--data", *DATA, "--out", str(out),
                    "--steps", "6", "--seq-len", "32", "--batch-size", "1", "--logging-steps", "1",
                    "--lr-scheduler", schedule, "--no-progress"]) == 0  # fmt: skip
        assert not (out / "checkpoints").exists()  # none asked for (--save-steps): none kept
        state = json.loads((out / "mla-dsa-training.json").read_text())
        rates[schedule] = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates["constant_with_warmup"][1:] == [1e-3] * 5
    assert rates["cosine"][1] > rates["cosine"][3] > rates["cosine"][5]


@pytest.mark.slow  # two Trainer runs
def test_bf16_mixed_precision_keeps_float32_weights(dsa_checkpoint, tmp_path, capsys, monkeypatch):
    """`--bf16` (the Trainer's): the projections run in bfloat16 under autocast, the weights stay float32 and the
    LM loss (a dense-control fine-tune) stays the float32 run's within bf16 rounding. On a CPU whose PyTorch has no
    native bf16 product (AVX2: several times slower than float32) it says so."""
    from transformers import TrainerCallback

    from mla_dsa import training
    from mla_dsa.training import train_indexer

    monkeypatch.setattr(training, "cpu_has_bf16_matmul", lambda: False)  # as on an AVX2 CPU

    class RecordDtypes(TrainerCallback):
        def __init__(self):
            self.dtypes, self.losses = set(), []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            projection = next(m for name, m in model.named_modules() if name.endswith("kv_b_proj"))
            projection.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.losses += [logs["loss"]] if "loss" in (logs or {}) else []

    runs = {}
    for bf16 in (False, True):
        record = RecordDtypes()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = train_indexer(dsa_checkpoint, "sparse", DATA, tmp_path / str(bf16), steps=3, seq_len=32,
                                batch_size=1, logging_steps=1, progress=False, callbacks=[record], dense_control=True,
                                bf16=bf16)  # fmt: skip
        slow = [w for w in caught if "no bfloat16 matrix instructions" in str(w.message)]
        assert len(slow) == bf16, [str(w.message) for w in caught]  # the bf16 run only, once
        runs[bf16] = record
        assert {t.dtype for t in weights(out).values()} == {torch.float32}
    assert runs[False].dtypes == {torch.float32} and runs[True].dtypes == {torch.bfloat16}
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=0.05)
    assert runs[True].losses != runs[False].losses
    with pytest.raises(SystemExit):
        cli(["train-indexer", "--help"])
    assert "--bf16" in capsys.readouterr().out


@pytest.mark.parametrize("save_steps", [[], ["--save-steps", "1"]], ids=["no-checkpoints", "checkpoints"])
def test_an_interrupted_run_says_how_to_continue(dsa_checkpoint, tmp_path, capsys, monkeypatch, save_steps):
    """Ctrl-C in train-indexer: one line that says whether --resume can continue (and from where), or that no
    checkpoint was kept and how to keep one."""
    from mla_dsa.training import IndexerTrainer

    calls = []

    def interrupted_at_step_three(self, model, inputs, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, model, inputs, *args, **kwargs)

    original = IndexerTrainer.compute_loss
    monkeypatch.setattr(IndexerTrainer, "compute_loss", interrupted_at_step_three)
    out = tmp_path / "out"
    command = ["train-indexer", str(dsa_checkpoint), "--stage", "dense", "--data", *DATA, "--out", str(out),
               "--steps", "6", "--seq-len", "32", "--batch-size", "1", "--no-progress", *save_steps]  # fmt: skip
    assert cli(command) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("mla-dsa train-indexer: interrupted; ")
    if save_steps:
        assert f"--resume continues from {out / 'checkpoints'}" in line
    else:
        assert "no checkpoint was kept (--save-steps N" in line


@pytest.mark.slow  # two Trainer runs
def test_gradient_checkpointing_trains_as_without(dsa_checkpoint, tmp_path):
    """`--gradient-checkpointing` (the Trainer's activation checkpointing, for long --seq-len): the decoder layers
    are recomputed in backward, and the sparse stage's losses and weights (through LoRA) are those of the run
    without."""
    from transformers import TrainerCallback

    class RecordCheckpointing(TrainerCallback):
        def __init__(self):
            self.enabled, self.losses = None, []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            new_name = hasattr(model, "is_activation_checkpointing")  # transformers 5.25's name for it
            self.enabled = model.is_activation_checkpointing if new_name else model.is_gradient_checkpointing

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.losses += [logs["loss"]] if "loss" in (logs or {}) else []

    runs = {}
    for checkpointing in (False, True):
        record = RecordCheckpointing()
        out = mla_dsa.train_indexer(dsa_checkpoint, "sparse", DATA, tmp_path / str(checkpointing), steps=3, seq_len=32,
                                    batch_size=1, logging_steps=1, progress=False, callbacks=[record],
                                    lora_rank=4, gradient_checkpointing=checkpointing)  # fmt: skip
        runs[checkpointing] = (record, weights(out))
    assert runs[True][0].enabled and not runs[False][0].enabled
    assert len(runs[True][0].losses) == 3
    assert runs[True][0].losses == pytest.approx(runs[False][0].losses, rel=1e-5)
    for name, tensor in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two Trainer runs
def test_gradient_accumulation_trains_as_the_whole_batch_in_smaller_batches(dsa_checkpoint, tmp_path, monkeypatch):
    """`--gradient-accumulation-steps 2 --batch-size 2` (for long --seq-len, where 4 sequences at once do not fit)
    trains as `--batch-size 4`: the same windows, the same weights after each step (SGD: updates linear in the
    gradient), with the model never given more than 2 sequences at once. The sparse stage: the LM loss and the
    indexer's KL both averaged over the step's sequences, every weight trained."""
    common = ["train-indexer", str(dsa_checkpoint), "--stage", "sparse", "--data", *DATA, "--seq-len", "32",
              "--steps", "2", "--optim", "sgd", "--lr", "1.0", "--no-progress"]  # fmt: skip
    batch_sizes, compute_loss = [], mla_dsa.training.IndexerTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        batch_sizes.append(inputs["input_ids"].shape[0])
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(mla_dsa.training.IndexerTrainer, "compute_loss", recording)
    accumulated = ["--batch-size", "2", "--gradient-accumulation-steps", "2", "--out", str(tmp_path / "accumulated")]
    assert cli([*common, *accumulated]) == 0
    assert batch_sizes == [2, 2, 2, 2]  # 2 steps of 2 batches of 2
    assert cli([*common, "--batch-size", "4", "--out", str(tmp_path / "whole")]) == 0
    assert batch_sizes[4:] == [4, 4]
    start, whole, accumulated = weights(dsa_checkpoint), weights(tmp_path / "whole"), weights(tmp_path / "accumulated")
    assert max((whole[name] - start[name]).abs().max().item() for name in whole) > 1e-4  # it trained
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], atol=1e-5, rtol=1e-4)


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


# ----------------------------------------------------------------------------------------- the chunked LM loss
@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_the_chunked_lm_loss_is_transformers_loss_without_the_logits(head):
    """chunked_causal_lm_loss equals the model's own loss (transformers' ForCausalLMLoss: shifted labels, -100 ignored)
    and its gradients, while no tensor of [tokens, vocabulary] logits is ever made: the largest float tensor it builds
    is one block's. A frozen head (LoRA) takes the other checkpointing (reentrant: see the function), alike."""
    from torch.overrides import TorchFunctionMode

    from mla_dsa.training import chunked_causal_lm_loss

    class Largest(TorchFunctionMode):
        largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    self.largest = max(self.largest, tensor.numel())
            return out

    torch.manual_seed(0)
    config = mla_dsa.MlaDsaConfig(vocab_size=500, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=4, v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=5,
                                  first_k_dense_replace=2)  # fmt: skip
    model = mla_dsa.MlaDsaForCausalLM(config).train()
    model.lm_head.requires_grad_(head == "trained")
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :7] = -100
    expected = model(ids, labels=labels)
    expected.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(ids, logits_to_keep=1, output_hidden_states=True)
    recorder = Largest()
    with recorder:
        loss = chunked_causal_lm_loss(model.lm_head, out.hidden_states[-1], labels, block=8)
        loss.backward()
    torch.testing.assert_close(loss, expected.loss)
    assert grads and {name for name, p in model.named_parameters() if p.grad is not None} == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name)
    assert recorder.largest <= 2 * 8 * 500 < expected.logits.numel()  # one block of logits, never all of them


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_the_trainer_hands_back_a_model_without_the_loss_hooks(byte_dsa, tmp_path, stage):
    """IndexerTrainer installs IndexerLoss while it trains (the loss reaches the logs) and removes it after: the model
    it trained computes no indexer loss on later forwards."""
    from transformers import TrainingArguments

    from mla_dsa.training import IndexerTrainer, WindowDataset

    model = mla_dsa.prepare_indexer_training(mla_dsa.MlaDsaForCausalLM.from_pretrained(byte_dsa), stage)
    corpus = torch.randint(3, 250, (400,), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = IndexerTrainer(model=model, args=args, train_dataset=WindowDataset(corpus, 32, 2), stage=stage,
                             index_topk=4)  # fmt: skip
    assert not trainer.indexer_loss.installed
    trainer.train()
    assert any("indexer_kl" in entry for entry in trainer.state.log_history)
    assert not trainer.indexer_loss.installed
    trainer.indexer_loss.reset()
    with torch.no_grad():
        model(corpus[None, :32])
    assert trainer.indexer_loss.layers == []
