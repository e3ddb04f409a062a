"""A sequence classifier on an MLA+DSA backbone, fine-tuned with LoRA (PEFT's SEQ_CLS task) through Trainer.

    python examples/classify_lora.py CKPT --out classifier-run [--steps 60] [--seq-len 128]

The task is small and checkable: does a window of standard-library source end a line (label 1) or stop mid-line
(label 0)? `AutoModelForSequenceClassification` builds `MlaDsaForSequenceClassification` on the checkpoint's
backbone (the score head is new); LoRA trains the attention projections, PEFT trains the score head in full. Prints
held-out accuracy before and after, and writes OUT/adapter.
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import mla_dsa  # noqa: F401  (registers the model type with the Auto classes)
from mla_dsa.data import read_corpus, stdlib_files


class LineEnds(torch.utils.data.Dataset):
    """Windows of `seq_len` bytes of standard-library source; label 1 when the window ends a line (its last byte is a
    newline), 0 when it stops mid-line. Balanced, at pseudo-random places fixed by `seed`."""

    def __init__(self, split: str, count: int, seq_len: int, seed: int):
        corpus = read_corpus(stdlib_files(split))
        generator = torch.Generator().manual_seed(seed)
        ends_line = corpus[seq_len:] == ord("\n")
        inputs, labels = [], []
        for label in (1, 0):
            candidates = (ends_line == bool(label)).nonzero().squeeze(1) + seq_len  # window end positions
            picks = candidates[torch.randint(0, len(candidates), ((count + 1) // 2,), generator=generator)]
            inputs += [corpus[end - seq_len + 1 : end + 1].long() for end in picks.tolist()]
            labels += [label] * len(picks)
        order = torch.randperm(len(labels), generator=generator)[:count]
        self.inputs, self.labels = torch.stack(inputs)[order], torch.tensor(labels)[order]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[index], "labels": self.labels[index]}


@torch.no_grad()
def accuracy(model, dataset: LineEnds) -> float:
    model.eval()
    logits = torch.cat([model(input_ids=dataset.inputs[i : i + 8]).logits for i in range(0, len(dataset), 8)])
    return (logits.argmax(-1) == dataset.labels).float().mean().item()


def main(checkpoint: str, out: str, steps: int, seq_len: int, batch_size: int, progress: bool) -> float:
    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["q_b_proj", "kv_b_proj", "o_proj"])
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    held_out = LineEnds("held_out", 32, seq_len, seed=1)
    print(f"held-out accuracy before: {accuracy(model, held_out):.3f}")
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=2e-3, warmup_steps=max(1, steps // 10), logging_steps=10, save_strategy="no",
        report_to="none", disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=LineEnds("train", steps * batch_size, seq_len, 0)).train()
    after = accuracy(model, held_out)
    print(f"held-out accuracy after: {after:.3f}")
    model.save_pretrained(out / "adapter")
    return after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    main(args.checkpoint, args.out, args.steps, args.seq_len, args.batch_size, not args.no_progress)
