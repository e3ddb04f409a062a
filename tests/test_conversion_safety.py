"""`mla-dsa convert` safety: bad input fails cleanly, DST appears only when complete, a killed run resumes, SRC is
never changed.

Bad input of every kind exits non-zero with ONE stderr line naming the file and the problem (no traceback) and leaves
no DST; a non-empty DST is refused without --overwrite and kept intact when a conversion into it fails. A conversion
killed with SIGKILL in the middle of writing a shard leaves only the hidden sibling `.DST.mla-dsa-partial`; `--resume`
finishes it without rewriting finished shards, and the result is byte-identical to a clean run.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import mla_dsa
from mla_dsa import ConversionError, convert_checkpoint
from mla_dsa.cli import main
from mla_dsa.conversion import write as write_module
from mla_dsa.data import byte_tokenizer

from checkpoints import (
    INDEX_NAME,
    SCALE_SUFFIX,
    edit_config,
    file_bytes,
    make_fp8_checkpoint,
    read_checkpoint,
    read_shards,
    snapshot,
    synthetic_v3_config,
    weight_map,
    write_shards,
    write_synthetic_checkpoint,
)
from peers import build_peer, save_peer
from subprocesses import own_stderr

STATE_NAME = ".mla-dsa-convert-state.json"


def partial_of(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.mla-dsa-partial"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(err: str, path: Path, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err and line.startswith("mla-dsa convert: error: "), line
    assert str(path) in line, (str(path), line)
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture(autouse=True)
def _module_sources_untouched(request):
    """The module-scoped sources a test uses are byte-for-byte the same after it."""
    names = [name for name in ("sharded_v3", "fp8_sharded", "small_src", "many_shards") if name in request.fixturenames]
    sources = [request.getfixturevalue(name) for name in names]
    before = [snapshot(src) for src in sources]
    yield
    assert [snapshot(src) for src in sources] == before, "a module source was modified"


# -------------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def sharded_v3(tmp_path_factory):
    """A tiny DeepSeek-V3 peer in five shards (save_pretrained's own sharding)."""
    src = tmp_path_factory.mktemp("sharded") / "src"
    build_peer("deepseek_v3").save_pretrained(src, max_shard_size="200KB")
    assert len(set(weight_map(src).values())) >= 4
    return src


@pytest.fixture(scope="module")
def fp8_sharded(tmp_path_factory):
    """A bf16 peer (hidden 256) in several shards, block-quantized to FP8."""
    root = tmp_path_factory.mktemp("fp8")
    build_peer("deepseek_v3", hidden_size=256, kv_lora_rank=128).to(torch.bfloat16).save_pretrained(
        root / "bf16", max_shard_size="300KB"
    )
    make_fp8_checkpoint(root / "bf16", root / "src")
    assert len(set(weight_map(root / "src").values())) >= 3
    return root / "src"


def _gpt2(root: Path, sharded_v3: Path):
    """Neither MLA nor a GQA family the converter reads (llama/mistral/qwen2 are: tests/test_gqa_conversion.py)."""
    src = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(src)
    return src, root / "dst", src / "config.json", ("gpt2", "not a Multi-head Latent Attention model", "llama")


def _copy(root: Path, sharded_v3: Path) -> Path:
    src = root / "src"
    shutil.copytree(sharded_v3, src)
    return src


def _shard(src: Path, position: int) -> Path:
    return src / sorted(set(weight_map(src).values()))[position]


def _missing_shard(root, sharded_v3):
    src = _copy(root, sharded_v3)
    shard = _shard(src, 2)
    shard.unlink()
    return src, root / "dst", shard, ("missing",)


def _truncated_shard(root, sharded_v3):
    src = _copy(root, sharded_v3)
    shard = _shard(src, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])  # the header survives, the data is cut short
    return src, root / "dst", shard, ("truncated",)


def _truncated_header(root, sharded_v3):
    src = _copy(root, sharded_v3)
    shard = _shard(src, 1)
    shard.write_bytes(shard.read_bytes()[:50])
    return src, root / "dst", shard, ("truncated",)


def _shape_mismatch(root, sharded_v3):
    src = _copy(root, sharded_v3)
    edit_config(src, intermediate_size=80)  # layer 0 is a dense MLP of intermediate_size 96
    shard = src / weight_map(src)["model.layers.0.mlp.down_proj.weight"]
    return src, root / "dst", shard, ("model.layers.0.mlp.", "shape", "96")


