"""One sparse prefill of SmolLM2's exact conversion in each attention mode, and dense, in one run.

    python benchmarks/prefill_modes.py [--length 8192 ...] [--topk K] [--json benchmarks/results_prefill_modes.json]

Each length in turn (k = the length / 8 unless `--topk` says).

Two more rows run absorbed mode as the package's CPU attention ran it before: each query over its own gathered rows
(before a block of queries read the union of its selections once where that pays), and, further back, scoring the
absorbed query's latent columns too (before it skipped them for queries with no position-free part: this
conversion's, whose columns there are zeros).

The conversion is long_context.py's "exact" (`python benchmarks/long_context.py --models exact` writes it); one
window of held-out text, float32, the logits of the last 512 positions. `attention_mode="auto"` picks absorbed mode
for this prefill (it is longer than `mha_max_length`); the rows say what each mode costs on this model's shapes. A
last row prefills the same window with the source, SmolLM2-135M-Instruct through transformers' LlamaForCausalLM (its
default attention, SDPA).
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from long_context import model_dir, windows_of
from transformers import AutoModelForCausalLM, AutoTokenizer

import mla_dsa
from mla_dsa.loading import loading_kwargs
from mla_dsa.smollm2 import smollm2_checkpoint


@contextlib.contextmanager
def restored(module, name: str, value):
    """Puts `value` back as `module.name` on leaving."""
    try:
        yield
    finally:
        setattr(module, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "mla-dsa" / "long-context"))
    parser.add_argument("--length", type=int, nargs="+", default=[8192])
    parser.add_argument("--topk", type=int, default=None, help="k (default: each length / 8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    directory = model_dir(Path(args.out), "exact")
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    source = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), **loading_kwargs({"dtype": torch.float32}))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    results = {"rows": [], "differences": []}
    for length in args.length:
        rows, differences = measure(model, source, windows_of(tokenizer, length, 1), args.topk or length // 8)
        results["rows"] += rows
        results["differences"].append(differences)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


def measure(model, source, window: torch.Tensor, topk: int) -> tuple[list[dict], dict]:
    """One prefill of `window` in each mode (the rows), and the largest logit differences between modes."""
    length, keep = window.shape[1], min(512, window.shape[1])
    rows, logits = [], {}
    gathered, every_column = "absorbed, each query's rows gathered", "absorbed, gathered, every latent column scored"
    modes = (("mha", {"attention_mode": "mha"}), ("absorbed", {"attention_mode": "absorbed"}),
             (gathered, {"attention_mode": "absorbed"}), (every_column, {"attention_mode": "absorbed"}),
             ("dense", {"use_sparse_attention": False}))  # fmt: skip
    attention = mla_dsa.attention
    for name, settings in modes:
        settings = {"index_topk": topk, **settings}
        # the earlier forms of the package's CPU attention: each query's rows gathered (no union read once), and the
        # rope-only queries' zero latent columns scored too (as the checkpoint's own code does)
        union_pays, rope_only = attention._union_pays, attention._rope_only_queries
        if name in (gathered, every_column):
            attention._union_pays = lambda *arguments: False
        if name == every_column:
            attention._rope_only_queries = lambda module: False
        with (torch.no_grad(), restored(attention, "_union_pays", union_pays),
              restored(attention, "_rope_only_queries", rope_only)):  # fmt: skip
            model(window[:, :64], use_cache=False, **settings)  # warm-up
            start = time.perf_counter()
            logits[name] = model(window, use_cache=False, logits_to_keep=keep, **settings).logits
            rows.append({"mode": name, "length": length, "index_topk": topk,
                         "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    with torch.no_grad():
        source.eval()(window[:, :64], use_cache=False)  # warm-up
        start = time.perf_counter()
        source(window, use_cache=False, logits_to_keep=keep)
        rows.append({"mode": "source (transformers' LlamaForCausalLM)", "length": length,
                     "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    differences = {
        "length": length,
        "max_logit_difference_mha_absorbed": (logits["mha"] - logits["absorbed"]).abs().max().item(),
        "max_logit_difference_union_gathered": (logits[gathered] - logits["absorbed"]).abs().max().item(),
    }
    print(json.dumps(differences), flush=True)
    return rows, differences


if __name__ == "__main__":
    main()
