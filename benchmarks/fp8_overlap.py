"""Top-k overlap of FP8 indexer keys (Hadamard + e4m3, one scale per 128 values) with the full-precision indexer.

    python benchmarks/fp8_overlap.py CKPT [--seq-len 512] [--windows 8]

Runs held-out standard-library windows through a trained DSA checkpoint (e.g. the warmed model `mla-dsa demo`
leaves under ~/.cache/mla-dsa) with `indexer_cache_dtype="auto"` and `"fp8"` (amax and ue8m0 scales), records every
layer's top-k selection on the cache path, and prints the mean share of the full-precision top-k that FP8 keeps
(queries with at least k valid keys).
"""

import argparse
import json

import torch

import mla_dsa
from mla_dsa.data import fixed_windows, read_corpus, stdlib_files
from mla_dsa.modeling import modeling_mla_dsa


def selections(checkpoint: str, windows: torch.Tensor, **overrides) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, **overrides).eval()
    recorded, original = [], modeling_mla_dsa.select_topk

    def recording(scores, valid, k):
        indices, selected_valid = original(scores, valid, k)
        recorded.append((indices, selected_valid))
        return indices, selected_valid

    modeling_mla_dsa.select_topk = recording
    try:
        with torch.no_grad():
            for batch in windows.split(4):
                model(batch, use_cache=True)
    finally:
        modeling_mla_dsa.select_topk = original
    return recorded


def overlap(full, fp8) -> float:
    shares = []
    for (full_idx, full_valid), (fp8_idx, _) in zip(full, fp8, strict=True):
        rows = full_valid.all(-1)  # queries with at least k valid keys
        kept = (full_idx.unsqueeze(-1) == fp8_idx.unsqueeze(-2)).any(-1).float().mean(-1)
        shares.append(kept[rows])
    return torch.cat([s.flatten() for s in shares]).mean().item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    windows = fixed_windows(read_corpus(stdlib_files("held_out")), args.windows, args.seq_len)
    full = selections(args.checkpoint, windows)
    result = {
        fmt or "amax": overlap(full, selections(args.checkpoint, windows, indexer_cache_dtype="fp8",
                                                indexer_scale_fmt=fmt))
        for fmt in (None, "ue8m0")
    }  # fmt: skip
    print(json.dumps({"checkpoint": args.checkpoint, "topk_overlap": result}, indent=2))
