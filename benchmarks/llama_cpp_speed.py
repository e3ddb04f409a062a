"""Decode and prefill speed against llama.cpp and transformers' DeepseekV32: the same weights, one run, 1 and 2 threads.

    python benchmarks/llama_cpp_speed.py --llama-cpp ~/llama.cpp --llama-bench ~/llama.cpp/build/bin/llama-bench \
        [--contexts 4096 16384 65536] [--prefill 4096] [--threads 1 2] [--dtypes float32 bfloat16] [--json out.json]
        [--checkpoint DIR --checkpoint-contexts 4096] [--repeats 1] [--onednn-linear [--onednn-min-weights N]]
        [--cpp-wrapper] [--inductor-gemm] [--concat-linear]

The `mla-dsa bench` small model (2 layers, hidden 1024, 16 heads, kv_lora_rank 512, 16 indexer heads x 128; top-k
256 at contexts <= 8K, 2048 beyond) is built by transformers' DeepseekV32ForCausalLM, given a byte-level tokenizer,
converted to GGUF by `mla-dsa convert ... --export gguf` (llama.cpp's converter; f32 and bf16 weights; one GGUF per
top-k, which llama.cpp reads from the file) and timed, each figure in the same process run, alternating engines:
- llama.cpp: `llama-bench -n N -d CONTEXT` (decode tokens after a CONTEXT-token prefill, its default flash attention,
  an f16 cache with f32 weights, as llama.cpp's default (llama-bench takes no f32 cache), bf16 with bf16 weights),
  `-p 4096 -n 0` for prefill; `-t` threads;
- ours: eager decode on our cache filled with random latents (as `mla-dsa bench`), `torch.compile(model.forward,
  fullgraph=True)` with `torch._inductor.config.freezing` on a static cache, and a 4K prefill forward;
  `torch.set_num_threads`; with `--onednn-linear`, float32 linear layers through oneDNN (`mla_dsa.cpu_linear`:
  on this AMD CPU, PyTorch's default MKL matrix-vector product barely uses a second core);
- transformers' DeepseekV32 up to `--theirs-max-context` (its decode re-expands the latent cache every step).
With `--checkpoint`, a DSA checkpoint of ours (e.g. SmolLM2-135M's conversion: 30 small layers, where a decode
step is many small operations rather than a few large weight reads) is timed the same way, decode only.
ms per decoded token (median) and seconds per prefill. The machine must be otherwise idle: with the other core busy,
2-thread figures of every engine degrade by 1.5-3x (OpenMP threads wait on a descheduled sibling).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import mla_dsa
from mla_dsa import bench
from mla_dsa.data import byte_tokenizer

DTYPES = {"float32": ("f32", torch.float32), "bfloat16": ("bf16", torch.bfloat16)}
# llama-bench's cache type per weight type: it takes no f32 cache (f16 is llama.cpp's default)
LLAMA_CACHE = {"float32": "f16", "bfloat16": "bf16"}


def build(tmp: Path, topks: list[int], llama_cpp: str, dtypes: list[str], source: Path | None = None,
          name: str = "bench") -> dict:  # fmt: skip
    """A model in our format per top-k, and its GGUF per (top-k, dtype): the benchmark model (built by transformers'
    DeepseekV32), or `source`, a checkpoint of ours with a tokenizer."""
    if source is None:
        source = bench.build_model(tmp / "v32")
        byte_tokenizer().save_pretrained(source)
    models = {}
    for k in topks:
        ours = mla_dsa.convert_checkpoint(source, tmp / f"{name}-k{k}", index_topk=k, progress=False)
        for dtype in dtypes:
            gguf_type = DTYPES[dtype][0]
            gguf = tmp / f"{name}-k{k}-{gguf_type}.gguf"
            models[k, dtype] = (ours, mla_dsa.convert_checkpoint(ours, gguf, export="gguf", llama_cpp=llama_cpp,
                                                                  gguf_type=gguf_type, progress=False))  # fmt: skip
    return models


def llama_bench(binary: str, gguf: Path, threads: int, dtype: str, *, depth: int = 0, prompt: int = 0,
                tokens: int = 0, repetitions: int = 2) -> float:  # fmt: skip
    """llama-bench's mean seconds per test (prefill of `prompt` or `tokens` decoded after `depth`). A decode test
    runs once after its depth's prefill, with no warm-up test (each would prefill the depth again: minutes at 16K)."""
    cache = LLAMA_CACHE[dtype]
    command = [binary, "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(tokens), "-d", str(depth),
               "-r", str(repetitions), "-ctk", cache, "-ctv", cache, "-o", "json"]  # fmt: skip
    command += ["--no-warmup"] if depth else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads(result.stdout)
    return rows[0]["avg_ns"] / 1e9


