"""MoE layer speed, ours (per-expert modules, DeepSeek's checkpoint layout) vs transformers' DeepseekV3MoE (fused 3D
expert tensors), same weights, in one run: 64 routed experts, top-6, one shared expert, 2048 tokens.

    python benchmarks/moe_speed.py [--tokens 2048] [--hidden 1024] [--intermediate 512] [--repeats 7] [--json out.json]

Median seconds per forward of the MoE block alone (router included), and the max |output difference|.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import mla_dsa


def timed(module, hidden: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = module(hidden)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(hidden)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    attention = dict(num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=None,
                     qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)  # fmt: skip
    moe = dict(moe_intermediate_size=args.intermediate, first_k_dense_replace=0, n_routed_experts=64,
               num_experts_per_tok=6, n_shared_experts=1, n_group=1, topk_group=1)  # fmt: skip
    config = DeepseekV3Config(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_hidden_layers=1, **attention, **moe)  # fmt: skip
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = DeepseekV3ForCausalLM(config).eval()
        with torch.no_grad():
            for param in theirs.parameters():
                param.normal_(0, 0.02)
        theirs.save_pretrained(tmp)
        ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    hidden = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    their_s, their_out = timed(theirs.model.layers[0].mlp, hidden, args.repeats)
    our_s, our_out = timed(ours.model.layers[0].mlp, hidden, args.repeats)
    row = {
        "tokens": args.tokens,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "experts": 64,
        "top_k": 6,
        "threads": torch.get_num_threads(),
        "ours_s": our_s,
        "transformers_s": their_s,
        "ours_vs_transformers": our_s / their_s,
        "output_max_abs_diff": (our_out - their_out).abs().max().item(),
    }
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
