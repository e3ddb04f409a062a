"""LoRA fine-tuning of a DSA checkpoint on text files, with the indexer kept aligned (the paper's sparse stage).

    python examples/finetune_lora.py CKPT --data notes.txt --out lora-run [--steps 100] [--targets attention indexer]

The main model's LoRA adapters learn from the LM loss under top-k attention; the indexer's adapters learn only from
the KL to the main attention over the keys they select (the model detaches the indexer's inputs). Writes
OUT/adapter (a PEFT adapter) and OUT/merged (a full checkpoint that loads with trust_remote_code=True).
"""

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoTokenizer, TrainingArguments

from mla_dsa import MlaDsaForCausalLM
from mla_dsa.data import text_files_corpus
from mla_dsa.training import (
    IndexerTrainer,
    WindowDataset,
    indexer_lora_config,
    prepare_indexer_training,
)


def finetune(
    checkpoint: str, data: list[str], out: str, steps: int = 100, seq_len: int = 256, batch_size: int = 4,
    learning_rate: float = 1e-3, targets: tuple[str, ...] = ("attention", "mlp", "indexer"), rank: int = 8,
    progress: bool = True,
) -> Path:  # fmt: skip
    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = MlaDsaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(model, indexer_lora_config(targets=tuple(targets), r=rank))
    prepare_indexer_training(model, "sparse")
    model.print_trainable_parameters()

    corpus = text_files_corpus(data, tokenizer)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), logging_steps=10,
        save_steps=steps, report_to="none", disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=True,
    )  # fmt: skip
    dataset = WindowDataset(corpus, seq_len, steps * batch_size * max(1, args.world_size))
    IndexerTrainer(model=model, args=args, train_dataset=dataset, stage="sparse").train()

    model.save_pretrained(out / "adapter")  # the adapter alone
    base = MlaDsaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    print(f"adapter: {out / 'adapter'}\nmerged checkpoint: {out / 'merged'}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["attention", "mlp", "indexer"],
                        choices=["attention", "mlp", "indexer"])  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    finetune(args.checkpoint, args.data, args.out, args.steps, args.seq_len, args.batch_size, args.lr,
             tuple(args.targets), args.rank, not args.no_progress)  # fmt: skip
