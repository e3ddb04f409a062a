"""GQA -> MLA before any training, on SmolLM2-135M-Instruct: what each of our two conversion choices buys, against
the published alternative re-implemented on the same model, weights, calibration text and held-out windows.

    python benchmarks/gqa_ablation.py [--json benchmarks/results_gqa_ablation.json]

1. The keys that lose RoPE (every key head but the shared one): TransMLA's RoRoPE leaves their queries as they are
   (the dims just become position-free); ours multiplies each query by its head's expected rotation over its own
   attention distances (`gqa_math.decouple_rope`, `fold`).
2. The latent: TransMLA's balanced KV PCA (and CARE's activation-aware SVD) keep the principal subspace of the keys
   and values themselves; ours weights key errors by the scores they change and value errors by the output
   (`gqa_math.factor_latent`, `fit`).

Both start from the same per-frequency PCA that picks the shared RoPE key, and the same calibration statistics as
`mla-dsa convert --from-gqa` (4,096 tokens of the train split). Each variant is loaded into transformers' own
DeepseekV3ForCausalLM (dense MLA) in memory; perplexity on the held-out windows of `benchmarks/gqa_smollm2.py`.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mla_dsa.conversion.calibrate import CalibrationOptions, calibration_windows
from mla_dsa.conversion.gqa import (
    _ATTENTION,
    _LAYER_TENSORS,
    _inv_freq,
    full_rank,
    geometry_of,
    gqa_layer_stats,
    mla_config_fields,
)
from mla_dsa.conversion.gqa_math import mla_attention_weights
from mla_dsa.conversion.source import SourceCheckpoint
from mla_dsa.data import stdlib_files, text_files_corpus
from mla_dsa.demo_smollm2 import calibration_files, perplexity
from mla_dsa.loading import loading_kwargs
from mla_dsa.smollm2 import smollm2_checkpoint

SEQ_LEN = 512
VARIANTS = {  # name: (rope_fold, latent_fit)
    "TransMLA (RoRoPE + balanced KV PCA)": (False, "activation"),
    "ours: expected-rotation queries only": (True, "activation"),
    "ours: attention-weighted latent only": (False, "attention"),
    "ours (both, as `mla-dsa convert`)": (True, "attention"),
}
RANKS = {"full": 320, "50%": 128, "25%": 32}


def mla_model(source: SourceCheckpoint, stats: list, rank: int, rope_fold: bool, latent_fit: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**mla_config_fields(source.config, rank))
    top = ("model.embed_tokens.weight", "model.norm.weight")
    state = {name: source.read(name, torch.float32).float() for name in top}
    tied = config.tie_word_embeddings
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if tied else source.read("lm_head.weight").float()
    geometry, inv_freq = geometry_of(source.config), _inv_freq(source.config)
    for layer_idx, layer_stats in enumerate(stats):
        prefix = f"model.layers.{layer_idx}."
        attention = [source.read(f"{prefix}self_attn.{p}.weight", torch.float32).float() for p in _ATTENTION]
        tensors = mla_attention_weights(*attention, layer_stats, geometry, inv_freq, rank, rope_fold=rope_fold,
                                        latent_fit=latent_fit)  # fmt: skip
        state.update({prefix + "self_attn." + name: tensor for name, tensor in tensors.items()})
        state.update({prefix + name: source.read(prefix + name, torch.float32).float() for name in _LAYER_TENSORS})
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its inv_freq is a buffer no state dict holds
    return model.eval()


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config

    source_dir = smollm2_checkpoint()
    source = SourceCheckpoint(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    windows = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=args.eval_windows * SEQ_LEN)
    windows = windows.view(args.eval_windows, SEQ_LEN)
    reference = AutoModelForCausalLM.from_pretrained(source_dir, **loading_kwargs({"dtype": torch.float32})).eval()
    results = {"eval": {"windows": args.eval_windows, "seq_len": SEQ_LEN}, "source_ppl": perplexity(reference, windows),
               "models": {}}  # fmt: skip
    del reference
    print("source", results["source_ppl"], flush=True)
    calibration = CalibrationOptions(calibration_files(), tokens=4096)
    start = time.perf_counter()
    mla_config = DeepseekV3Config(**mla_config_fields(source.config, full_rank(source.config)))
    stats = [layer_stats for _, layer_stats in gqa_layer_stats(source, calibration_windows(source, mla_config,
                                                                                           calibration))]  # fmt: skip
    results["stats_s"] = time.perf_counter() - start
    for width, rank in RANKS.items():
        for name, (rope_fold, latent_fit) in VARIANTS.items():
            if width == "full" and latent_fit == "attention":
                continue  # at the full width the latent is exact whatever the fit: only the RoPE choice differs
            ppl = perplexity(mla_model(source, stats, rank, rope_fold, latent_fit), windows)
            key = f"{width} (R = {rank}): {name}"
            results["models"][key] = {"rank": rank, "rope_fold": rope_fold, "latent_fit": latent_fit, "ppl": ppl}
            print(key, f"{ppl:.3f}", f"x{ppl / results['source_ppl']:.3f}", flush=True)
    return results


def table(results: dict) -> str:
    source = results["source_ppl"]
    rows = ["| latent (of SmolLM2's 384 numbers) | variant | held-out perplexity | x source |", "|---|---|---:|---:|",
            f"| source (GQA) | | {source:.2f} | 1.000 |"]  # fmt: skip
    for key, entry in results["models"].items():
        width, name = key.split(": ", 1)
        rows.append(f"| {width} + 64 RoPE | {name} | {entry['ppl']:.2f} | {entry['ppl'] / source:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results_gqa_ablation.json")
    parser.add_argument("--eval-windows", type=int, default=12)
    parser.add_argument("--report", action="store_true", help="print the table of --json and exit")
    args = parser.parse_args()
    if not args.report:
        Path(args.json).write_text(json.dumps(run(args), indent=1) + "\n")
    print(table(json.loads(Path(args.json).read_text())))


if __name__ == "__main__":
    main()
