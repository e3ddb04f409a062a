"""`mla-dsa convert SRC OUT.gguf --export gguf --llama-cpp DIR`: DeepSeek-V3.2's format written by llama.cpp's own
converter. Here: what llama.cpp cannot run is refused before its converter runs (it would abort), the command says
what it needs, and the export llama.cpp reads carries what its loader asserts. With a llama.cpp checkout and its Python
binding (LLAMA_CPP_DIR; see benchmarks/llama_cpp_agreement.py), llama.cpp runs the GGUF with our tokens in its sparse
path; the benchmark's JSON has the SmolLM2 figures."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV32ForCausalLM

import mla_dsa
from mla_dsa.cli import main as cli
from mla_dsa.conversion.llama_cpp import llama_cpp_refusals
from mla_dsa.default_model import ASSET_DIR

from peers import VOCAB, save_peer

LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")


@pytest.fixture
def fake_llama_cpp(tmp_path) -> Path:
    """A directory shaped like a llama.cpp checkout whose converter must never run: a refusal comes first."""
    directory = tmp_path / "llama.cpp"
    (directory / "gguf-py").mkdir(parents=True)
    (directory / "convert_hf_to_gguf.py").write_text("raise SystemExit('the converter ran')\n")
    return directory


def test_llama_cpp_refusals_name_what_its_deepseek32_graph_cannot_run():
    runnable = {"index_head_dim": 128, "qk_nope_head_dim": 128, "rope_scaling": {"type": "yarn", "factor": 40}}
    assert llama_cpp_refusals(runnable) == []
    assert llama_cpp_refusals({**runnable, "index_head_dim": 64}) == []
    for head_dim in (32, 96, 192):  # its Hadamard rotation needs a power of two >= 64
        assert "index_head_dim" in " ".join(llama_cpp_refusals({**runnable, "index_head_dim": head_dim}))
    assert "qk_nope_head_dim" in " ".join(llama_cpp_refusals({**runnable, "qk_nope_head_dim": 0}))
    assert llama_cpp_refusals({**runnable, "attention_bias": False}) == []
    assert "attention_bias" in " ".join(llama_cpp_refusals({**runnable, "attention_bias": True}))
    longrope = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}
    assert "--qk-rope-head-dim" in " ".join(llama_cpp_refusals({**runnable, "rope_scaling": longrope}))
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    reasons = " ".join(llama_cpp_refusals({**runnable, "rope_scaling": llama3}))  # a Llama 3.x source's own
    assert "llama3" in reasons and "--qk-rope-head-dim" not in reasons  # one RoPE head would not help


def test_gguf_export_refuses_a_model_llama_cpp_would_abort_on_and_leaves_nothing(fake_llama_cpp, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    code = cli(["convert", str(ASSET_DIR), str(out), "--export", "gguf", "--llama-cpp", str(fake_llama_cpp),
                "--index-head-dim", "32", "--no-progress"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 1 and "index_head_dim=32" in error and "the converter ran" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama.cpp"]  # no GGUF, no staging directory


def test_gguf_export_says_what_it_needs(fake_llama_cpp, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    source = str(ASSET_DIR)
    cases = [
        (["--export", "gguf"], "--llama-cpp DIR"),
        (["--export", "gguf", "--llama-cpp", str(tmp_path)], "not a llama.cpp checkout"),
        (["--llama-cpp", str(fake_llama_cpp)], "apply to --export gguf"),
    ]
    for flags, message in cases:
        assert cli(["convert", source, str(tmp_path / "out.gguf"), *flags, "--no-progress"]) == 1
        assert message in capsys.readouterr().err
    assert cli(["convert", source, str(tmp_path / "out"), "--export", "gguf", "--llama-cpp", str(fake_llama_cpp)]) == 1
    assert "must end in .gguf" in capsys.readouterr().err
    (tmp_path / "taken.gguf").write_bytes(b"GGUF")
    assert cli(["convert", source, str(tmp_path / "taken.gguf"), "--export", "gguf", "--llama-cpp",
                str(fake_llama_cpp)]) == 1  # fmt: skip
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "taken.gguf").read_bytes() == b"GGUF"


def test_a_model_without_moe_layers_exports_no_expert_groups(tmp_path):
    """llama.cpp asserts fewer expert groups than experts (a dense-only model has one placeholder expert and one
    group); transformers reads n_group 0 as no grouping, and the export still computes what ours does."""
    save_peer("deepseek_v3", tmp_path / "dense-mlp", first_k_dense_replace=3)  # every layer a dense MLP
    ours = mla_dsa.convert_checkpoint(tmp_path / "dense-mlp", tmp_path / "ours", index_topk=5, index_head_dim=32,
                                      progress=False)  # fmt: skip
    export = mla_dsa.convert_checkpoint(ours, tmp_path / "export", export="deepseek_v32", progress=False)
    config = json.loads((export / "config.json").read_text())
    assert config["n_group"] == 0 and config["first_k_dense_replace"] >= config["num_hidden_layers"]
    native, mine = DeepseekV32ForCausalLM.from_pretrained(export).eval(), mla_dsa.load_checkpoint(ours).eval()
    input_ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(native(input_ids).logits, mine(input_ids).logits, rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_CPP_DIR or importlib.util.find_spec("llama_cpp") is None,
                    reason="needs a llama.cpp checkout (LLAMA_CPP_DIR) and its Python binding")  # fmt: skip
def test_llama_cpp_runs_the_gguf_with_our_greedy_tokens_in_its_sparse_path(tmp_path):
    import numpy as np

    spec = importlib.util.spec_from_file_location("agreement", Path(__file__).parents[1] / "benchmarks" /
                                                  "llama_cpp_agreement.py")  # fmt: skip
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)
    llama, llama_greedy, llama_prefill = agreement.llama, agreement.llama_greedy, agreement.llama_prefill
    ours_greedy, ours_prefill = agreement.ours_greedy, agreement.ours_prefill

    ours = mla_dsa.convert_checkpoint(ASSET_DIR, tmp_path / "ours", index_topk=32, index_head_dim=64, progress=False)
    gguf = mla_dsa.convert_checkpoint(ours, tmp_path / "model.gguf", export="gguf", llama_cpp=LLAMA_CPP_DIR,
                                      gguf_type="f32", progress=False)  # fmt: skip
    model = mla_dsa.load_checkpoint(ours).eval()
    # Held-out text as the benchmark reads it (a random indexer: another text may put near-ties at the top-k boundary)
    ids = list(agreement.held_out_text().encode()[:128])  # byte-level: ids are bytes
    runner = llama(gguf, n_ctx=256)
    theirs, mine = llama_prefill(runner, ids), ours_prefill(model, ids)
    assert np.abs(theirs - mine).max() < 1e-3
    mine_dense = ours_prefill(model, ids, use_sparse_attention=False)
    assert np.abs(theirs - mine_dense).max() > 100 * np.abs(theirs - mine).max()  # its top-32 of 128 mattered
    assert llama_greedy(runner, ids) == ours_greedy(model, ids)