def ours_decode(model, context: int, k: int, steps: int, compiled: bool, cpp_wrapper: bool = False,
                inductor_gemm: bool = False, concat_linear: bool = False) -> float:  # fmt: skip
    dtype = next(model.parameters()).dtype
    contents = bench.random_cache_contents(context, model.config.to_dict(), dtype=dtype)
    if not compiled:
        with torch.no_grad():
            return bench.time_decode(model, bench.our_cache(model, contents), context, steps, index_topk=k)[0]
    cache = bench.our_cache(model, contents, max_cache_len=context + steps + 4)
    torch._dynamo.reset()  # a graph of its own for this context: no recompilation limit, no dynamic-shape fallback
    # cpp_wrapper: inductor calls the kernels from C++ instead of generated Python (docs/usage.md recommends it)
    forward = torch.compile(model.forward, fullgraph=True, options={"cpp_wrapper": True} if cpp_wrapper else None)
    # freezing: the weights become constants and inductor prepacks the linear layers for oneDNN (bf16 GEMVs 1.6x faster)
    # inductor_gemm: the float32 matrix products as inductor's own C++ GEMM kernels (its CPP template, chosen for
    # every product by max_autotune), in place of MKL's or oneDNN's library calls
    settings = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"} if inductor_gemm else {}
    # concat_linear: the products that read one input (q_a, kv_a and the indexer's head weights; the MLP's gate and
    # up) made one product with concatenated weights at freezing (fewer, larger calls)
    settings |= {"cpp.enable_concat_linear": True} if concat_linear else {}
    with torch.no_grad(), torch._inductor.config.patch(freezing=True, **settings):
        return bench.time_decode(model, cache, context, steps, forward=forward, warmup=2, index_topk=k)[0]


def theirs_decode(theirs, context: int, steps: int) -> float:
    contents = bench.random_cache_contents(context, dtype=next(theirs.parameters()).dtype)
    with torch.no_grad():
        return bench.time_decode(theirs, bench.their_cache(theirs, contents), context, steps)[0]


@torch.no_grad()
def prefill_seconds(model, length: int, **settings) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    model(ids[:, :256], logits_to_keep=1, **settings)
    start = time.perf_counter()
    model(ids, logits_to_keep=1, **settings)
    return time.perf_counter() - start


def decode_row(models: dict, model: str, dtype: str, threads: int, context: int, args: argparse.Namespace,
               theirs=None) -> dict:  # fmt: skip
    """One decode figure per engine at `context`: the median of `args.repeats` rounds, each round measuring the
    engines one after the other in this process (a shared VM's speed drifts by 20-40 % over minutes: a single round
    can catch one engine in a slow spell). Every round's figure is kept under `*_runs`."""
    k = bench.topk_for(context)
    ours_dir, gguf = models[k, dtype]
    ours = mla_dsa.load_checkpoint(ours_dir, dtype=DTYPES[dtype][1]).eval()
    layers = mla_dsa.use_onednn_linear(ours, args.onednn_min_weights) if args.onednn_linear else 0
    runs = {}
    for _ in range(args.repeats):
        if context <= args.llama_max_context:
            seconds = llama_bench(args.llama_bench, gguf, threads, dtype, depth=context, tokens=args.llama_tokens,
                                  repetitions=1)  # fmt: skip
            runs.setdefault("llama_cpp_ms", []).append(1000 * seconds / args.llama_tokens)
        runs.setdefault("ours_eager_ms", []).append(ours_decode(ours, context, k, args.steps, compiled=False))
        if not args.no_compile:
            ms = ours_decode(ours, context, k, args.steps, compiled=True, cpp_wrapper=args.cpp_wrapper,
                             inductor_gemm=args.inductor_gemm)  # fmt: skip
            runs.setdefault("ours_compiled_ms", []).append(ms)
            if args.concat_linear:
                ms = ours_decode(ours, context, k, args.steps, compiled=True, cpp_wrapper=args.cpp_wrapper,
                                 inductor_gemm=args.inductor_gemm, concat_linear=True)  # fmt: skip
                runs.setdefault("ours_compiled_concat_ms", []).append(ms)
        if theirs is not None and context <= args.theirs_max_context:
            bench.set_their_topk(theirs, k)
            runs.setdefault("transformers_ms", []).append(theirs_decode(theirs, context, steps=3))
    row = {"what": "decode", "model": model, "dtype": dtype, "threads": threads, "context": context, "index_topk": k}
    row |= linear_fields(args, dtype, layers) | ({"cpp_wrapper": True} if args.cpp_wrapper else {})
    row |= {"inductor_gemm": True} if args.inductor_gemm else {}
    row |= {engine: statistics.median(figures) for engine, figures in runs.items()}
    if args.repeats > 1:
        row |= {f"{engine}_runs": figures for engine, figures in runs.items()}
    if "llama_cpp_ms" in row:
        for variant in ("eager", "compiled", "compiled_concat"):
            if f"ours_{variant}_ms" in row:
                row[f"ours_{variant}_vs_llama_cpp"] = row[f"ours_{variant}_ms"] / row["llama_cpp_ms"]
    return row


