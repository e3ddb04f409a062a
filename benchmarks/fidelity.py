"""The whole DSA recipe on the embedded model, every layer sparse: indexer init -> dense warm-up -> sparse stage.

    python benchmarks/fidelity.py [--out DIR] [--json benchmarks/results_fidelity.json] [--sparse-steps 300]

1. Init: the embedded dense model (transformers' DeepseekV3ForCausalLM trained on the stdlib's train split) converted
   with each indexer init: `random` (the paper's), `svd`, `calibrate` (4,096 tokens of train-split text). Timed.
2. Dense warm-up of the calibrated indexer (`train-indexer --stage dense`).
3. Sparse stage from the warm-up, adapting the model to top-k attention: fully and through LoRA, at k = L/8 and
   L/16, and for each method a dense control: the same steps, data and method with dense attention, so that the
   ratio measures what sparse attention costs, not what more training gains. An evaluation every --curve-every steps.

Every number is on held-out standard-library files (never used for calibration or training): loss ratio (sparse loss
over a dense model's loss), recall@k and captured KL (1 - KL / KL_uniform) of `mla-dsa eval`. Then k/L small, as in
real use: the embedded model was trained at L <= 512 and its dense loss collapses past it (2.1 nats/byte on positions
512-1023), so its longest supported context is 512, evaluated at k = 16 and 8 (L/32, L/64); and, beyond what it was
trained for, L = 4096 at k = 64. `--reuse JSON` recomputes only these checks from the checkpoints left in --out.
Prints markdown tables and writes JSON.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import mla_dsa
from mla_dsa.data import fixed_windows, read_corpus, stdlib_files
from mla_dsa.default_model import ASSET_DIR
from mla_dsa.training import evaluate_indexer, load_trained, train_indexer

SEQ_LEN = 512
KS = (SEQ_LEN // 8, SEQ_LEN // 16)
LONG_CONTEXT = 4096  # the embedded model's max_position_embeddings (it was trained at L <= 512)
SMALL_KS = (SEQ_LEN // 32, SEQ_LEN // 64)


class CurveCallback(TrainerCallback):
    """Evaluates the model under training every `every` steps (at its k, on the curve windows)."""

    def __init__(self, windows: torch.Tensor, k: int, every: int, source: torch.nn.Module):
        self.windows, self.k, self.every, self.source, self.points = windows, k, every, source, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            result = evaluate_indexer(model, self.windows, index_topk=self.k, source=self.source)
            self.points.append({"step": state.global_step, **_short(result)})


def _short(result: dict) -> dict:
    keep = ("dense_loss", "sparse_loss", "source_dense_loss", "loss_ratio", "recall", "captured_kl", "kl")
    return {name: result[name] for name in keep if name in result}


def run(args) -> dict:
    out = Path(args.out)
    held_out = read_corpus(stdlib_files("held_out"))
    windows = fixed_windows(held_out, args.eval_windows, SEQ_LEN)
    curve_windows = windows[:: max(1, args.eval_windows // args.curve_windows)][: args.curve_windows]
    train_files = [str(p) for p in stdlib_files("train")]
    calibration_files = train_files[: args.calibration_files]
    source = AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=torch.float32).eval()

    def evaluate(model, ks=KS):
        return {str(k): _short(evaluate_indexer(model, windows, index_topk=k, source=source)) for k in ks}

    results = {"seq_len": SEQ_LEN, "eval_windows": args.eval_windows, "inits": {}, "sparse": {}, "long": {},
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "json", "report")}}  # fmt: skip
    for init in args.inits:
        extra = {"calibration_data": calibration_files} if init == "calibrate" else {}
        start = time.time()
        converted = mla_dsa.convert_checkpoint(ASSET_DIR, out / f"init-{init}", indexer_init=init, index_topk=KS[0],
                                               indexer_types=args.indexer_types, overwrite=True, progress=False,
                                               **extra)  # fmt: skip
        seconds = time.time() - start
        results["inits"][init] = {"convert_seconds": seconds, "eval": evaluate(load_trained(converted))}
        print(init, json.dumps(results["inits"][init]), flush=True)

    start = time.time()
    warm = train_indexer(out / "init-calibrate", "dense", train_files, out / "warm", steps=args.warmup_steps,
                         seq_len=SEQ_LEN, progress=False)  # fmt: skip
    results["warmup"] = {
        "steps": args.warmup_steps,
        "seconds": time.time() - start,
        "eval": evaluate(load_trained(warm)),
    }
    print("warm-up", json.dumps(results["warmup"]), flush=True)

    for method in args.methods:
        lora = {"lora_rank": args.lora_rank} if method == "lora" else {}
        lr = args.lora_lr if method == "lora" else args.lr
        runs = [("control", KS[0])] + [(f"sparse k={k}", k) for k in KS]
        for name, k in runs:
            curve = CurveCallback(curve_windows, k, args.curve_every, source)
            start = time.time()
            trained = train_indexer(warm, "sparse", train_files, out / f"{method}-{name.replace(' ', '')}",
                                    steps=args.sparse_steps, seq_len=SEQ_LEN, learning_rate=lr, index_topk=k,
                                    dense_control=name == "control", callbacks=[curve], progress=False,
                                    lr_scheduler=args.lr_scheduler,
                                    **lora)  # fmt: skip
            seconds = time.time() - start
            model = load_trained(trained)
            results["sparse"][f"{method} {name}"] = {"method": method, "k": k, "lr": lr, "steps": args.sparse_steps,
                                                     "seconds": seconds, "eval": evaluate(model),
                                                     "curve": curve.points}  # fmt: skip
            print(method, name, json.dumps(results["sparse"][f"{method} {name}"]["eval"]), flush=True)
    results["long"] = context_checks(out, args, source, windows, held_out)
    return results


def context_checks(out: Path, args, source, windows: torch.Tensor, held_out: torch.Tensor) -> dict:
    """k/L small: at L = 512 with k = L/32 and L/64, and at L = 4096 with k = 64, for the calibrated init, the
    warm-up, and each method's control and sparse stage trained at the smallest k (checkpoints in `out`)."""
    long_windows = fixed_windows(held_out, args.long_windows, LONG_CONTEXT)
    checkpoints = {"init calibrate": out / "init-calibrate", "warm-up": out / "warm"}
    for method in args.methods:
        checkpoints[f"{method} control"] = out / f"{method}-control"
        checkpoints[f"{method} sparse k={KS[-1]}"] = out / f"{method}-sparsek={KS[-1]}"
    checks = {}
    for name, path in checkpoints.items():
        model = load_trained(path)
        for k in SMALL_KS:
            checks[f"{name} | {SEQ_LEN} | {k}"] = _short(evaluate_indexer(model, windows, index_topk=k, source=source))
        checks[f"{name} | {LONG_CONTEXT} | {KS[0]}"] = _short(
            evaluate_indexer(model, long_windows, index_topk=KS[0], batch_size=1, source=source)
        )
        print("context check", name, flush=True)
    return checks


