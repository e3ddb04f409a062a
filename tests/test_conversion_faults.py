"""Conversion under faults: a full disk and kills at many points, each followed by a clean --resume."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import mla_dsa
from mla_dsa.cli import main
from mla_dsa.conversion import write as write_module

from checkpoints import file_bytes, snapshot
from peers import save_peer


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    peer_dir = root / "peer"
    save_peer("deepseek_v3", peer_dir, num_hidden_layers=6)
    source = root / "src"
    from transformers import DeepseekV3ForCausalLM

    DeepseekV3ForCausalLM.from_pretrained(peer_dir).save_pretrained(source, max_shard_size="60KB")
    clean = root / "clean"
    mla_dsa.convert_checkpoint(source, clean, max_shard_size="60KB", progress=False)
    return source, clean


def test_disk_full_is_one_clear_line_and_resume_gives_clean_bytes(sharded_source, tmp_path, monkeypatch, capsys):
    source, clean = sharded_source
    before = snapshot(source)
    real_save, calls = write_module.save_file, {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(write_module, "save_file", failing_save)
    dst = tmp_path / "dst"
    assert main(["convert", str(source), str(dst), "--max-shard-size", "60KB", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and "--resume" in err
    assert not dst.exists() and snapshot(source) == before
    monkeypatch.setattr(write_module, "save_file", real_save)
    assert main(["convert", str(source), str(dst), "--max-shard-size", "60KB", "--resume", "--no-progress"]) == 0
    assert file_bytes(dst) == file_bytes(clean)
    assert snapshot(source) == before


@pytest.mark.slow
def test_kills_at_many_points_then_resume_gives_clean_bytes(sharded_source, tmp_path):
    """SIGKILL the CLI at several moments of one conversion; after each, --resume; the end result is the clean
    conversion's bytes, DST never exists half-written, SRC never changes."""
    source, clean = sharded_source
    before = snapshot(source)
    dst = tmp_path / "dst"
    command = [sys.executable, "-m", "mla_dsa", "convert", str(source), str(dst), "--max-shard-size", "60KB",
               "--resume", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = False
    for delay in (0.8, 1.2, 1.6, 2.0, 2.4, 2.8):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if process.poll() is not None:
            finished = process.returncode == 0
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not dst.exists() or file_bytes(dst) == file_bytes(clean)
        assert snapshot(source) == before
    if not finished:
        assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert file_bytes(dst) == file_bytes(clean)
    assert snapshot(source) == before


def test_resume_after_a_kill_past_the_final_rename_finds_dst_complete(sharded_source, tmp_path, capsys):
    """A kill between the rename into place and the exit leaves DST complete: --resume says so (exit 0, bytes
    unchanged); a DST that is not this conversion's output is still refused."""
    source, clean = sharded_source
    dst = tmp_path / "dst"
    shutil.copytree(clean, dst)
    assert main(["convert", str(source), str(dst), "--max-shard-size", "60KB", "--resume", "--no-progress"]) == 0
    assert file_bytes(dst) == file_bytes(clean)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a checkpoint")
    assert main(["convert", str(source), str(other), "--resume", "--no-progress"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "not a checkpoint"
