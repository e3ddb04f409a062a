"""One sparse prefill of SmolLM2's exact conversion in each attention mode, and dense, in one run.

    python benchmarks/prefill_modes.py [--length 8192] [--topk 1024] [--json benchmarks/results_prefill_modes.json]

A fourth row runs absorbed mode scoring the absorbed query's latent columns too, as the package's CPU attention did
before it skipped them for queries with no position-free part (this conversion's: those columns are zeros).

The conversion is long_context.py's "exact" (`python benchmarks/long_context.py --models exact` writes it); one
window of held-out text, float32, the logits of the last 512 positions. `attention_mode="auto"` picks absorbed mode for
this prefill (it is longer than `mha_max_length`); the rows say what each mode costs on this model's shapes.
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from long_context import model_dir, windows_of
from transformers import AutoTokenizer

import mla_dsa


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
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    directory = model_dir(Path(args.out), "exact")
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    window = windows_of(AutoTokenizer.from_pretrained(directory), args.length, 1)
    rows, logits = [], {}
    modes = (("mha", {"attention_mode": "mha"}), ("absorbed", {"attention_mode": "absorbed"}),
             ("absorbed, every latent column scored", {"attention_mode": "absorbed"}),
             ("dense", {"use_sparse_attention": False}))  # fmt: skip
    for name, settings in modes:
        settings = {"index_topk": args.topk, **settings}
        # the package's CPU attention scores this conversion's rope-only queries by their RoPE columns alone; the
        # third row scores the zero latent columns too, as before that (and as the checkpoint's own code does)
        rope_only = mla_dsa.attention._rope_only_queries
        if name.startswith("absorbed, every"):
            mla_dsa.attention._rope_only_queries = lambda module: False
        with torch.no_grad(), restored(mla_dsa.attention, "_rope_only_queries", rope_only):
            model(window[:, :64], use_cache=False, **settings)  # warm-up
            start = time.perf_counter()
            logits[name] = model(window, use_cache=False, logits_to_keep=512, **settings).logits
            rows.append({"mode": name, "length": args.length, "index_topk": args.topk,
                         "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    difference = (logits["mha"] - logits["absorbed"]).abs().max().item()
    print(json.dumps({"max_logit_difference_mha_absorbed": difference}))
    if args.json:
        results = {"rows": rows, "max_logit_difference_mha_absorbed": difference}
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
