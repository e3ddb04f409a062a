"""Indexer init and dense warm-up on real text: recall@k and sparse/dense loss before and after.

    python benchmarks/indexer_warmup.py [--steps 300] [--seq-len 512] [--out DIR] [--json results.json]

1. Takes the embedded default dense model (transformers' DeepseekV3ForCausalLM trained on the stdlib's train split).
2. Converts it to DSA with each indexer init (`random`, `svd`).
3. Evaluates on held-out stdlib files at k = L/8 and L/16: dense loss, sparse loss, ratio, KL, recall@k.
4. Runs the dense warm-up (`mla-dsa train-indexer --stage dense`) and evaluates again.
Prints a markdown table and writes JSON.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mla_dsa
from mla_dsa.data import fixed_windows, read_corpus, stdlib_files
from mla_dsa.default_model import ASSET_DIR
from mla_dsa.training import evaluate_indexer, train_indexer


def evaluate(checkpoint: Path, windows: torch.Tensor, ks: list[int]) -> dict[str, dict[int, dict]]:
    """At each k: every layer sparse (DeepSeek-V3.2), and the first layer kept dense."""
    results = {}
    for label, dense_layers in (("all layers DSA", None), ("layer 0 dense", [0])):
        model = mla_dsa.MlaDsaForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32, dense_attention_layers=dense_layers
        )
        results[label] = {k: evaluate_indexer(model, windows, index_topk=k) for k in ks}
    return results


def run(
    model_dir: Path, out: Path, steps: int, seq_len: int, batch_size: int, eval_windows: int, inits: list[str],
    index_n_heads: int | None = None, index_head_dim: int | None = None, reuse: bool = False,
) -> dict:  # fmt: skip
    held_out = read_corpus(stdlib_files("held_out"))
    windows = fixed_windows(held_out, eval_windows, seq_len)
    ks = [seq_len // 8, seq_len // 16]
    train_files = [str(p) for p in stdlib_files("train")]
    results = {"seq_len": seq_len, "steps": steps, "batch_size": batch_size, "ks": ks, "inits": {},
               "index_n_heads": index_n_heads, "index_head_dim": index_head_dim}  # fmt: skip
    for init in inits:
        converted, warm = out / f"dsa-{init}", out / f"warm-{init}"
        if reuse and (warm / "config.json").exists():  # evaluate an earlier run's checkpoints again
            results["inits"][init] = {"before": evaluate(converted, windows, ks), "after": evaluate(warm, windows, ks)}
            continue
        mla_dsa.convert_checkpoint(model_dir, converted, indexer_init=init, index_topk=ks[0], overwrite=True,
                                   index_n_heads=index_n_heads, index_head_dim=index_head_dim,
                                   progress=False)  # fmt: skip
        before = evaluate(converted, windows, ks)
        start = time.time()
        warmed = train_indexer(converted, "dense", train_files, out / f"warm-{init}", steps=steps, seq_len=seq_len,
                               batch_size=batch_size, logging_steps=max(1, steps // 10))  # fmt: skip
        seconds = time.time() - start
        after = evaluate(warmed, windows, ks)
        results["inits"][init] = {"before": before, "after": after, "warmup_seconds": seconds}
    return results


def table(results: dict) -> str:
    lines = [
        "| init | sparse layers | k | indexer | dense loss | sparse loss | sparse/dense | KL | recall@k |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for init, result in results["inits"].items():
        for stage in ("before", "after"):
            for layers, by_k in result[stage].items():
                for k, row in by_k.items():
                    label = "initial" if stage == "before" else f"after {results['steps']}-step warm-up"
                    lines.append(
                        f"| {init} | {layers} | {k} (L/{results['seq_len'] // int(k)}) | {label} | "
                        f"{row['dense_loss']:.4f} | {row['sparse_loss']:.4f} | {row['loss_ratio']:.4f} | "
                        f"{row['kl']:.4f} | {row['recall']:.3f} |"
                    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSET_DIR), help="dense MLA checkpoint (default: the embedded one)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--inits", nargs="+", default=["random", "svd"])
    parser.add_argument("--index-n-heads", type=int, default=None, help="indexer heads (default: converter's)")
    parser.add_argument("--index-head-dim", type=int, default=None, help="indexer head size (default: converter's)")
    parser.add_argument("--out", default=None, help="keep converted and warmed checkpoints here")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--reuse", action="store_true", help="only evaluate checkpoints an earlier run left in --out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        results = run(Path(args.model), out, args.steps, args.seq_len, args.batch_size, args.eval_windows, args.inits,
                      args.index_n_heads, args.index_head_dim, args.reuse)  # fmt: skip
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
