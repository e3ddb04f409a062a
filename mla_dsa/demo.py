"""`mla-dsa demo`: the whole mission on the embedded default model, on this machine, in a few minutes.

1. The embedded dense MLA model (DeepSeek-V3 architecture in miniature, byte-level, trained on the standard
   library's source) is converted to DSA with `mla-dsa convert`.
2. Its fresh indexer is measured on held-out standard-library files, then trained by the dense warm-up.
3. The result is loaded through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and measured
   again: dense vs sparse loss and recall@k at k = L/8 and L/16, decode speed dense vs sparse at a long context,
   cache bytes per token. It completes a Python prompt with DSA and plots loss ratio and recall against k.
Converted and warmed checkpoints are cached (under --out, default ~/.cache/mla-dsa/demo), so later runs take seconds.
"""

import ast
import json
import os
import textwrap
import time
from pathlib import Path

import torch

from . import __version__
from .data import fixed_windows, read_corpus, stdlib_files
from .default_model import ASSET_DIR

PROMPT = 'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n        '
# Sampling, not greedy: a small byte-level model loops under greedy decoding. Prompt and settings were chosen among
# four prompts x five settings on the share of generated lines that parse as Python (`python_lines`), 5 seeds each:
# this pair parses 94% (next best 89%; the old `def ` prompt at these settings 42%).
GENERATION = dict(max_new_tokens=320, do_sample=True, temperature=0.8, top_k=20)


def default_out_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "mla-dsa" / f"demo-{__version__}"


