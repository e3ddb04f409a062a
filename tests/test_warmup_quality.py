"""Issue #4's bar, on real text, in the suite: the embedded dense model (transformers' DeepseekV3ForCausalLM trained
on the stdlib) is converted, its fresh indexer is clearly worse than dense, and a short dense warm-up brings the
indexer's recall@k close to what any top-k can hold (the oracle: the k keys with the most dense attention) and most
of the sparse loss penalty away (README "Results" has the long run)."""

import pytest

import mla_dsa
from mla_dsa.data import fixed_windows, read_corpus, stdlib_files
from mla_dsa.default_model import ASSET_DIR
from mla_dsa.training import evaluate_indexer, oracle_recall, train_indexer

SEQ_LEN = 256
DENSE_LAYERS = [0]


@pytest.mark.slow
def test_dense_warmup_reaches_the_bar_on_held_out_text(tmp_path):
    converted = tmp_path / "dsa"
    # The small model's first layer attends everywhere (no top-k can cover it): it stays dense, as in the README.
    mla_dsa.convert_checkpoint(ASSET_DIR, converted, index_topk=SEQ_LEN // 8, dense_attention_layers=DENSE_LAYERS,
                               progress=False)  # fmt: skip
    windows = fixed_windows(read_corpus(stdlib_files("held_out")), 8, SEQ_LEN)
    before = evaluate_indexer(mla_dsa.MlaDsaForCausalLM.from_pretrained(converted), windows)
    assert before["loss_ratio"] > 1.3 and before["recall"] < 0.6  # a fresh indexer is clearly worse

    warmed = train_indexer(converted, "dense", [str(p) for p in stdlib_files("train")], tmp_path / "warm",
                           steps=60, seq_len=SEQ_LEN, batch_size=4, progress=False)  # fmt: skip
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(warmed)
    for divisor, share in ((8, 0.95), (16, 0.9)):
        k = SEQ_LEN // divisor
        after = evaluate_indexer(model, windows, index_topk=k)
        dense = mla_dsa.MlaDsaForCausalLM.from_pretrained(converted)
        per_layer = oracle_recall(dense, windows, k)
        dsa_layers = [share for layer, share in enumerate(per_layer) if layer not in DENSE_LAYERS]
        oracle = sum(dsa_layers) / len(dsa_layers)  # over the DSA layers, as evaluate_indexer's recall
        fresh = before if divisor == 8 else evaluate_indexer(mla_dsa.MlaDsaForCausalLM.from_pretrained(converted),
                                                             windows, index_topk=k)  # fmt: skip
        assert after["recall"] >= share * oracle, (k, after, oracle)
        assert after["loss_ratio"] - 1 <= (fresh["loss_ratio"] - 1) / 5, (k, after, fresh)
        print(f"k = L/{divisor}: recall {after['recall']:.3f} (oracle {oracle:.3f}), sparse/dense "
              f"{after['loss_ratio']:.4f} (fresh {fresh['loss_ratio']:.4f})")  # fmt: skip