def tables(results: dict) -> str:
    lines = ["| stage | k | sparse/source dense | sparse/control dense | recall@k | captured KL |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for init, row in results["inits"].items():
        for k, e in row["eval"].items():
            lines.append(
                f"| init {init} | {k} | {e['loss_ratio']:.4f} | | {e['recall']:.3f} | {e['captured_kl']:.3f} |"
            )
    for k, e in results["warmup"]["eval"].items():
        lines.append(f"| calibrate + {results['warmup']['steps']}-step warm-up | {k} | {e['loss_ratio']:.4f} | | "
                     f"{e['recall']:.3f} | {e['captured_kl']:.3f} |")  # fmt: skip
    for name, row in results["sparse"].items():
        if "control" in name:
            continue
        method, k = row["method"], str(row["k"])
        control = results["sparse"][f"{method} control"]["eval"][k]
        e = row["eval"][k]
        lines.append(
            f"| + sparse stage ({method}, {row['steps']} steps) | {k} | {e['loss_ratio']:.4f} | "
            f"{e['sparse_loss'] / control['dense_loss']:.4f} | {e['recall']:.3f} | {e['captured_kl']:.3f} |"
        )
    return "\n".join(lines)


def curve_table(results: dict) -> str:
    """Sparse loss of each sparse-stage run over its method's dense control, step by step (the curve windows)."""
    runs = {name: row for name, row in results["sparse"].items() if "control" not in name}
    lines = ["| step | tokens | " + " | ".join(runs) + " |", "|---:|---:|" + "---:|" * len(runs)]
    controls = {row["method"]: {p["step"]: p["dense_loss"] for p in results["sparse"][f"{row['method']} control"]
                                ["curve"]} for row in runs.values()}  # fmt: skip
    tokens_per_step = 4 * results["seq_len"]
    for step in sorted({p["step"] for row in runs.values() for p in row["curve"]}):
        cells = []
        for row in runs.values():
            point = next((p for p in row["curve"] if p["step"] == step), None)
            cells.append(f"{point['sparse_loss'] / controls[row['method']][step]:.4f}" if point else "")
        lines.append(f"| {step} | {step * tokens_per_step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_table(results: dict) -> str:
    lines = ["| model | L | k | dense loss | sparse loss | sparse/source dense | sparse/own dense | recall@k | "
             "captured KL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in results["long"].items():
        lines.append(
            f"| {name} | {e['dense_loss']:.4f} | {e['sparse_loss']:.4f} | {e['loss_ratio']:.4f} | "
            f"{e['sparse_loss'] / e['dense_loss']:.4f} | {e['recall']:.3f} | {e['captured_kl']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="keep the checkpoints here (default: a temporary directory)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--inits", nargs="+", default=["random", "svd", "calibrate"])
    parser.add_argument("--calibration-files", type=int, default=40, help="first N train-split files (>= 4096 tokens)")
    parser.add_argument("--indexer-types", default=None, help="a shared top-k pattern (FSSS: one indexer in 4)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--sparse-steps", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--lr", type=float, default=1e-4, help="sparse stage, full fine-tuning")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="sparse stage, LoRA")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lr-scheduler", default="constant_with_warmup", help="the sparse stage's LR schedule")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--curve-windows", type=int, default=8)
    parser.add_argument("--curve-every", type=int, default=50)
    parser.add_argument("--long-windows", type=int, default=4)
    parser.add_argument("--report", default=None, help="only print the tables of an earlier run's JSON")
    parser.add_argument("--reuse", default=None, help="an earlier run's JSON: redo only the context checks, from "
                        "the checkpoints it left in --out")  # fmt: skip
    args = parser.parse_args()
    if args.report:
        results = json.loads(Path(args.report).read_text())
    elif args.reuse:
        results = json.loads(Path(args.reuse).read_text())
        held_out = read_corpus(stdlib_files("held_out"))
        source = AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=torch.float32).eval()
        windows = fixed_windows(held_out, args.eval_windows, SEQ_LEN)
        results["long"] = context_checks(Path(args.out), args, source, windows, held_out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            args.out = args.out or tmp
            results = run(args)
    print(tables(results), curve_table(results), long_table(results), sep="\n\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