def run_demo(
    out_dir: str | Path | None = None,
    steps: int = 150,
    seq_len: int = 512,
    batch_size: int = 4,
    eval_windows: int = 8,
    decode_context: int = 3072,
    decode_tokens: int = 32,
    progress: bool = True,
) -> dict:
    """Runs the demo, prints its table, returns everything it measured (also written to OUT/results.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conversion.convert import convert_checkpoint
    from .training import evaluate_indexer, train_indexer

    out = Path(out_dir) if out_dir is not None else default_out_dir()
    tag = f"L{seq_len}-s{steps}-b{batch_size}-d0"
    converted, warmed = out / f"dsa-{tag}", out / f"dsa-{tag}-warm"
    ks = [seq_len // 8, seq_len // 16]
    plot_ks = sorted({max(1, seq_len // d) for d in (32, 16, 8, 4, 2)})
    windows = fixed_windows(read_corpus(stdlib_files("held_out")), eval_windows, seq_len)
    results: dict = {"seq_len": seq_len, "steps": steps, "ks": ks, "out": str(out)}
    started = time.time()

    _stage("1/5 converting the embedded dense model to DSA (mla-dsa convert)")
    if not (converted / "config.json").exists():
        # The small model's first layer spreads its attention over the whole window (no top-k covers it): it keeps
        # dense attention, DSA runs on the others (see docs/results.md, "Indexer init and dense warm-up").
        convert_checkpoint(ASSET_DIR, converted, index_topk=ks[0], dense_attention_layers=[0], overwrite=True,
                           progress=progress)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(converted)

    _stage("2/5 measuring the fresh (random) indexer on held-out stdlib files")
    fresh = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
    results["before"] = {k: evaluate_indexer(fresh, windows, index_topk=k) for k in ks}
    del fresh

    _stage(f"3/5 dense warm-up of the indexer ({steps} steps of {batch_size} x {seq_len} tokens)")
    if not (warmed / "config.json").exists():
        train_files = [str(p) for p in stdlib_files("train")]
        train_indexer(converted, "dense", train_files, warmed, steps=steps, seq_len=seq_len, batch_size=batch_size,
                      logging_steps=max(1, steps // 10), progress=progress)  # fmt: skip

    _stage("4/5 loading the result with AutoModelForCausalLM(trust_remote_code=True) and measuring it")
    model = AutoModelForCausalLM.from_pretrained(warmed, trust_remote_code=True, dtype=torch.float32).eval()
    results["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    results["after"] = {k: evaluate_indexer(model, windows, index_topk=k) for k in ks}
    results["curve"] = {k: evaluate_indexer(model, windows[:4], index_topk=k) for k in plot_ks}
    results["decode"] = _decode_speed(model, decode_context, decode_tokens)
    results["cache_bytes_per_token_per_layer"] = results["decode"].pop("bytes_per_token_per_layer")

    _stage("5/5 generating with DSA")
    results["completion"] = complete(model, tokenizer)
    parsed, lines = python_lines(results["completion"][PROMPT.rfind("\n") + 1 :])  # the generated lines only
    results["python_lines"] = {"parsed": parsed, "lines": lines}
    results["plot"] = _plot(results, out / "dsa-vs-k.png")
    results["seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(format_table(results))
    return results


@torch.no_grad()
def complete(model, tokenizer, prompt: str = PROMPT, seed: int = 0, **settings) -> str:
    """The prompt and its sampled continuation (reproducible: seeded)."""
    inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    generated = model.generate(**inputs, **{**GENERATION, **settings})
    return tokenizer.decode(generated[0], skip_special_tokens=True)


def python_lines(completion: str) -> tuple[int, int]:
    """(lines that parse as Python, complete non-blank lines) of a completion: each line is dedented and parsed on
    its own; a block header (`def f(x):`, `else:`) counts when it parses with a `pass` body after a matching opener.
    The last line is left out unless the text ends with a newline (generation stops mid-line)."""
    lines = [line for line in completion.split("\n")[:-1] if line.strip()]
    return sum(_parses(textwrap.dedent(line).strip()) for line in lines), len(lines)


def _parses(code: str) -> bool:
    for candidate in (code, f"{code} pass", f"if 1: pass\n{code} pass", f"try: pass\n{code} pass"):
        try:
            ast.parse(candidate)
            return True
        except (SyntaxError, ValueError):
            continue
    return False


def _stage(message: str) -> None:
    print(f"\n== {message}", flush=True)


@torch.no_grad()
@torch.no_grad()
def _decode_speed(model, context: int, tokens: int) -> dict:
    """ms per decoded token after a real prefill of `context` held-out tokens, dense vs DSA (top-k = L/8 of the
    warm-up length, unchanged), both on the absorbed (MQA) decode path. The two decode in alternation, step by step,
    and each reports the median of its steps after two warm-up steps: run one after the other, whatever else the
    machine did in between made the comparison noise (dense 40 / sparse 133 ms in one run, 513 / 25 in another)."""
    from .modeling.cache_mla_dsa import MlaDsaCache

    corpus = read_corpus(stdlib_files("held_out"))
    prompt = corpus[: context + tokens].long().unsqueeze(0)
    result = {"context": context, "index_topk": model.config.index_topk, "steps": tokens}
    caches, times = {}, {"dense": [], "sparse": []}
    for label, sparse in (("dense", False), ("sparse", True)):
        caches[label] = MlaDsaCache(model.config)
        model(prompt[:, :context], cache=caches[label], use_cache=True, logits_to_keep=1, use_sparse_attention=sparse)
    for step in range(tokens):
        for label, sparse in (("dense", False), ("sparse", True)):
            start = time.perf_counter()
            model(prompt[:, context + step : context + step + 1], cache=caches[label], use_cache=True,
                  use_sparse_attention=sparse)  # fmt: skip
            times[label].append(time.perf_counter() - start)
    for label, measured in times.items():
        measured = sorted(measured[2:] if len(measured) > 2 else measured)
        result[f"{label}_ms_per_token"] = 1000 * measured[len(measured) // 2]
    result["bytes_per_token_per_layer"] = caches["sparse"].bytes_per_token_per_layer()
    return result


def _plot(results: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = sorted(results["curve"])
    fig, left = plt.subplots(figsize=(6.5, 4))
    left.plot(ks, [results["curve"][k]["loss_ratio"] for k in ks], "o-", color="tab:blue")
    left.set_xscale("log", base=2)
    left.set_xlabel(f"k (tokens each query attends to, of L = {results['seq_len']})")
    left.set_ylabel("sparse / dense held-out loss", color="tab:blue")
    right = left.twinx()
    right.plot(ks, [results["curve"][k]["recall"] for k in ks], "s--", color="tab:red")
    right.set_ylabel("recall@k of the dense attention mass", color="tab:red")
    left.set_title("DSA after the dense warm-up (embedded stdlib model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def format_table(results: dict) -> str:
    seq_len = results["seq_len"]
    lines = [
        "",
        f"mla-dsa demo: embedded DeepSeek-V3-shape model, held-out stdlib files, L = {seq_len}",
        "",
        "| k | indexer | dense loss | sparse loss | sparse/dense | recall@k |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for k in results["ks"]:
        for stage, label in (("before", "fresh (random)"), ("after", f"after {results['steps']}-step warm-up")):
            row = results[stage][k]
            recall = "n/a" if row["recall"] is None else f"{row['recall']:.3f}"
            lines.append(
                f"| {k} (L/{seq_len // k}) | {label} | {row['dense_loss']:.4f} | {row['sparse_loss']:.4f} | "
                f"{row['loss_ratio']:.4f} | {recall} |"
            )
    decode = results["decode"]
    lines += [
        "",
        f"decode at {decode['context']} tokens of context: dense {decode['dense_ms_per_token']:.1f} ms/token, "
        f"sparse (k = {decode['index_topk']}) {decode['sparse_ms_per_token']:.1f} ms/token (a latent row of this tiny "
        "model is 80 numbers, so reading them all costs about what the indexer does; at DeepSeek-V3 widths see "
        "benchmarks/bench.py)",
        f"cache: {results['cache_bytes_per_token_per_layer']} bytes per token per layer (latent + indexer key, fp32)",
        f"model class: {results['model_class']}",
        "",
        "completion with DSA:",
        results["completion"],
        "",
        f"{results['python_lines']['parsed']} of the {results['python_lines']['lines']} complete generated lines parse "
        "as Python (each line on its own; a block header with a `pass` body)",
        f"plot: {results['plot'] or 'not written (pip install matplotlib)'}",
        f"artifacts: {results['out']}  ({results['seconds']:.0f} s)",
    ]
    return "\n".join(lines)


__all__ = ["complete", "format_table", "python_lines", "run_demo"]
