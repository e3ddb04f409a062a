"""Long context, measured: SmolLM2-135M-Instruct (context 8,192) and its MLA conversions, dense and DSA, at 2K-8K.

    python benchmarks/long_context.py [--out DIR] [--json benchmarks/results_long_context.json]
        [--lengths 2048 4096 8192] [--windows 2] [--topk 256 512 1024 2048] [--models full 50%]
        [--no-decode | --decode-only [--compile | --rounds N] [--onednn-linear] | --lookup [--lookup-windows N]
        [--oracle]] [--no-source] [--append] [--table]

Held-out data: the standard library's held-out files (never used for calibration or training), whole files one
after another, so long-range structure (a module's names, imports, repeated code) exists. Each window of L tokens is
L - 64 tokens of that text followed by a copy of its first 64 tokens: one forward gives both measures.
- perplexity of the text part (next-token loss over its L - 64 tokens);
- retrieval: the copied span, seen L - 64 tokens back. Its second occurrence is scored teacher-forced from its 9th
  token on (the first 8 tell the model which span it is): mean NLL per token, top-1 accuracy, and exact match (every
  one of those tokens the argmax, which is what greedy decoding from there would reproduce).
- lookup (`--lookup`, rows of their own): after the text, one probe per depth (5 % to 98 % of the text back): 24
  tokens that occur once in the text, then the 8 that followed them there; answered when all 8 are the argmax, and
  its margin (the answer's smallest logit lead) says how near a tie that was. `--lookup-windows N`: N windows of
  consecutive held-out text, 8 N probes, each DSA row compared probe by probe with its own dense row. `--oracle`:
  rows instead whose layers select the k keys their own dense attention weighs most (what any shared top-k keeps).
Rows: the source (transformers' LlamaForCausalLM), each conversion (`mla-dsa convert --kv-lora-rank R --indexer-init
calibrate`, R = 320: the source's full key/value width; R = 128: half the cache) run densely, and DSA at each k < L.
Each row gives its seconds per window on this machine. With decode: ms per token at the longest context, the source
through transformers' cache against ours, dense and DSA; with `--rounds N` instead, the source's
fastest decode (eager) against ours compiled with DSA, each prefilled once, then N rounds of decode steps alternating
between them (one round's figures moved by up to 20 % on this VM). Results JSON is rewritten after every row.
"""

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from mla_dsa.data import stdlib_files, text_files_corpus
from mla_dsa.demo_smollm2 import calibration_files
from mla_dsa.loading import loading_kwargs
from mla_dsa.modeling.modeling_mla_dsa import CACHE_NAME, TopkSelection, select_topk
from mla_dsa.smollm2 import smollm2_checkpoint

SPAN = 64  # tokens copied from a window's start to its end
SKIP = 8  # the copy's first tokens, not scored: they tell the model which span is being repeated
# name: (kv_lora_rank, indexer heads x head dim or None for the converter's default, 9 x 128 here, qk_rope_head_dim).
# The source caches 2 x 3 KV heads x 64 = 384 numbers per token and layer; R = 320 (+ 64 RoPE) is that width, R = 128
# half of it: both with a RoPE key of one head (64), the only choice of earlier releases. "exact" is what `mla-dsa
# convert` writes by default now: a RoPE key of all 3 heads (192), the latent holding the values alone (192), 384.
# A fourth number is the calibration window (the indexer's fit; default 512 tokens, 4,096 tokens in all).
MODELS = {
    "exact": (192, (4, 192), 192),
    "exact, indexer fit at 2K": (192, (4, 192), 192, 2048),
    "exact, 9x192 indexer": (192, (9, 192), 192),  # one indexer head per attention head
    "full": (320, None, 64),
    "50%": (128, None, 64),
    "50%, 2 RoPE heads": (64, None, 128),  # the same 192 numbers: two heads' rotations kept, the latent 64 wide
    "full, 4x64 indexer": (320, (4, 64), 64),
}
HEAL_512 = ["--stage", "sparse", "--dense-control", "--lora", "16", "--steps", "220", "--batch-size", "2", "--seq-len",
            "512", "--lr", "5e-4", "--lr-scheduler", "cosine", "--save-steps", "50"]  # fmt: skip
