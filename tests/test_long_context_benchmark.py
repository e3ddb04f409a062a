"""benchmarks/long_context.py's measures, on a tiny model: each window ends with a copy of its own first 64 tokens,
and the copy's scores are the copy's (a model that has memorised the window scores the copy exactly), so the script
cannot rot between its long runs."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mla_dsa.data import byte_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_context  # noqa: E402


def test_windows_end_with_a_copy_of_their_start():
    windows = long_context.windows_of(byte_tokenizer(), 300, 2)
    assert windows.shape == (2, 300)
    assert torch.equal(windows[:, -long_context.SPAN :], windows[:, : long_context.SPAN])
    assert not torch.equal(windows[0], windows[1])  # consecutive stretches of text, not one repeated


@pytest.mark.slow  # 300 training steps
def test_the_copy_is_scored_where_it_stands():
    """A model trained until it predicts its one window perfectly: every copy token is its argmax (exact match 1),
    and its text perplexity is near 1."""
    torch.manual_seed(0)
    window = long_context.windows_of(byte_tokenizer(), 160, 1)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(window, labels=window).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    result = long_context.measure(model, window)
    assert result["copy_exact"] == 1.0 and result["copy_top1"] == 1.0 and result["ppl"] < 1.1
    assert result["copy_nll"] < 0.05 and result["seconds_per_window"] > 0
