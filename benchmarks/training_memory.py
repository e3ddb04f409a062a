"""Peak memory and time of one training step at long context, on SmolLM2-135M-Instruct's half-cache MLA conversion.

    python benchmarks/training_memory.py [--model DIR] [--lengths 2048 4096 8192] [--stages dense sparse sparse+lora]
        [--json benchmarks/results_training_memory.json] [--append] [--gradient-checkpointing] [--lm-loss full]

Each (stage, length) runs in a fresh process: one warm-up step at 64 tokens (allocator and autograd), then one step
at L tokens of held-out standard-library text, batch 1, float32, as `mla-dsa train-indexer` takes it: the dense
warm-up (indexer only, KL to the dense attention), the sparse stage (every weight, LM loss + sparse KL) and the sparse
stage through LoRA (r = 8 on the indexer, attention and MLP); the LM loss as train-indexer computes it, a block of
tokens' logits at a time (`--lm-loss full`: the model's own, over all the logits at once). Reported: the process's
peak RSS (VmHWM) before and after the long step, its seconds, and for comparison the textbook KL loss's own tensors,
computed, not run: the
dense attention distribution [H, L, L] and the indexer's [L, L] per layer, float32, kept for backward (what the
field's recipes run out of memory on). The model is `benchmarks/long_context.py`'s `50%` conversion (R = 128), made
there when missing.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STEP = """
import json, sys, time, torch
from transformers import AutoTokenizer
from mla_dsa import MlaDsaForCausalLM
from mla_dsa.data import stdlib_files, text_files_corpus
from mla_dsa.indexer_loss import IndexerLoss
from mla_dsa.training import chunked_causal_lm_loss, indexer_lora_config, prepare_indexer_training

model_dir, stage, length, checkpointing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "checkpointing"
chunked = sys.argv[5] == "chunked"

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
ids = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=length)[:length][None]
model = MlaDsaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
train_stage = stage.removesuffix("+lora")
if stage.endswith("+lora"):
    from peft import get_peft_model
    model = get_peft_model(model, indexer_lora_config(("indexer", "attention", "mlp"), r=8))
prepare_indexer_training(model, train_stage)
if checkpointing:  # every decoder layer's activations recomputed in backward (the Trainer's flag, its new name first)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
model.train()
indexer_loss = IndexerLoss(model, train_stage).install()

def step(ids):
    indexer_loss.reset()
    sparse = train_stage == "sparse"
    if chunked:  # as train-indexer computes it: the LM loss from the final hidden states, a block of tokens at a time
        out = model(ids, use_sparse_attention=sparse, logits_to_keep=1, output_hidden_states=sparse)
        lm_loss = chunked_causal_lm_loss(model.get_output_embeddings(), out.hidden_states[-1], ids) if sparse else 0
    else:  # the model's own loss, over the whole [tokens, vocabulary] logits
        out = model(ids, labels=ids if sparse else None, use_sparse_attention=sparse)
        lm_loss = out.loss if sparse else 0
    (indexer_loss.kl + lm_loss).backward()

step(ids[:, :64])
before = peak_mb()
start = time.perf_counter()
step(ids)
print(json.dumps({"before_mb": before, "peak_mb": peak_mb(), "seconds": time.perf_counter() - start}))
"""


def textbook_kl_mb(config: dict, length: int) -> float:
    """The full-matrix KL loss's tensors, float32, kept for backward: per DSA layer the dense attention distribution
    [H, L, L] (its scores and probabilities) and the indexer's [L, L] (scores and log-probabilities)."""
    layers = config["num_hidden_layers"] - len(config.get("dense_attention_layers") or [])
    per_layer = (2 * config["num_attention_heads"] + 2) * length * length * 4
    return layers * per_layer / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/mla-dsa/long-context/mla-128"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--stages", nargs="+", default=["dense", "sparse", "sparse+lora"],
                        choices=["dense", "sparse", "sparse+lora"])  # fmt: skip
    parser.add_argument("--json", default=str(Path(__file__).parent / "results_training_memory.json"))
    parser.add_argument("--append", action="store_true", help="add rows to an existing results JSON")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each decoder layer's activations in backward")  # fmt: skip
    parser.add_argument("--lm-loss", choices=["chunked", "full"], default="chunked",
                        help="the LM loss as train-indexer computes it (chunked: a block of tokens' logits at a time), "
                             "or the model's own over the whole logits")  # fmt: skip
    args = parser.parse_args()

    model_dir, json_path = Path(args.model), Path(args.json)
    if not (model_dir / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from long_context import convert_command

        from mla_dsa.smollm2 import smollm2_checkpoint

        subprocess.run([sys.executable, "-m", "mla_dsa", *convert_command(smollm2_checkpoint(), model_dir, 128, None)],
                       check=True)  # fmt: skip
    config = json.loads((model_dir / "config.json").read_text())
    results = json.loads(json_path.read_text()) if args.append and json_path.is_file() else {"rows": []}
    results["model"] = "SmolLM2-135M-Instruct, MLA R = 128 (benchmarks/long_context.py's 50%)"
    for length in args.lengths:
        for stage in args.stages:
            start = time.perf_counter()
            checkpointing = "checkpointing" if args.gradient_checkpointing else "none"
            done = subprocess.run([sys.executable, "-c", STEP, str(model_dir), stage, str(length), checkpointing,
                                   args.lm_loss], capture_output=True, text=True)  # fmt: skip
            row = {"stage": stage, "length": length, "gradient_checkpointing": args.gradient_checkpointing,
                   "lm_loss": args.lm_loss, "textbook_kl_mb": textbook_kl_mb(config, length)}  # fmt: skip
            if done.returncode == 0:
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            row["process_s"] = time.perf_counter() - start
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            json_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
