"""The embedded default: a small dense MLA model of DeepSeek-V3 architecture, byte-level, trained on the Python
standard library's source with transformers' own `DeepseekV3ForCausalLM`.

It is what `mla-dsa demo`, the indexer-training tests and the benchmarks convert to DSA. The trained weights ship in
`mla_dsa/assets/stdlib-v3-dense/`; `python benchmarks/train_default_model.py` reproduces them.
"""

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import BOS_ID, EOS_ID, PAD_ID, byte_tokenizer, fixed_windows, random_windows, read_corpus, stdlib_files

ASSET_DIR = Path(__file__).parent / "assets" / "stdlib-v3-dense"

# DeepSeek-V3's shape in miniature: query and KV compression, decoupled RoPE, a dense first layer, then MoE with
# sigmoid routing over expert groups. 8 attention heads; the converter grafts 8 indexer heads of 32 dims.
DEFAULT_CONFIG = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=1.0,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)


def default_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**DEFAULT_CONFIG)


# Sequence-length warm-up: most steps on short windows (attention is cheap there, so ~1.7x the tokens per second on
# 2 CPU cores), then long ones so the model knows every position up to the L = 512 it is evaluated and warmed at.
# Compute-optimal for a ~2.7M-parameter model is tens of millions of tokens; 8000 x 8 x 256 + 2000 x 4 x 512 is 20M.
DEFAULT_PHASES = ((8000, 256, 8), (2000, 512, 4))  # (steps, seq_len, batch_size)


def pretrain_default_model(
    out_dir: str | Path,
    phases: tuple[tuple[int, int, int], ...] = DEFAULT_PHASES,
    learning_rate: float = 3e-3,
    seed: int = 0,
    eval_windows: int = 32,
    progress: bool = True,
) -> dict:
    """Trains the default dense model from scratch on the stdlib's train split, saves it with its tokenizer, and
    returns its held-out loss (nats per byte, at the longest phase's length) with the training settings."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    corpus = read_corpus(stdlib_files("train"))
    model = DeepseekV3ForCausalLM(default_config())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    steps = sum(phase[0] for phase in phases)
    warmup = max(1, steps // 50)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(total=steps, desc="pretraining the default dense model", disable=not progress)
    start = time.time()
    for phase_steps, seq_len, batch_size in phases:
        for _ in range(phase_steps):
            batch = random_windows(corpus, batch_size, seq_len, generator)
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(L=seq_len, loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    eval_len = max(phase[1] for phase in phases)
    result = {
        "phases": [list(phase) for phase in phases],
        "learning_rate": learning_rate,
        "seed": seed,
        "train_tokens": sum(s * L * b for s, L, b in phases),
        "train_seconds": round(time.time() - start),
        "held_out_seq_len": eval_len,
        "held_out_loss_nats_per_byte": held_out_loss(model, eval_len, eval_windows),
    }
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)
    loss = result["held_out_loss_nats_per_byte"]
    print(f"trained {steps} steps in {result['train_seconds']} s; held-out loss {loss:.4f} nats/byte at L = {eval_len};"
          f" saved to {out_dir}")  # fmt: skip
    return result


@torch.no_grad()
def held_out_loss(model, seq_len: int = 512, windows: int = 32) -> float:
    """Mean next-byte loss (nats/byte) on `windows` fixed windows of the held-out stdlib files."""
    batch = fixed_windows(read_corpus(stdlib_files("held_out")), windows, seq_len)
    losses = [model(row[None], labels=row[None]).loss.item() for row in batch]
    return sum(losses) / len(losses)


__all__ = ["ASSET_DIR", "DEFAULT_CONFIG", "DEFAULT_PHASES", "default_config", "held_out_loss", "pretrain_default_model"]