WARM_UP_512 = ["--stage", "dense", "--steps", "40", "--batch-size", "2", "--seq-len", "512"]
# the same two stages continued on 2,048-token sequences (65,536 tokens: 29 % of the 512-token healing's)
HEAL_2K = ["--stage", "sparse", "--dense-control", "--lora", "16", "--steps", "32", "--batch-size", "1", "--seq-len",
           "2048", "--lr", "3e-4", "--lr-scheduler", "cosine", "--save-steps", "8"]  # fmt: skip
WARM_UP_2K = ["--stage", "dense", "--steps", "8", "--batch-size", "1", "--seq-len", "2048"]
# Conversions trained further: name: (the model it starts from, a conversion or a model trained before it, `mla-dsa
# train-indexer` options). The training text is train-split standard-library files (`training_files()`), never the
# held-out text the rows measure.
TRAINED = {
    "exact, 9x192 indexer, dense warm-up 2K": ("exact, 9x192 indexer",
                                              ["--stage", "dense", "--seq-len", "2048", "--steps", "16", "--bf16"]),
    # as many steps and tokens as the 2K row (train-indexer's batch is 4), at the length the lookup measures; a
    # batch of 4 x 4K tokens took more than this machine's 24 GB
    "exact, 9x192 indexer, dense warm-up 4K": ("exact, 9x192 indexer",
                                              ["--stage", "dense", "--seq-len", "4096", "--batch-size", "2",
                                               "--steps", "16", "--bf16"]),
    # the README's 512-token healing of the half cache (benchmarks/gqa_smollm2.py: LoRA under the sparse stage's dense
    # control, then the indexer's dense warm-up), on code
    "50%, healed at 512": ("50%", HEAL_512),
    "50%, healed at 512, warmed": ("50%, healed at 512", WARM_UP_512),
    "50%, healed at 512, then 2K": ("50%, healed at 512, warmed", HEAL_2K),
    "50%, healed at 512, then 2K, warmed": ("50%, healed at 512, then 2K", WARM_UP_2K),
}  # fmt: skip
# The lookup task: CUE tokens of the text that occur there once, asked again after the text, then the ANSWER tokens
# that followed them; one probe per depth (a fraction of the text back), all in one window. A shorter cue (8) is
# answered by SmolLM2 itself at 1 depth in 8 at 2K: 24 tell it which passage is meant.
CUE, ANSWER = 24, 8
DEPTHS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.98)
LOGIT_CHUNK = 1024  # positions per LM-head chunk (SmolLM2's vocabulary is 49,152: 8K positions at once is 1.6 GB)
DECODE_STEPS = 8


def convert_command(source: Path, dst: Path, rank: int, indexer: tuple[int, int] | None, rope: int,
                    window: int = 512) -> list[str]:  # fmt: skip
    """The conversion each model row names (as gqa_smollm2.py converts): calibrated on train-split files."""
    shape = ["--index-n-heads", str(indexer[0]), "--index-head-dim", str(indexer[1])] if indexer else []
    shape += ["--qk-rope-head-dim", str(rope)] if rope != 64 else []
    shape += ["--calibration-seq-len", str(window)] if window != 512 else []
    tokens = str(max(4096, 4 * window))
    return ["convert", str(source), str(dst), "--kv-lora-rank", str(rank), *shape, "--indexer-init", "calibrate",
            "--calibration-data", *calibration_files(), "--calibration-tokens", tokens, "--calibration-steps", "40",
            "--index-topk", "64", "--overwrite", "--no-progress"]  # fmt: skip


def training_files() -> list[str]:
    """Train-split standard-library files for `TRAINED` (every 7th, from the second: mostly not the calibration's)."""
    return [str(path) for path in stdlib_files("train")[1::7]]


def conversion_of(name: str) -> str:
    """The `MODELS` conversion a (possibly trained) model starts from."""
    return conversion_of(TRAINED[name][0]) if name in TRAINED else name


def model_dir(out: Path, name: str) -> Path:
    if name in TRAINED:
        base, options = TRAINED[name]
        base_dir, trained = model_dir(out, base), "-".join(part.lstrip("-") for part in options)
        if len(base_dir.name) + len(trained) > 200:  # a chain's names outgrow a file name (255 bytes)
            trained = hashlib.sha1(f"{base_dir.name}-{trained}".encode()).hexdigest()[:12]
        return base_dir.with_name(base_dir.name + "-" + trained)
    rank, indexer, rope, *window = MODELS[name]
    return out / (f"mla-{rank}" + (f"-rope-{rope}" if rope != 64 else "")
                  + (f"-indexer-{indexer[0]}x{indexer[1]}" if indexer else "")
                  + (f"-cal{window[0]}" if window else ""))  # fmt: skip