def linear_fields(args: argparse.Namespace, dtype: str, layers: int) -> dict:
    """What a row records of `--onednn-linear` (float32 rows only: bfloat16 layers are on oneDNN already): the size
    rule asked for (None: `use_onednn_linear`'s by the thread count) and how many of our layers it moved."""
    if not (args.onednn_linear and dtype == "float32"):
        return {}
    return {"onednn_min_weights": args.onednn_min_weights, "onednn_layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp source directory (its converter)")
    parser.add_argument("--llama-bench", required=True, help="llama.cpp's llama-bench binary")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds per decode figure, engines alternating; the median is reported (each llama.cpp "
                        "round prefills the context again: minutes at 16K)")  # fmt: skip
    parser.add_argument("--llama-tokens", type=int, default=16, help="tokens llama-bench decodes per test")
    parser.add_argument("--theirs-max-context", type=int, default=16384)
    parser.add_argument("--llama-max-context", type=int, default=16384,
                        help="llama.cpp decode only up to this depth: its CPU prefill of the depth is nearly dense "
                        "(16K: about 3 minutes per test on 2 cores)")  # fmt: skip
    parser.add_argument("--checkpoint", default=None,
                        help="also a DSA checkpoint of ours with a tokenizer (e.g. SmolLM2-135M's conversion), "
                        "decode only, without transformers")  # fmt: skip
    parser.add_argument("--checkpoint-contexts", type=int, nargs="+", default=[4096])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="our compiled decode with inductor's C++ wrapper (cpp_wrapper=True)")  # fmt: skip
    parser.add_argument("--inductor-gemm", action="store_true",
                        help="our compiled decode with inductor's own C++ GEMM kernels for the matrix products "
                        "(max_autotune, max_autotune_gemm_backends='CPP'; compiling takes minutes)")  # fmt: skip
    parser.add_argument("--concat-linear", action="store_true",
                        help="also our compiled decode with inductor's concat_linear pass (cpp.enable_concat_linear): "
                        "products of one input as one (a column of its own, alternating with the other)")  # fmt: skip
    parser.add_argument("--onednn-linear", action="store_true",
                        help="float32 linear layers through oneDNN (mla_dsa.use_onednn_linear), ours and "
                        "transformers'")  # fmt: skip
    parser.add_argument("--onednn-min-weights", type=int, default=None,
                        help="with --onednn-linear: layers of at least this many weights (0: all; default: "
                        "use_onednn_linear's rule, every layer from 2 threads on, none on 1)")  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    topks = sorted({bench.topk_for(context) for context in [*args.contexts, *args.prefill]})
    from transformers import DeepseekV32ForCausalLM

    rows = []

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(args.json, rows)

    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp), topks, args.llama_cpp, args.dtypes)
        checkpoint_name = Path(args.checkpoint).name if args.checkpoint else None
        if args.checkpoint:
            checkpoint_topks = sorted({bench.topk_for(context) for context in args.checkpoint_contexts})
            checkpoint_models = build(Path(tmp), checkpoint_topks, args.llama_cpp, args.dtypes,
                                      source=Path(args.checkpoint), name=checkpoint_name)  # fmt: skip
        for dtype in args.dtypes:
            torch_dtype = DTYPES[dtype][1]
            for threads in args.threads:
                torch.set_num_threads(threads)  # before use_onednn_linear, whose default rule reads it
                theirs = DeepseekV32ForCausalLM.from_pretrained(Path(tmp) / "v32", dtype=torch_dtype).eval()
                if args.onednn_linear:
                    mla_dsa.use_onednn_linear(theirs, args.onednn_min_weights)
                for context in args.contexts:
                    record(decode_row(models, "bench", dtype, threads, context, args, theirs))
                for length in args.prefill:
                    k = bench.topk_for(length)
                    ours_dir, gguf = models[k, dtype]
                    ours = mla_dsa.load_checkpoint(ours_dir, dtype=torch_dtype).eval()
                    layers = mla_dsa.use_onednn_linear(ours, args.onednn_min_weights) if args.onednn_linear else 0
                    bench.set_their_topk(theirs, k)
                    row = {
                        "what": "prefill",
                        "model": "bench",
                        "dtype": dtype,
                        "threads": threads,
                        "tokens": length,
                        "index_topk": k,
                        "llama_cpp_s": llama_bench(args.llama_bench, gguf, threads, dtype, prompt=length),
                        "ours_s": prefill_seconds(ours, length),
                        "transformers_s": prefill_seconds(theirs, length),
                    }
                    row["ours_vs_llama_cpp"] = row["ours_s"] / row["llama_cpp_s"]
                    row |= linear_fields(args, dtype, layers)
                    record(row)
                if args.checkpoint:
                    for context in args.checkpoint_contexts:
                        record(decode_row(checkpoint_models, checkpoint_name, dtype, threads, context, args))


def save(path: str | None, rows: list[dict]) -> None:
    """The rows so far (a long run keeps what it measured if it stops)."""
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    if path:
        Path(path).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
