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


def test_lookup_windows_are_consecutive_stretches_of_the_held_out_text():
    """`--lookup-windows N`: window i's text is the i-th stretch of `length` tokens, so rows over several windows see
    different passages (the first is the single window of earlier rows)."""
    from mla_dsa.data import stdlib_files, text_files_corpus

    tokenizer = byte_tokenizer()
    corpus = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=3 * 600)
    for index in range(3):
        window, depths, probes_start = long_context.lookup_window(tokenizer, 600, index)
        assert window.shape == (600,)
        assert torch.equal(window[:probes_start], corpus[index * 600 : index * 600 + probes_start])


def test_a_probe_is_answered_exactly_when_its_margin_is_positive():
    """The margin (the answer's smallest logit lead over any other token) is positive where every answer token is the
    argmax and negative where one is not: on an untrained model, which answers some tokens and not others."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    window, depths, probes_start = long_context.lookup_window(byte_tokenizer(), 400)
    probes = long_context.measure_lookup(model, window, depths, probes_start)["lookup"]
    assert all(probe["exact"] == (probe["margin"] > 0) for probe in probes)
    assert not any(probe["exact"] for probe in probes) and all(probe["margin"] < 0 for probe in probes)
    hidden = model.model(window[None]).last_hidden_state[0]
    answer = probes_start + long_context.CUE  # the first probe's answer
    logits = model.lm_head(hidden[answer - 1 : answer - 1 + long_context.ANSWER]).float()
    wanted = window[answer : answer + long_context.ANSWER]
    leads = [logits[i, wanted[i]] - torch.cat([logits[i, : wanted[i]], logits[i, wanted[i] + 1 :]]).max()
             for i in range(len(wanted))]  # fmt: skip
    assert probes[0]["margin"] == pytest.approx(min(leads).item(), abs=1e-5)


def test_lookup_table_compares_each_dsa_probe_with_the_same_probe_dense():
    """Over several windows, a DSA row counts the dense answers it keeps, lists the dense margins of those it loses,
    and counts the probes it answers that dense does not: probe by probe, not by totals."""

    def row(attention, k, exact, margins):
        probes = [{"window": i // len(long_context.DEPTHS), "depth_fraction": long_context.DEPTHS[i % 8],
                   "depth": 100 * (i % 8), "nll": 0.5, "exact": e, "margin": m}
                  for i, (e, m) in enumerate(zip(exact, margins, strict=True))]  # fmt: skip
        return {"model": "m", "attention": attention, "index_topk": k, "length": 1024, "lookup_windows": 2,
                "lookup": probes, "lookup_exact": sum(exact), "lookup_nll": 0.5}  # fmt: skip

    dense_exact = [True] * 4 + [False] * 12
    dense = row("dense", None, dense_exact, [0.1, 2.0, 3.0, 0.3] + [-1.0] * 12)
    dsa_exact = [False, True, True, False] + [True] + [False] * 11  # loses 2 of dense's 4, answers one dense misses
    dsa = row("dsa", 64, dsa_exact, [-0.1, 1.0, 1.0, -0.2, 0.5] + [-1.0] * 11)
    lines = long_context.lookup_table([dsa, dense], {"m": 0}).splitlines()
    assert lines[2].startswith("| 1,024 | m | dense | 4 of 16 |") and lines[2].endswith("|  |  |  |")
    assert lines[3].startswith("| 1,024 | m | DSA, k = 64 | 3 of 16 |")
    assert lines[3].endswith("| 0 / 1 / 1 / 0 / 1 / 0 / 0 / 0 | 2 of 4 | 0.10, 0.30 | 1 |")


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
    assert all(probe["margin"] > 0 for probe in result["lookup"])


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
    """A trained model's row (`TRAINED`) starts from a listed conversion or a model trained from one, trains on
    train-split files only (the rows read the held-out split), and lives in a directory of its own."""
    from mla_dsa.data import stdlib_files

    held_out = {str(path) for path in stdlib_files("held_out")}
    files = long_context.training_files()
    assert files and not held_out & set(files)
    out = Path("/models")
    for name, (base, options) in long_context.TRAINED.items():
        assert (base in long_context.MODELS or base in long_context.TRAINED) and "--stage" in options
        assert long_context.conversion_of(name) in long_context.MODELS
        assert long_context.model_dir(out, name) != long_context.model_dir(out, base)
    directories = [long_context.model_dir(out, name) for name in [*long_context.MODELS, *long_context.TRAINED]]
    assert len(set(directories)) == len(directories) and max(len(path.name) for path in directories) < 256


def test_the_oracle_selects_each_querys_keys_of_most_dense_attention_mass(ours_v32_topk4):
    """`--oracle`: within `oracle_selection`, a layer selects the k keys its own dense softmax (summed over heads)
    weighs most, so its selection holds the largest mass any k keys hold and at least what the indexer's holds (layer
    0, whose input is the same in every forward); outside it, the indexer selects again."""
    from mla_dsa import MlaDsaForCausalLM

    model = MlaDsaForCausalLM.from_pretrained(ours_v32_topk4).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mass = model(ids, use_sparse_attention=False, output_attentions=True).attentions[0][0].sum(0)  # [S, T]
    selections = []
    hook = model.model.layers[0].self_attn.indexer.register_forward_hook(lambda m, a, out: selections.append(out))
    with torch.no_grad():
        with long_context.oracle_selection(model):
            model(ids, index_topk=4)
        model(ids, index_topk=4)
    hook.remove()
    oracle, indexer = (mass.gather(-1, selection.indices[0]).sum(-1)[4:] for selection in selections)  # > k keys
    torch.testing.assert_close(oracle, mass.topk(4, dim=-1).values.sum(-1)[4:])
    assert (oracle >= indexer - 1e-6).all() and (oracle > indexer + 1e-4).any()