def windows_of(tokenizer, length: int, count: int) -> torch.Tensor:
    """[count, length]: consecutive stretches of held-out text, each ending with a copy of its own first SPAN."""
    corpus = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=count * (length - SPAN))
    text = corpus[: count * (length - SPAN)].view(count, length - SPAN)
    return torch.cat([text, text[:, :SPAN]], dim=1)


def lookup_window(tokenizer, length: int, index: int = 0) -> tuple[torch.Tensor, list[int], int]:
    """[length]: held-out text (the `index`-th stretch of `length` tokens), then one probe per depth (its cue, then its
    answer). Returns the window, each probe's depth in tokens back from the end of the text, and where the probes
    start."""
    probes_len = len(DEPTHS) * (CUE + ANSWER)
    corpus = text_files_corpus(stdlib_files("held_out"), tokenizer, max_tokens=(index + 1) * length)
    text = corpus[index * length : (index + 1) * length - probes_len]
    cues = [tuple(text[start : start + CUE].tolist()) for start in range(len(text) - CUE + 1)]
    unique = {cue for cue, count in Counter(cues).items() if count == 1}  # a cue that names one passage only
    last = len(text) - CUE - ANSWER
    probes, depths = [], []
    for depth in DEPTHS:
        wanted = min(int(len(text) * (1 - depth)), last)
        start = next(start for start in [*range(wanted, last + 1), *range(wanted)] if cues[start] in unique)
        probes.append(text[start : start + CUE + ANSWER])
        depths.append(len(text) - start)
    return torch.cat([text, *probes]), depths, len(text)


@torch.no_grad()
def measure_lookup(model, window: torch.Tensor, depths: list[int], probes_start: int, **settings) -> dict:
    """Per probe (depth): the answer's NLL per token, whether every answer token is the argmax (what greedy decoding
    after the cue would write), and its margin: the smallest lead, over its tokens, of the answer's logit over the
    best other token's (negative where it is not answered; a small positive one is a near-tie a perturbation flips)."""
    start = time.perf_counter()
    hidden = model.model(window[None], **settings).last_hidden_state[0]  # [L, hidden]
    probes = []
    for index, depth in enumerate(depths):
        answer = probes_start + index * (CUE + ANSWER) + CUE  # the answer's first position
        logits = model.lm_head(hidden[answer - 1 : answer - 1 + ANSWER]).float()  # predictions of its tokens
        wanted = window[answer : answer + ANSWER]
        others = logits.scatter(-1, wanted[:, None], float("-inf")).amax(-1)
        margin = (logits.gather(-1, wanted[:, None])[:, 0] - others).min().item()
        probes.append({"depth": depth, "nll": torch.nn.functional.cross_entropy(logits, wanted).item(),
                       "exact": bool((logits.argmax(-1) == wanted).all()), "margin": margin})  # fmt: skip
    return {
        "lookup": probes,
        "lookup_exact": sum(p["exact"] for p in probes),
        "lookup_nll": sum(p["nll"] for p in probes) / len(probes),
        "seconds": time.perf_counter() - start,
    }


@contextmanager
def oracle_selection(model):
    """Within it, every indexer of `model` (ours) selects not by its index scores but the k keys with the most dense
    attention mass: the layer's own softmax probabilities, summed over heads, in the same forward. What the best top-k
    shared by a layer's heads keeps, whatever the indexer: a diagnostic, for forwards without a cache (it builds the
    [B, H, L, L] probabilities per layer)."""

    def oracle(attention, hidden_states, query_latent, position_embeddings, keys, visible, top_k) -> TopkSelection:
        if keys.shape[1] != hidden_states.shape[1]:
            raise ValueError("the oracle selection is for forwards without a cache")
        _, q_nope, q_rope, latent = attention.project(hidden_states, position_embeddings)
        _, probs = attention._mha_attention(q_nope, q_rope, latent, visible, None, return_weights=True)
        mass = probs.float().sum(1)  # [B, S, T]
        return TopkSelection(*select_topk(mass, visible.mask(0, mass.shape[1]).expand_as(mass), top_k))

    indexers = [(layer.self_attn, layer.self_attn.indexer) for layer in model.model.layers]
    indexers = [(attention, indexer) for attention, indexer in indexers if indexer is not None]
    for attention, indexer in indexers:
        indexer.forward = lambda *args, attention=attention: oracle(attention, *args)
    try:
        yield model
    finally:
        for _, indexer in indexers:
            del indexer.forward  # the class's again


