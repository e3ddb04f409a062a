"""llama.cpp runs our `--export gguf` with our tokens: greedy continuations and logits, in its sparse path.

    python benchmarks/llama_cpp_agreement.py --llama-cpp ~/llama.cpp [--smollm2 DIR] [--json out.json]

Needs llama.cpp's source (`--llama-cpp`, for its converter) and its Python binding (`import llama_cpp`), both from
the registry's llama-cpp-python source distribution, which vendors a llama.cpp with DeepSeek-V3.2 DSA:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install ./llama_cpp_python-0.3.36      # ~5 minutes on 2 cores
    # --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp

Models: the embedded model converted to DSA (top-32, 64-dim indexer heads: llama.cpp needs a power of two >= 64;
indexers calibrated on 40 train-split files as in the README's recipe; a random indexer's near-ties flip under bf16
rounding), and
with `--smollm2 DIR` a DSA conversion of SmolLM2-135M-Instruct (e.g. `mla-dsa convert SMOLLM2 DIR --kv-lora-rank 320
--index-head-dim 64 --index-topk 64 --indexer-init calibrate --calibration-data ...`, see docs/long_context.md). Each
is written with `mla-dsa convert OURS OUT.gguf --export gguf` in f32 and bf16 and run by llama.cpp (1 thread, f32
cache) on held-out standard-library text: a prompt 4 x index_topk long (the sparse path) and one of index_topk / 2
(every key selected). Reported per prompt: whether the two tokenizers give the same ids, max |logit difference| over
the prefill and argmax agreement, the first divergence of 32 greedy tokens (none: equal), and for the long prompt the
sparse-path check: llama.cpp again with its GGUF top-k overridden to 2^30 (dense) against ours dense. llama.cpp took
its sparse path when its sparse logits are near ours sparse and far from ours dense.

Exact ties of index scores (keys every indexer head scores 0 after its ReLU: SmolLM2's calibrated indexers make them
from about token 64 on) are broken by position in ours and arbitrarily by llama.cpp's top-k, so past the first tie
the logits may differ by more than float error while greedy tokens stay equal.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

import mla_dsa
from mla_dsa.data import stdlib_files
from mla_dsa.default_model import ASSET_DIR

HUGE_TOPK = 1 << 30
NEW_TOKENS = 32


def held_out_text() -> str:
    return "\n".join(path.read_text(errors="replace") for path in stdlib_files("held_out")[:4])


def calibration_files(tmp: str) -> list[str]:
    """The README recipe's calibration text: train-split standard-library files (never the held-out prompts)."""
    path = Path(tmp) / "calibration.txt"
    path.write_text("\n".join(file.read_text(errors="replace") for file in stdlib_files("train")[:40]))
    return [str(path)]


def llama(gguf: Path, n_ctx: int, topk: int | None = None):
    import llama_cpp

    overrides = {"deepseek32.attention.indexer.top_k": topk} if topk else None
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=1, logits_all=True, type_k=0, type_v=0,
                           kv_overrides=overrides, verbose=False)  # fmt: skip


def llama_prefill(model, ids: list[int]) -> np.ndarray:
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def llama_greedy(model, ids: list[int]) -> list[int]:
    model.reset()
    model.eval(ids)
    out = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    return out


@torch.no_grad()
def ours_prefill(model, ids: list[int], **settings) -> np.ndarray:
    return model(torch.tensor([ids]), **settings).logits[0].float().numpy()


@torch.no_grad()
def ours_greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def compare(checkpoint: Path, gguf: Path, text: str) -> dict:
    ours = mla_dsa.load_checkpoint(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    k = ours.config.index_topk
    all_ids = tokenizer(text, add_special_tokens=False).input_ids
    result = {"gguf": gguf.name, "index_topk": k}
    runner = llama(gguf, n_ctx=4 * k + NEW_TOKENS + 8)
    for name, length in (("long", 4 * k), ("short", k // 2)):
        ids = all_ids[:length]
        theirs_ids = runner.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True)
        theirs, mine = llama_prefill(runner, ids), ours_prefill(ours, ids)
        row = {
            "tokens": length,
            "tokenizers_agree": theirs_ids == ids,
            "max_logit_diff": float(np.abs(theirs - mine).max()),
            "max_abs_logit": float(np.abs(mine).max()),
            "argmax_agreement": float((theirs.argmax(-1) == mine.argmax(-1)).mean()),
            "greedy_first_divergence": first_divergence(llama_greedy(runner, ids), ours_greedy(ours, ids)),
        }
        if name == "long":
            dense_runner = llama(gguf, n_ctx=4 * k + 8, topk=HUGE_TOPK)
            theirs_dense = llama_prefill(dense_runner, ids)
            mine_dense = ours_prefill(ours, ids, use_sparse_attention=False)
            row["sparse_check"] = {
                "llama_sparse_vs_ours_dense": float(np.abs(theirs - mine_dense).max()),
                "ours_sparse_vs_ours_dense": float(np.abs(mine - mine_dense).max()),
                "llama_dense_vs_ours_dense": float(np.abs(theirs_dense - mine_dense).max()),
            }
            del dense_runner
        result[name] = row
        print(json.dumps({gguf.name: {name: row}}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp source directory (its converter)")
    parser.add_argument("--smollm2", default=None, help="a DSA conversion of SmolLM2-135M-Instruct (ours)")
    parser.add_argument("--types", nargs="+", default=["f32", "bf16"], choices=["f32", "f16", "bf16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    text = held_out_text()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        embedded = mla_dsa.convert_checkpoint(ASSET_DIR, Path(tmp) / "embedded", index_topk=32, index_head_dim=64,
                                              indexer_init="calibrate", calibration_data=calibration_files(tmp),
                                              progress=False)  # fmt: skip
        models = {"embedded": embedded, **({"smollm2": Path(args.smollm2)} if args.smollm2 else {})}
        for model_name, checkpoint in models.items():
            for gguf_type in args.types:
                gguf = Path(tmp) / f"{model_name}-{gguf_type}.gguf"
                mla_dsa.convert_checkpoint(checkpoint, gguf, export="gguf", llama_cpp=args.llama_cpp,
                                           gguf_type=gguf_type, progress=False)  # fmt: skip
                results.append({"model": model_name, "gguf_type": gguf_type, **compare(checkpoint, gguf, text)})
    if args.json:
        Path(args.json).write_text(json.dumps({"llama_cpp": args.llama_cpp, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
