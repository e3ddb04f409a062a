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


def test_lookup_probes_ask_for_a_passage_seen_once_at_their_depth():
    """Each probe is CUE tokens that occur once in the text, then the ANSWER tokens that followed them there, at its
    depth back from the text's end; the window is exactly as long as asked."""
    window, depths, probes_start = long_context.lookup_window(byte_tokenizer(), 1200)
    assert window.shape == (1200,) and len(depths) == len(long_context.DEPTHS)
    text, probe_len = window[:probes_start], long_context.CUE + long_context.ANSWER
    assert depths == sorted(depths) and depths[-1] > 0.9 * len(text)
    for index, depth in enumerate(depths):
        probe = window[probes_start + index * probe_len : probes_start + (index + 1) * probe_len]
        start = len(text) - depth
        assert torch.equal(probe, text[start : start + probe_len])
        cue = probe[: long_context.CUE]
        occurrences = sum(torch.equal(text[i : i + len(cue)], cue) for i in range(len(text) - len(cue) + 1))
        assert occurrences == 1


def _memorised(window: torch.Tensor) -> torch.nn.Module:
    """A tiny Llama trained until it predicts `window` perfectly."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(window, labels=window).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow  # 300 training steps
def test_a_memorised_window_answers_every_lookup():
    window, depths, probes_start = long_context.lookup_window(byte_tokenizer(), 400)
    result = long_context.measure_lookup(_memorised(window[None]), window, depths, probes_start)
    assert [probe["depth"] for probe in result["lookup"]] == depths
    assert result["lookup_exact"] == len(depths) and result["lookup_nll"] < 0.05 and result["seconds"] > 0


def test_windows_end_with_a_copy_of_their_start():
    windows = long_context.windows_of(byte_tokenizer(), 300, 2)
    assert windows.shape == (2, 300)
    assert torch.equal(windows[:, -long_context.SPAN :], windows[:, : long_context.SPAN])
    assert not torch.equal(windows[0], windows[1])  # consecutive stretches of text, not one repeated


@pytest.mark.slow  # 300 training steps
def test_the_copy_is_scored_where_it_stands():
    """A model trained until it predicts its one window perfectly: every copy token is its argmax (exact match 1),
    and its text perplexity is near 1."""
    window = long_context.windows_of(byte_tokenizer(), 160, 1)
    result = long_context.measure(_memorised(window), window)
    assert result["copy_exact"] == 1.0 and result["copy_top1"] == 1.0 and result["ppl"] < 1.1
    assert result["copy_nll"] < 0.05 and result["seconds_per_window"] > 0


@pytest.mark.slow  # compiles a decode step
def test_alternating_rounds_decode_from_the_prefill_every_round(v32_topk4):
    """`--rounds`: both models prefilled once, then rounds alternating between them, each from the same cache state
    (a round predicting other tokens raises): the greedy tokens of every step equal a full forward's, for the source
    on transformers' DynamicCache and for ours compiled with DSA on a static cache."""
    from mla_dsa import MlaDsaForCausalLM

    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()  # fmt: skip
    ours = MlaDsaForCausalLM.from_pretrained(v32_topk4).eval()
    window = torch.randint(3, 64, (20 + long_context.DECODE_STEPS,), generator=torch.Generator().manual_seed(1))
    rows = long_context.alternating_decode_ms(source, ours, window, rounds=2, index_topk=4)
    context = len(window) - long_context.DECODE_STEPS
    for row, model in zip(rows, (source, ours), strict=True):
        with torch.no_grad():
            full = model(window[None], **({"index_topk": 4} if model is ours else {})).logits[0, context:]
        assert row["next_tokens"] == full.argmax(-1).tolist()
        assert row["context"] == context and len(row["round_ms"]) == 2 and row["decode_ms"] > 0
    assert rows[1]["compiled"] and not rows[0]["compiled"]


def test_trained_rows_train_on_files_the_rows_never_measure():
    """A trained model's row (`TRAINED`) starts from a listed conversion, trains on train-split files only (the rows
    read the held-out split), and lives in a directory of its own."""
    from mla_dsa.data import stdlib_files

    held_out = {str(path) for path in stdlib_files("held_out")}
    files = long_context.training_files()
    assert files and not held_out & set(files)
    out = Path("/models")
    for name, (base, options) in long_context.TRAINED.items():
        assert base in long_context.MODELS and "--stage" in options
        assert long_context.model_dir(out, name) != long_context.model_dir(out, base)