@torch.no_grad()
def measure(model, windows: torch.Tensor, **settings) -> dict:
    """Perplexity of the text part, the copy's NLL / top-1 / exact match, seconds per window."""
    text_nll, copy_nll, copy_top1, exact, seconds = [], [], [], [], []
    for window in windows:
        start = time.perf_counter()
        hidden = model.model(window[None], **settings).last_hidden_state[0]  # [L, hidden]
        targets = window[1:]
        losses, correct = [], []
        for chunk in range(0, len(targets), LOGIT_CHUNK):
            logits = model.lm_head(hidden[chunk : chunk + LOGIT_CHUNK]).float()[: len(targets) - chunk]
            wanted = targets[chunk : chunk + len(logits)]
            losses.append(torch.nn.functional.cross_entropy(logits, wanted, reduction="none"))
            correct.append(logits.argmax(-1) == wanted)
        seconds.append(time.perf_counter() - start)
        losses, correct = torch.cat(losses), torch.cat(correct)
        text = len(window) - SPAN - 1  # predictions of text tokens 1 .. L - SPAN - 1
        copy = slice(len(window) - SPAN - 1 + SKIP, len(window) - 1)  # predictions of the copy's tokens SKIP ..
        text_nll.append(losses[:text].mean().item())
        copy_nll.append(losses[copy].mean().item())
        copy_top1.append(correct[copy].float().mean().item())
        exact.append(bool(correct[copy].all()))
    return {"ppl": float(torch.tensor(text_nll).mean().exp()), "copy_nll": sum(copy_nll) / len(copy_nll),
            "copy_top1": sum(copy_top1) / len(copy_top1), "copy_exact": sum(exact) / len(exact),
            "seconds_per_window": sum(seconds) / len(seconds)}  # fmt: skip