def _fp8_without_scale(root, fp8_src):
    src = root / "src"
    shutil.copytree(fp8_src, src)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    shard_name = weight_map(src)[name]
    shards = read_shards(src)
    assert shards[shard_name][name].dtype == torch.float8_e4m3fn
    del shards[shard_name][name + SCALE_SUFFIX]
    write_shards(src, shards)  # the shard and the index json, without the scale
    assert name + SCALE_SUFFIX not in weight_map(src)
    return src, root / "dst", src / shard_name, (name, "_scale_inv")


def _dst_inside_src(root, sharded_v3):
    src = _copy(root, sharded_v3)
    return src, src / "converted", src / "converted", ("inside",)


def _src_inside_dst(root, sharded_v3):
    src = _copy(root, sharded_v3)
    return src, root, root, ("inside",)


def _non_empty_dst(root, sharded_v3):
    src = _copy(root, sharded_v3)
    dst = root / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    return src, dst, dst, ("not empty", "--overwrite")


def _index_entry(root, sharded_v3, entry: str):
    """The index json sends one shard's tensors to `entry`; a readable copy of that shard lies there."""
    src = _copy(root, sharded_v3)
    index = json.loads((src / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    target = (src / entry).resolve() if not os.path.isabs(entry) else Path(entry)
    shutil.copyfile(src / shard, target)
    (src / shard).unlink()
    index["weight_map"] = {name: (entry if where == shard else where) for name, where in index["weight_map"].items()}
    (src / INDEX_NAME).write_text(json.dumps(index))
    return src, root / "dst", src / INDEX_NAME, (repr(entry), "not a plain file name")


def _path_traversal(root, sharded_v3):
    return _index_entry(root, sharded_v3, "../x.safetensors")


def _absolute_shard_path(root, sharded_v3):
    return _index_entry(root, sharded_v3, str(root / "elsewhere" / "x.safetensors"))


def _symlinked_shard(root, sharded_v3):
    src = _copy(root, sharded_v3)
    shard = _shard(src, 1)
    outside = root / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    return src, root / "dst", shard, ("symbolic link",)


def _linked_into_blobs(root: Path, src: Path, name: str) -> Path:
    """Moves SRC/name into a blob store and links it back, as a Hugging Face cache snapshot holds every file."""
    blobs = root / "blobs"
    blobs.mkdir(exist_ok=True)
    shutil.move(src / name, blobs / name)
    (src / name).symlink_to(blobs / name)
    return src / name


def _symlinked_single_file(root, sharded_v3):
    src = root / "src"
    save_peer("deepseek_v3", src)
    return src, root / "dst", _linked_into_blobs(root, src, "model.safetensors"), ("symbolic link", "--follow")


def _symlinked_tokenizer(root, sharded_v3):
    """A linked tokenizer file is refused like a linked shard: never silently left out of DST."""
    src = root / "src"
    save_peer("deepseek_v3", src)
    byte_tokenizer().save_pretrained(src)
    return src, root / "dst", _linked_into_blobs(root, src, "tokenizer.json"), ("symbolic link", "--follow")


def _missing_config(root, sharded_v3):
    src = _copy(root, sharded_v3)
    (src / "config.json").unlink()
    return src, root / "dst", src / "config.json", ("missing",)


def _not_safetensors(root, sharded_v3):
    src = root / "src"
    src.mkdir()
    shutil.copyfile(sharded_v3 / "config.json", src / "config.json")
    torch.save({"x": torch.zeros(2)}, src / "pytorch_model.bin")
    return src, root / "dst", src, ("safetensors",)


def _lora_adapter(root, sharded_v3):
    """A PEFT adapter directory (train-indexer --lora-save adapter) was reported as "config.json: missing"."""
    src = root / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    save_file({"lora_A": torch.zeros(2, 2)}, str(src / "adapter_model.safetensors"))
    return src, root / "dst", src, ("LoRA adapter",)


BAD_INPUTS = {
    "gpt2": _gpt2,
    "lora_adapter": _lora_adapter,
    "missing_shard": _missing_shard,
    "truncated_shard": _truncated_shard,
    "truncated_header": _truncated_header,
    "shape_mismatch": _shape_mismatch,
    "fp8_without_scale": _fp8_without_scale,
    "dst_inside_src": _dst_inside_src,
    "src_inside_dst": _src_inside_dst,
    "non_empty_dst": _non_empty_dst,
    "path_traversal": _path_traversal,
    "absolute_shard_path": _absolute_shard_path,
    "symlinked_shard": _symlinked_shard,
    "symlinked_single_file": _symlinked_single_file,
    "symlinked_tokenizer": _symlinked_tokenizer,
    "missing_config": _missing_config,
    "not_safetensors": _not_safetensors,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_leaves_nothing(case, tmp_path, sharded_v3, fp8_sharded, capsys):
    (tmp_path / "elsewhere").mkdir()
    source = fp8_sharded if case == "fp8_without_scale" else sharded_v3
    src, dst, named, words = BAD_INPUTS[case](tmp_path, source)
    dst_existed = dst.exists()
    before = snapshot(tmp_path)
    rc, out, err = run_cli(capsys, src, dst)
    assert rc != 0
    assert_one_line_error(err, named, *words)
    assert "wrote" not in out
    assert snapshot(tmp_path) == before, "SRC, DST or their folder changed"  # nothing written, nothing left
    assert dst.exists() == dst_existed
    with pytest.raises(ConversionError) as error:  # the API raises the same error
        convert_checkpoint(src, dst, progress=False)
    assert error.value.path == str(named) and str(error.value) in err
    assert snapshot(tmp_path) == before


def test_fp8_scale_of_the_wrong_shape_fails_cleanly(tmp_path, fp8_sharded, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(fp8_sharded, src)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" + SCALE_SUFFIX
    shards = read_shards(src)
    shards[weight_map(src)[name]][name] = torch.ones(1, 2)  # [136, 256] needs [2, 2] blocks
    write_shards(src, shards)
    before = snapshot(src)
    rc, _, err = run_cli(capsys, src, dst)
    assert rc != 0
    assert_one_line_error(err, src / weight_map(src)[name], "scale shape")
    assert not dst.exists()
    assert snapshot(src) == before


@pytest.mark.slow  # a subprocess: over 6 s on 2 cores
def test_cli_process_bad_input_prints_exactly_one_line(tmp_path, sharded_v3):
    """The installed entry point, in its own process: exit status 1 and one stderr line, nothing else."""
    src, dst, named, words = _gpt2(tmp_path, sharded_v3)
    before = snapshot(src)
    result = subprocess.run(
        [sys.executable, "-m", "mla_dsa", "convert", str(src), str(dst)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_line_error(own_stderr(result.stderr), named, *words)  # less other packages' import-time logs
    assert not dst.exists() and not partial_of(dst).exists()
    assert snapshot(src) == before


# ----------------------------------------------------------------------------------- overwrite and atomic replace
@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("small") / "src"
    save_peer("deepseek_v3", src)
    return src


def test_empty_dst_directory_is_used(small_src, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    rc, out, _ = run_cli(capsys, small_src, dst)
    assert rc == 0 and str(dst) in out
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_overwrite_replaces_a_non_empty_dst(small_src, tmp_path, capsys):
    dst = tmp_path / "dst"
    (dst / "old_subdir").mkdir(parents=True)
    (dst / "precious.txt").write_text("old")
    (dst / "old_subdir" / "model.safetensors").write_text("old")
    before = snapshot(small_src)
    rc, _, _ = run_cli(capsys, small_src, dst, "--overwrite")
    assert rc == 0
    assert not (dst / "precious.txt").exists() and not (dst / "old_subdir").exists()
    expected = read_checkpoint(small_src)
    output = read_checkpoint(dst)
    assert all(torch.equal(output[name], tensor) for name, tensor in expected.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"], "no partial or old copy left beside DST"
    assert snapshot(small_src) == before


def test_calibration_data_inside_dst_is_refused_before_anything_is_deleted(small_src, tmp_path, capsys):
    """--overwrite replaces DST: a calibration file inside it was read, then silently deleted with the old DST."""
    from mla_dsa.data import stdlib_files

    dst = tmp_path / "dst"
    dst.mkdir()
    calibration = dst / "calibration.txt"
    calibration.write_text(stdlib_files("train")[0].read_text())
    rc, _, err = run_cli(capsys, small_src, dst, "--overwrite", "--indexer-init", "calibrate", "--calibration-data",
                         calibration)  # fmt: skip
    assert rc == 1
    assert_one_line_error(err, calibration, "inside DST")
    assert calibration.exists() and sorted(p.name for p in dst.iterdir()) == ["calibration.txt"]


def _corrupt_one_tensor(monkeypatch):
    """Every conversion in this test writes a wrong o_proj in layer 1 (check_output only checks names and shapes)."""
    produce = write_module.TensorMaker.__call__

    def corrupted(self, tensor):
        value = produce(self, tensor)
        return value * 1.5 if tensor.name == "model.layers.1.self_attn.o_proj.weight" else value

    monkeypatch.setattr(write_module.TensorMaker, "__call__", corrupted)


def test_verify_failure_leaves_no_dst(small_src, tmp_path, monkeypatch, capsys):
    _corrupt_one_tensor(monkeypatch)
    dst = tmp_path / "dst"
    rc, out, err = run_cli(capsys, small_src, dst, "--verify")
    assert rc != 0
    assert_one_line_error(err, partial_of(dst), "--verify failed")
    assert "max |logit difference|" in out
    assert not dst.exists()


def test_failed_conversion_with_overwrite_keeps_the_old_dst(small_src, sharded_v3, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    kept = snapshot(dst)
    src, _, named, words = _gpt2(tmp_path, sharded_v3)  # bad input
    rc, _, err = run_cli(capsys, src, dst, "--overwrite")
    assert rc != 0 and assert_one_line_error(err, named, *words)
    assert snapshot(dst) == kept
    _corrupt_one_tensor(monkeypatch)  # a conversion that fails its --verify
    rc, _, err = run_cli(capsys, small_src, dst, "--overwrite", "--verify")
    assert rc != 0 and "--verify failed" in err
    assert snapshot(dst) == kept


def test_resume_of_a_different_conversion_starts_over(small_src, tmp_path, monkeypatch):
    """A partial conversion with other options (here another seed) is not reused by --resume."""
    dst = tmp_path / "dst"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # every shard written, then interrupted
        patch.setattr("mla_dsa.conversion.convert.write_metadata", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(small_src, dst, seed=0, max_shard_size="100KB", progress=False)
    assert not dst.exists() and len(list(partial_of(dst).glob("*.safetensors"))) >= 3
    convert_checkpoint(small_src, dst, seed=1, max_shard_size="100KB", resume=True, progress=False)
    convert_checkpoint(small_src, tmp_path / "clean", seed=1, max_shard_size="100KB", progress=False)
    resumed, clean = file_bytes(dst), file_bytes(tmp_path / "clean")
    assert resumed.keys() == clean.keys()
    assert all(resumed[name] == clean[name] for name in clean)


# ---------------------------------------------------------------------------------------------- kill and resume
@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """A deepseek_v3-format checkpoint of ~110 MB in ~40 shards, written directly (no model built)."""
    src = tmp_path_factory.mktemp("kill") / "src"
    config = synthetic_v3_config(vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=128,
                                 num_hidden_layers=12)  # fmt: skip
    info = write_synthetic_checkpoint(src, config, shard_bytes=3_000_000)
    assert info["shards"] >= 30
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    return src


def _writer_temporary(partial: Path) -> bool:
    """A shard's bytes are being written: safetensors writes through a temporary file, which is neither an output
    shard (`model-*`, `model-*.tmp` once complete) nor the state file."""
    return any(not entry.name.startswith(("model-", STATE_NAME)) for entry in partial.iterdir())


@pytest.mark.slow  # a subprocess: over 6 s on 2 cores
def test_killed_conversion_resumes_to_identical_bytes(many_shards, tmp_path):
    """SIGKILL after at least 3 shards are done, while the next one is being written (the common case for multi-GB
    shards); should a writer leave no temporary to see, after 10 shards."""
    src, dst = many_shards, tmp_path / "dst"
    partial = partial_of(dst)
    before = snapshot(src)
    command = [sys.executable, "-m", "mla_dsa", "convert", str(src), str(dst), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if partial.is_dir():
                try:
                    finished = list(partial.glob("model-*.safetensors"))
                    if len(finished) >= 10 or (len(finished) >= 3 and _writer_temporary(partial)):
                        process.send_signal(signal.SIGKILL)
                        killed = True
                        break
                except FileNotFoundError:  # a file renamed while we looked
                    pass
            time.sleep(0.001)
    finally:
        if process.poll() is None and not killed:
            process.kill()
        process.wait(timeout=60)
    assert killed, f"the conversion ended (rc {process.returncode}) before it could be killed"
    assert process.returncode == -signal.SIGKILL
    assert not dst.exists(), "DST must not appear before the conversion is complete"
    state = json.loads((partial / STATE_NAME).read_text())
    done = sorted(state["done"])
    total = len(set(weight_map(src).values()))
    assert 2 <= len(done) < total - 5, done
    stats = {name: (partial / name).stat() for name in done}

    assert main(["convert", str(src), str(dst), "--resume", "--no-progress"]) == 0
    assert not partial.exists()
    for name, stat in stats.items():  # finished shards were kept, not rewritten: same file, same mtime
        now = (dst / name).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (stat.st_ino, stat.st_mtime_ns, stat.st_size), name

    convert_checkpoint(src, tmp_path / "clean", progress=False)
    resumed, clean = file_bytes(dst), file_bytes(tmp_path / "clean")
    assert sorted(resumed) == sorted(clean), "resumed DST holds other files than a clean run's"
    for name in clean:
        assert resumed[name] == clean[name], name
    assert snapshot(src) == before
    assert mla_dsa.MlaDsaConfig.from_pretrained(dst).num_hidden_layers == 12


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
