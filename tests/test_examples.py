"""The examples run on tiny models: generate.py (through trust_remote_code) and warmup_indexer.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mla_dsa.data import stdlib_files

from peers import save_byte_level_dsa, save_peer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = [str(path) for path in stdlib_files("train")[:3]]


@pytest.fixture(scope="module")
def dsa_checkpoint(tmp_path_factory):
    return save_byte_level_dsa(tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("dsa") / "ckpt", 8)


def run_example(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
def test_generate_example(dsa_checkpoint, tmp_path):
    out = run_example(str(EXAMPLES / "generate.py"), str(dsa_checkpoint), "--max-new-tokens", "12", cwd=tmp_path)
    assert out.startswith("def fibonacci(n):") and "[12 tokens in" in out and "sparse attention]" in out
    dense = run_example(str(EXAMPLES / "generate.py"), str(dsa_checkpoint), "--max-new-tokens", "4", "--dense",
                        cwd=tmp_path)  # fmt: skip
    assert "dense attention]" in dense
    import mla_dsa

    export = mla_dsa.convert_checkpoint(dsa_checkpoint, tmp_path / "export", export="deepseek_v32", progress=False)
    served = run_example(str(EXAMPLES / "generate.py"), str(export), "--max-new-tokens", "4", cwd=tmp_path)
    assert "[4 tokens in" in served  # transformers' DeepseekV32 (it had been given our dense switch and raised)


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
def test_warmup_example(dsa_checkpoint, tmp_path):
    out = run_example(str(EXAMPLES / "warmup_indexer.py"), str(dsa_checkpoint), "--data", *DATA, "--out",
                      str(tmp_path / "warm"), "--steps", "4", "--seq-len", "64", "--batch-size", "2",
                      "--no-progress", cwd=tmp_path)  # fmt: skip
    reports = [json.loads(part.split(":", 1)[1]) for part in _reports(out)]
    assert len(reports) == 2 and all("recall" in r and "loss_ratio" in r for r in reports)
    assert (tmp_path / "warm" / "config.json").exists()


def _reports(text: str) -> list[str]:
    """The JSON blocks printed after "before warm-up:" and "after warm-up:"."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith(("before warm-up:", "after warm-up:")):
            if current:
                blocks.append(current)
            current = line
        elif current is not None:
            current += "\n" + line
            if line == "}":
                blocks.append(current)
                current = None
    return blocks


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
def test_convert_deepseek_script(tmp_path):
    """examples/convert_deepseek.sh on a tiny V3 checkpoint (its defaults overridden by the extra options)."""
    source = tmp_path / "v3"
    save_peer("deepseek_v3", source)
    dst = tmp_path / "dsa"
    result = subprocess.run(
        ["bash", str(EXAMPLES / "convert_deepseek.sh"), str(source), str(dst), "--index-n-heads", "8",
         "--index-head-dim", "32", "--index-topk", "16", "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "mla_dsa" and config["index_n_heads"] == 8 and config["index_topk"] == 16


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
def test_classify_lora_example(tmp_path):
    """A LoRA fine-tune of the sequence classifier (on the embedded stdlib model's backbone) through Trainer learns
    the task on held-out windows."""
    import mla_dsa
    from mla_dsa.default_model import ASSET_DIR

    checkpoint = mla_dsa.convert_checkpoint(ASSET_DIR, tmp_path / "dsa", index_topk=16, progress=False)
    out = run_example(str(EXAMPLES / "classify_lora.py"), str(checkpoint), "--out", str(tmp_path / "run"),
                      "--steps", "60", "--seq-len", "64", "--no-progress", cwd=tmp_path)  # fmt: skip
    before = float(out.split("held-out accuracy before: ")[1].split()[0])
    after = float(out.split("held-out accuracy after: ")[1].split()[0])
    assert after >= 0.9 and after > before, out
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