@torch.no_grad()
def decode_ms(model, window: torch.Tensor, cache, **settings) -> dict:
    """Prefill `window` but its last DECODE_STEPS tokens into `cache`, then decode those one at a time: seconds of
    the prefill and the median ms per decoded token."""
    context = len(window) - DECODE_STEPS
    start = time.perf_counter()
    model(window[None, :context], use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache}, **settings)
    prefill = time.perf_counter() - start
    times = []
    for t in range(context, len(window)):
        start = time.perf_counter()
        model(window[None, t : t + 1], use_cache=True, **{CACHE_NAME: cache}, **settings)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"context": context, "prefill_s": prefill, "decode_ms": 1000 * times[len(times) // 2]}


@torch.no_grad()
def compiled_decode_ms(model, window: torch.Tensor, **settings) -> dict:
    """As `decode_ms`, on a static cache (transformers' `StaticCache`: its own layers for the source, ours for ours)
    with the decode step `torch.compile(model.forward, fullgraph=True)` under inductor's freezing, the way the README
    compiles ours; the prefill runs eager. Its first DECODE_STEPS // 2 steps compile (untimed); the median of the
    rest. Each model compiles its own graph (`torch._dynamo.reset()` first)."""
    from transformers import StaticCache

    context = len(window) - DECODE_STEPS
    cache = StaticCache(config=model.config, max_cache_len=len(window))
    start = time.perf_counter()
    model(window[None, :context], use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache}, **settings)
    prefill = time.perf_counter() - start
    torch._dynamo.reset()
    forward = torch.compile(model.forward, fullgraph=True)
    times = []
    with torch._inductor.config.patch(freezing=True):
        for t in range(context, len(window)):
            # cache_position as generate() passes it: without it transformers' model asks the static cache its length
            positions = {"position_ids": torch.tensor([[t]]), "cache_position": torch.tensor([t])}
            start = time.perf_counter()
            forward(window[None, t : t + 1], **positions, use_cache=True, **{CACHE_NAME: cache}, **settings)
            times.append(time.perf_counter() - start)
    times = sorted(times[DECODE_STEPS // 2 :])
    return {"context": context, "prefill_s": prefill, "decode_ms": 1000 * times[len(times) // 2], "compiled": True}


@torch.no_grad()
def alternating_decode_ms(source, model, window: torch.Tensor, rounds: int, **settings) -> list[dict]:
    """The source's decode eager on transformers' DynamicCache against ours compiled on a static cache (as
    `compiled_decode_ms`), both prefilled once (eager), then `rounds` rounds alternating between them, each timing
    the window's last DECODE_STEPS tokens from the same cache state (the caches are cut back to the prefill after
    each round; a round that predicts other tokens than the first raises). Ours compiles in an untimed round first.
    One row per model: every round's median, their median, and the greedy next token of each step."""
    from transformers import DynamicCache, StaticCache

    context = len(window) - DECODE_STEPS
    source_cache = DynamicCache(config=source.config)
    static_cache = StaticCache(config=model.config, max_cache_len=len(window))
    prefill = {}
    for name, engine, cache, options in (("source", source, source_cache, {}), ("ours", model, static_cache, settings)):
        start = time.perf_counter()
        engine(window[None, :context], use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache}, **options)
        prefill[name] = time.perf_counter() - start
    torch._dynamo.reset()
    forward = torch.compile(model.forward, fullgraph=True)

    def source_round() -> tuple[float, list[int]]:
        times, tokens = [], []
        for t in range(context, len(window)):
            start = time.perf_counter()
            logits = source(window[None, t : t + 1], use_cache=True, **{CACHE_NAME: source_cache}).logits
            times.append(time.perf_counter() - start)
            tokens.append(int(logits[0, -1].argmax()))
        source_cache.crop(-DECODE_STEPS)  # the tokens this round added
        return 1000 * sorted(times)[len(times) // 2], tokens

    def ours_round() -> tuple[float, list[int]]:
        times, tokens = [], []
        for t in range(context, len(window)):
            positions = {"position_ids": torch.tensor([[t]]), "cache_position": torch.tensor([t])}
            start = time.perf_counter()
            logits = forward(window[None, t : t + 1], **positions, use_cache=True, **{CACHE_NAME: static_cache},
                             **settings).logits  # fmt: skip
            times.append(time.perf_counter() - start)
            tokens.append(int(logits[0, -1].argmax()))
        for layer in static_cache.layers:  # back to the prefill: the same rows are written again next round
            layer.cumulative_length.fill_(context)
            layer.indexer_cumulative_length.fill_(context)
        return 1000 * sorted(times)[len(times) // 2], tokens

    medians: dict[str, list[float]] = {"source": [], "ours": []}
    with torch._inductor.config.patch(freezing=True):
        predicted = {"ours": ours_round()[1]}  # compiles
        for _ in range(rounds):
            for name, decode_round in (("source", source_round), ("ours", ours_round)):
                ms, tokens = decode_round()
                medians[name].append(ms)
                if predicted.setdefault(name, tokens) != tokens:  # every round decodes from the same state
                    raise RuntimeError(f"{name}: a round predicted {tokens}, the first {predicted[name]}")
    rows = []
    for name in ("source", "ours"):
        ms = sorted(medians[name])
        rows.append({"context": context, "prefill_s": prefill[name], "decode_ms": ms[len(ms) // 2],
                     "round_ms": medians[name], "compiled": name == "ours", "alternating": True,
                     "next_tokens": predicted[name]})  # fmt: skip
    return rows


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from mla_dsa import MlaDsaCache, MlaDsaForCausalLM, use_onednn_linear

    out, json_path = Path(args.out), Path(args.json)
    out.mkdir(parents=True, exist_ok=True)
    source_dir = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    results: dict = {"lengths": args.lengths, "windows": args.windows, "span": SPAN, "skip": SKIP,
                     "threads": torch.get_num_threads(), "models": {}, "rows": [], "decode": []}  # fmt: skip
    if args.append and json_path.is_file():  # a later run adds its rows to an earlier one's
        results = json.loads(json_path.read_text())

    def save(row: dict | None = None, rows: str = "rows") -> None:
        if row is not None:  # a row measured again replaces the earlier one
            results[rows] = [old for old in results.get(rows, []) if _row_key(old) != _row_key(row)] + [row]
            print(json.dumps(row), flush=True)
        json_path.write_text(json.dumps(results, indent=1) + "\n")

    converted = {}
    for name in args.models:
        if name in TRAINED:  # trained below, from a conversion made by an earlier run
            continue
        dst, (rank, indexer, rope, *window) = model_dir(out, name), MODELS[name]
        command = convert_command(source_dir, dst, rank, indexer, rope, *window)
        entry = results["models"].setdefault(name, {"rank": rank})
        if not (dst / "config.json").is_file():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mla_dsa", *command], check=True)
            entry["convert_s"] = time.perf_counter() - start
        entry["command"] = "mla-dsa " + " ".join(
            command[:1] + ["SMOLLM2", "DST"] + [part for part in command[3:] if not part.endswith(".py")]
        )  # the calibration files: calibration_files()
        converted[name] = dst

    def train(name: str) -> Path:  # a trained model, after the one it starts from (a run made earlier keeps it)
        base, options = TRAINED[name]
        base_dir, dst = model_dir(out, base), model_dir(out, name)
        if base in TRAINED:
            train(base)
        elif not (base_dir / "config.json").is_file():
            raise SystemExit(f"{name!r} trains {base!r}: run its conversion first (--models {base!r})")
        # a Trainer checkpoint every 5 steps (unless the options say): a stopped run resumes from it when run again
        resume = ["--resume"] if any((dst / "checkpoints").glob("checkpoint-*")) else ["--overwrite"]
        command = ["train-indexer", str(base_dir), "--data", *training_files(), "--out", str(dst), "--save-steps", "5",
                   *options, *resume, "--no-progress"]  # fmt: skip
        entry = results["models"].setdefault(name, {"rank": MODELS[conversion_of(name)][0]})
        if not (dst / "config.json").is_file():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mla_dsa", *command], check=True)
            entry["train_s"] = time.perf_counter() - start
        entry["command"] = f"mla-dsa train-indexer {base!r} --data training_files() --out DST " + " ".join(
            ["--save-steps", "5", *options])  # fmt: skip
        return dst

    for name in [name for name in args.models if name in TRAINED]:
        converted[name] = train(name)
    save()

    source = AutoModelForCausalLM.from_pretrained(source_dir, **loading_kwargs({"dtype": torch.float32})).eval()
    ours = {name: MlaDsaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval() for name, dst in converted.items()}
    onednn_layers = 0
    if args.onednn_linear:  # every model's float32 layers on oneDNN (mla_dsa.cpu_linear's rule): the source's too
        for model in [source, *ours.values()]:
            onednn_layers += use_onednn_linear(model)
    if args.lookup:  # the lookup task's rows, instead of perplexity and the copy
        for length in args.lengths:
            windows = [lookup_window(tokenizer, length, index) for index in range(args.lookup_windows)]
            rows = [("source", None, source, {})] if not (args.no_source or args.oracle) else []
            for name, model in ours.items():
                if args.oracle:  # compared with the dense rows of an earlier run
                    rows += [(name, "oracle", model, {"index_topk": k}) for k in args.topk if k < length]
                    continue
                rows.append((name, "dense", model, {"use_sparse_attention": False}))
                rows += [(name, "dsa", model, {"index_topk": k}) for k in args.topk if k < length]
            for name, attention, model, settings in rows:
                with oracle_selection(model) if attention == "oracle" else nullcontext():
                    measured = [measure_lookup(model, *window, **settings) for window in windows]
                probes = [
                    {"window": index, "depth_fraction": DEPTHS[order], **probe}
                    for index, one in enumerate(measured)
                    for order, probe in enumerate(one["lookup"])
                ]
                save({"model": name, "attention": attention, "index_topk": settings.get("index_topk"),
                      "length": length, "lookup_windows": len(windows), "lookup": probes,
                      "lookup_exact": sum(probe["exact"] for probe in probes),
                      "lookup_nll": sum(probe["nll"] for probe in probes) / len(probes),
                      "seconds": sum(one["seconds"] for one in measured)}, rows="lookup")  # fmt: skip
        return results
    for length in [] if args.decode_only else args.lengths:
        windows = windows_of(tokenizer, length, args.windows)
        if not args.no_source:
            save({"model": "source", "length": length, **measure(source, windows)})
        for name, model in ours.items():
            save({"model": name, "attention": "dense", "length": length,
                  **measure(model, windows, use_sparse_attention=False)})  # fmt: skip
            for k in [k for k in args.topk if k < length]:
                save({"model": name, "attention": "dsa", "index_topk": k, "length": length,
                      **measure(model, windows, index_topk=k)})  # fmt: skip
    if not args.no_decode:
        results["decode"] = []  # one run's rows: compared with one another only
        window = windows_of(tokenizer, max(args.lengths), 1)[0]
        linear = {"onednn_layers": onednn_layers} if args.onednn_linear else {}
        if args.rounds:
            for name, model in ours.items():
                settings = {"index_topk": max(args.lengths) // 8}
                source_row, ours_row = alternating_decode_ms(source, model, window, args.rounds, **settings)
                results["decode"].append({"model": "source", **linear, **source_row})
                results["decode"].append({"model": name, "attention": "dsa", **settings, **linear, **ours_row})
                save()
                print(json.dumps(results["decode"][-2:]), flush=True)
            return results
        if not args.no_source:
            results["decode"].append({"model": "source", **linear,
                                      **decode_ms(source, window, DynamicCache(config=source.config))})  # fmt: skip
            if args.compile:
                results["decode"].append({"model": "source", **linear, **compiled_decode_ms(source, window)})
            save()
        for name, model in ours.items():
            k = max(args.lengths) // 8
            for attention, settings in (("dense", {"use_sparse_attention": False}), ("dsa", {"index_topk": k})):
                entries = [{"model": name, "attention": attention, **settings, **linear,
                            **decode_ms(model, window, MlaDsaCache(model.config), **settings)}]  # fmt: skip
                if args.compile:
                    entries.append({"model": name, "attention": attention, **settings, **linear,
                                    **compiled_decode_ms(model, window, **settings)})  # fmt: skip
                for entry in entries:
                    results["decode"].append(entry)
                    print(json.dumps(entry), flush=True)
                save()
    return results


def _row_key(row: dict) -> tuple:
    return row["model"], row.get("attention"), row.get("index_topk"), row["length"], row.get("lookup_windows", 1)


def table(results: dict) -> str:
    """Markdown: per length, each model and attention with perplexity (x the source), the copy's NLL / top-1 / exact
    match, and seconds per window; then the decode rows. The command of each model row is in `results["models"]`."""
    source = {row["length"]: row for row in results["rows"] if row["model"] == "source"}
    lines = ["| tokens | model | attention | perplexity | x source | copy NLL | copy top-1 | copy exact | s / window |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    latest = {_row_key(row): row for row in results["rows"]}  # runs before rows replaced their repeats
    order = {name: index for index, name in enumerate(["source", *MODELS, *TRAINED])}
    for row in sorted(latest.values(), key=lambda row: (row["length"], order.get(row["model"], len(order)),
                                                         row.get("index_topk") or 0)):  # fmt: skip
        attention = "" if row["model"] == "source" else row["attention"]
        if attention == "dsa":
            attention = f"DSA, k = {row['index_topk']}"
        ratio = row["ppl"] / source[row["length"]]["ppl"] if row["length"] in source else float("nan")
        lines.append(f"| {row['length']:,} | {row['model']} | {attention} | {row['ppl']:.3f} | {ratio:.3f} "
                     f"| {row['copy_nll']:.3f} | {row['copy_top1']:.3f} | {row['copy_exact']:.0%} "
                     f"| {row['seconds_per_window']:.1f} |")  # fmt: skip
    single = [row for row in results.get("lookup", []) if row.get("lookup_windows", 1) == 1]
    several = [row for row in results.get("lookup", []) if row.get("lookup_windows", 1) > 1]
    if single:
        lines += ["", "| tokens | model | attention | answered | answer NLL | NLL by depth (tokens back; * answered) |",
                  "|---:|---|---|---:|---:|---|"]  # fmt: skip
        for row in sorted(single, key=lambda row: (row["length"], order.get(row["model"], len(order)),
                                                   row.get("index_topk") or 0)):  # fmt: skip
            attention = f"DSA, k = {row['index_topk']}" if row["attention"] == "dsa" else (row["attention"] or "")
            depths = ", ".join(f"{p['depth']:,}: {p['nll']:.2f}" + (" *" if p["exact"] else "") for p in row["lookup"])
            lines.append(f"| {row['length']:,} | {row['model']} | {attention} | {row['lookup_exact']} of "
                         f"{len(row['lookup'])} | {row['lookup_nll']:.3f} | {depths} |")  # fmt: skip
    if several:
        lines += ["", lookup_table(several, order)]
    if results.get("decode"):
        lines += ["", "| model | attention | context | prefill (s) | decode (ms / token) |", "|---|---|---:|---:|---:|"]
        for row in results["decode"]:
            attention = row.get("attention", "")
            if "index_topk" in row:
                attention += f", k = {row['index_topk']}"
            if row.get("compiled"):
                attention += (", " if attention else "") + "compiled, static cache"
            if row.get("alternating"):
                attention += (", " if attention else "") + f"median of {len(row['round_ms'])} alternating rounds"
            if row.get("onednn_layers") or "onednn_min_weights" in row:  # older rows: the size rule they ran
                attention += (", " if attention else "") + "oneDNN linear"
            lines.append(f"| {row['model']} | {attention} | {row['context']:,} | {row['prefill_s']:.1f} "
                         f"| {row['decode_ms']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def lookup_table(rows: list[dict], order: dict[str, int]) -> str:
    """Markdown for lookup rows over several windows: probes answered in all and per depth (a fraction of the text
    back), and for DSA against its own dense row on the same probes: how many of dense's answers it keeps, the dense
    margins of those it loses (in nats: how near a tie dense's answer was), and how many it answers that dense does
    not."""
    lines = ["| tokens | model | attention | answered | answer NLL | answered by depth (5 % ... 98 % back) "
             "| of dense's answers kept | dense margins of the lost | answered, dense not |",
             "|---:|---|---|---:|---:|---|---:|---|---:|"]  # fmt: skip
    dense = {(row["model"], row["length"]): row for row in rows if row["attention"] == "dense"}
    for row in sorted(rows, key=lambda row: (row["length"], order.get(row["model"], len(order)),
                                             row.get("index_topk") or 0)):  # fmt: skip
        attention = row["attention"] or ""
        if row["attention"] in ("dsa", "oracle"):
            attention = f"{'DSA' if row['attention'] == 'dsa' else 'oracle top-k'}, k = {row['index_topk']}"
        per_depth = [sum(p["exact"] for p in row["lookup"] if p["depth_fraction"] == d) for d in DEPTHS]
        kept = lost = gained = ""
        reference = dense.get((row["model"], row["length"]))
        if row["attention"] in ("dsa", "oracle") and reference is not None:
            pairs = list(zip(reference["lookup"], row["lookup"], strict=True))
            answered = [(ref, probe) for ref, probe in pairs if ref["exact"]]
            kept = f"{sum(probe['exact'] for _, probe in answered)} of {len(answered)}"
            lost = ", ".join(f"{ref['margin']:.2f}" for ref, probe in answered if not probe["exact"]) or "none"
            gained = str(sum(probe["exact"] and not ref["exact"] for ref, probe in pairs))
        lines.append(f"| {row['length']:,} | {row['model']} | {attention} | {row['lookup_exact']} of "
                     f"{len(row['lookup'])} | {row['lookup_nll']:.3f} | {' / '.join(map(str, per_depth))} "
                     f"| {kept} | {lost} | {gained} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "mla-dsa" / "long-context"))
    parser.add_argument("--json", default="benchmarks/results_long_context.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--topk", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--models", nargs="+", choices=[*MODELS, *TRAINED], default=list(MODELS))
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="only the decode rows (at the longest --lengths)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode rows also on static caches with torch.compile (freezing), source and ours",
    )
    parser.add_argument(
        "--onednn-linear",
        action="store_true",
        help="every model's float32 linear layers through oneDNN (mla_dsa.use_onednn_linear)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="the source's eager decode against ours compiled (DSA), N rounds alternating (instead of the decode rows)",
    )
    parser.add_argument("--lookup", action="store_true", help="the lookup task's rows (cue -> answer at 8 depths)")
    parser.add_argument(
        "--lookup-windows",
        type=int,
        default=1,
        help="lookup windows per row (consecutive stretches of held-out text, 8 probes each)",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="only the lookup rows of the oracle selection (each layer's k keys of most dense attention mass)",
    )
    parser.add_argument("--no-source", action="store_true", help="skip the source's rows (measured in an earlier run)")
    parser.add_argument("--append", action="store_true", help="add the rows to the results JSON instead of replacing")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --json and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.json).read_text())))
        return
    print(table(run(args)))


if __name__ == "__main__":
    main()
