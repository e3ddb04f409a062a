"""GPU day: everything only a GPU shows, in one command, within a lent H200's minutes.

    python benchmarks/gpu_day.py --out gpu-out                 # on a machine with one CUDA GPU
    python benchmarks/gpu_day.py --dry-run --out gpu-dry       # the same code at toy sizes on the CPU (the test)

Sections, each in a process of its own with a time limit (a hang, a crash or an out-of-memory in one costs only
that section; each writes its rows as it goes, so a section stopped at its limit keeps what it measured):
  env          device, versions, the command; measured copy bandwidth and bf16 matmul rate (the rooflines' ceilings)
  correctness  the embedded trained model, converted to DSA: ours on the GPU against ours on the CPU in float32, same
               weights: logits (teacher-forced over prompt + continuation) and 64 greedy tokens, for the dense and
               the DSA path, MHA and absorbed modes, and the FP8 caches. GPU float32 must give the same 64 tokens
               and logits within FP32_LOGIT_TOLERANCE; GPU bf16 is held to BF16_TOP1_AGREEMENT of the float32
               argmax over the continuation and a mean |logit difference| of BF16_LOGIT_FRACTION of the logit scale
  decode       DeepSeek-V3.2's attention geometry (`mla-dsa bench`'s v32-attention preset, bf16, k = 2048) at 4K,
               16K, 64K, 128K cached tokens, batch 1 and 16: ours eager (DSA and dense absorbed), ours compiled on the
               static cache (torch.compile mode="reduce-overhead": inductor + CUDA graphs), transformers'
               DeepseekV32 where its re-expanded cache fits; each against the HBM roofline (bytes a step must touch
               / the measured copy bandwidth)
  prefill      4K-32K tokens, ours and transformers' where it fits, against
               the compute roofline (FLOPs / the measured bf16 matmul rate), peak GPU memory
  training     one optimizer step of the dense warm-up and of the sparse stage at 8K-32K tokens (bf16 autocast over
               float32 weights, AdamW), time and peak GPU memory; gradient checkpointing where the plain step does
               not fit

Writes OUT/results.json (every figure), OUT/tables.md (the README's tables) and OUT/gpu_day.log (every section's
output): three files. Refuses in one line where torch sees no CUDA device (without --dry-run).
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_day.py` from a checkout; an installed mla_dsa comes first
    sys.path.append(str(ROOT))

# Tolerances of the correctness section (GPU against the CPU's float32, same weights).
FP32_LOGIT_TOLERANCE = 2e-3  # max |logit difference| in float32 (TF32 off): only summation order differs
BF16_TOP1_AGREEMENT = 0.95  # fraction of continuation positions whose bf16 argmax is the float32 one
BF16_LOGIT_FRACTION = 0.01  # mean |logit difference| in bf16 / max |logit| (the max is reported, not held)
CORRECTNESS_TOPK = 64  # DSA active: every query past 64 keys reads 64 of them

# Seconds per section on the GPU (the whole run within 9 minutes, the machine's start aside).
BUDGETS = {"env": 30, "decode": 150, "prefill": 45, "training": 120, "correctness": 50}
DRY_RUN_BUDGETS = {"env": 60, "decode": 240, "prefill": 120, "training": 120, "correctness": 150}

# Sizes of the real run and of the CPU dry run.
SIZES = {
    "gpu": dict(preset="v32-attention", contexts=[4096, 16384, 65536, 131072], batches=[1, 16], steps=10,
                theirs_max_tokens=262144, prefill=[4096, 8192, 16384, 32768], theirs_prefill_max=16384,
                training=[8192, 16384, 32768], prompt_tokens=512, greedy_tokens=64, calibration_steps=30),
    "dry": dict(preset="toy", contexts=[96, 160], batches=[1, 2], steps=2, theirs_max_tokens=320, prefill=[96, 160],
                theirs_prefill_max=160, training=[96], prompt_tokens=96, greedy_tokens=8, calibration_steps=3),
}  # fmt: skip
TOY_CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                  v_head_dim=32, index_n_heads=4, index_head_dim=32, index_topk=32, first_k_dense_replace=61,
                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                  max_position_embeddings=4096)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- orchestration
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json, tables.md and gpu_day.log")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: proves the script runs")
    parser.add_argument("--sections", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--no-compile", action="store_true", help="decode: eager rows and transformers' only")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child process: run one section
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return run_section(args.section, Path(args.work), args.dry_run, args.no_compile)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_day: error: torch sees no CUDA device (CPU-only torch, no GPU, or CUDA_VISIBLE_DEVICES hides it); "
              "use --dry-run to run the toy sizes on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = DRY_RUN_BUDGETS if args.dry_run else BUDGETS
    started = time.time()
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "dry_run": args.dry_run,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, open(out / "gpu_day.log", "w") as log:
        work = Path(tmp)
        for name in args.sections:
            outcome = run_child(name, work, args.dry_run, budgets[name], log, args.no_compile)
            section_file = work / f"{name}.json"
            section = json.loads(section_file.read_text()) if section_file.exists() else {}
            section["outcome"] = outcome
            results["sections"][name] = section
            print(f"gpu_day: {name}: {outcome['status']} in {outcome['seconds']:.0f} s", flush=True)
            write_results(out, results)
    results["total_seconds"] = round(time.time() - started, 1)
    write_results(out, results)
    print(f"gpu_day: wrote {out / 'results.json'}, {out / 'tables.md'}, {out / 'gpu_day.log'} "
          f"in {results['total_seconds']:.0f} s")  # fmt: skip
    return 0


def run_child(name: str, work: Path, dry_run: bool, budget: float, log, no_compile: bool = False) -> dict:
    """One section in a child process, killed at `budget` seconds; its output goes to the log (and to our stdout)."""
    command = [sys.executable, "-u", str(Path(__file__).resolve()), "--out", str(work), "--section", name,
               "--work", str(work)]  # fmt: skip
    command += (["--dry-run"] if dry_run else []) + (["--no-compile"] if no_compile else [])
    environment = dict(os.environ, GPU_DAY_DEADLINE=str(time.time() + budget - 5))
    start = time.time()
    log.write(f"\n===== {name} (limit {budget} s) =====\n")
    log.flush()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    status = "finished"
    try:
        stdout, _ = process.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, _ = process.communicate()
        status = "killed at its time limit"
    if status == "finished" and process.returncode != 0:
        status = f"failed (exit status {process.returncode})"
    log.write(stdout)
    log.flush()
    sys.stdout.write(stdout[-4000:])
    return {"status": status, "seconds": round(time.time() - start, 1)}


def write_results(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "tables.md").write_text(tables(results))


# -------------------------------------------------------------------------------------------------------- sections
class Section:
    """A section's results, written to WORK/NAME.json after every row so that a killed section keeps its rows."""

    def __init__(self, name: str, work: Path):
        self.path = work / f"{name}.json"
        self.data: dict = {"rows": [], "errors": []}
        self.deadline = float(os.environ.get("GPU_DAY_DEADLINE", time.time() + 3600))

    def left(self) -> float:
        return self.deadline - time.time()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def error(self, where: str, exc: BaseException) -> None:
        line = f"{where}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        self.data["errors"].append(line)
        print(line, flush=True)
        traceback.print_exc()
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))


def run_section(name: str, work: Path, dry_run: bool, no_compile: bool = False) -> int:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the correctness section relies on it)
    torch.backends.cudnn.allow_tf32 = False
    section = Section(name, work)
    device = torch.device("cpu" if dry_run else "cuda")
    sizes = dict(SIZES["dry" if dry_run else "gpu"], compile=not no_compile)
    try:
        SECTIONS[name](section, device, sizes, work)
    except BaseException as exc:  # noqa: BLE001 (whatever stops a section is recorded, then the next one runs)
        section.error(name, exc)
        return 1
    return 0


def env_section(section: Section, device, sizes: dict, work: Path) -> None:
    import platform

    import torch
    import transformers

    from mla_dsa.bench import device_name, measure_bandwidth, measure_gemm_flops

    data = section.data
    data.update(device=device_name(device), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), cuda=torch.version.cuda)  # fmt: skip
    try:
        import triton

        data["triton"] = triton.__version__
    except ImportError:
        data["triton"] = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        data.update(
            gpu_memory_gb=round(properties.total_memory / 2**30, 1), multiprocessors=properties.multi_processor_count
        )
    data["bandwidth_gb_s"] = measure_bandwidth(device) / 1e9
    data["bf16_matmul_tflop_s"] = (
        measure_gemm_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32) / 1e12
    )
    section.save()
    print(json.dumps(data), flush=True)


def _bench_model(work: Path, sizes: dict):
    """The benchmark checkpoint (transformers' DeepseekV32 at the preset's geometry), built once and kept in WORK."""
    import torch

    from mla_dsa.bench import PRESETS, build_model

    config = TOY_CONFIG if sizes["preset"] == "toy" else PRESETS[sizes["preset"]].config
    directory = work / "bench-model"
    if not (directory / "config.json").exists():
        build_model(directory, config, torch.bfloat16)
    return directory, config


def _measured_speeds(work: Path) -> tuple[float, float]:
    """(bytes/s, FLOP/s) from the env section, or (0, 0) where it did not run."""
    path = work / "env.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return data.get("bandwidth_gb_s", 0) * 1e9, data.get("bf16_matmul_tflop_s", 0) * 1e12


# ---- correctness: ours on the GPU against ours on the CPU in float32


def correctness_section(section: Section, device, sizes: dict, work: Path) -> None:
    import torch

    from mla_dsa import MlaDsaForCausalLM, convert_checkpoint
    from mla_dsa.data import fixed_windows, read_corpus, stdlib_files
    from mla_dsa.default_model import ASSET_DIR

    checkpoint = work / "embedded-dsa"
    if not (checkpoint / "config.json").exists():
        # A calibrated indexer (fitted to the attention on a few stdlib files): a fresh random one ranks keys almost
        # at random, with near-ties everywhere, and bf16 rounding would then reorder the selection wholesale.
        files = [str(path) for path in stdlib_files("train")[:4]]
        convert_checkpoint(ASSET_DIR, checkpoint, index_topk=CORRECTNESS_TOPK, indexer_init="calibrate",
                           calibration_data=files, calibration_steps=sizes["calibration_steps"], overwrite=True,
                           progress=False)  # fmt: skip
    prompt_tokens, greedy_tokens = sizes["prompt_tokens"], sizes["greedy_tokens"]
    prompt = fixed_windows(read_corpus(stdlib_files("held_out")), 1, prompt_tokens)[:1]
    variants = {  # name: (load options, forward/generate options)
        "dense_mha": ({}, {"use_sparse_attention": False, "attention_mode": "mha"}),
        "dense_absorbed": ({}, {"use_sparse_attention": False, "attention_mode": "absorbed"}),
        "dsa_mha": ({}, {"attention_mode": "mha"}),
        "dsa_absorbed": ({}, {"attention_mode": "absorbed"}),
        "dsa_fp8_caches": ({"latent_cache_dtype": "fp8", "indexer_cache_dtype": "fp8"}, {}),
    }
    gpu_dtypes = (torch.float32, torch.bfloat16)
    section.data["tolerances"] = dict(fp32_max_abs_logit_diff=FP32_LOGIT_TOLERANCE,
                                      bf16_top1_agreement=BF16_TOP1_AGREEMENT,
                                      bf16_mean_abs_logit_diff_fraction=BF16_LOGIT_FRACTION,
                                      greedy_tokens=greedy_tokens,
                                      prompt_tokens=prompt_tokens, index_topk=CORRECTNESS_TOPK)  # fmt: skip

    @torch.no_grad()
    def run(load: dict, options: dict, where, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        model = MlaDsaForCausalLM.from_pretrained(checkpoint, dtype=dtype, **load).to(where).eval()
        ids = prompt.to(where)
        tokens = model.generate(ids, max_new_tokens=greedy_tokens, min_new_tokens=greedy_tokens, do_sample=False,
                                **options)[:, prompt_tokens:]  # fmt: skip
        return tokens.cpu(), model

    for name, (load, options) in variants.items():
        if section.left() < 10:
            section.data["errors"].append(f"{name}: not run (section time limit)")
            break
        try:
            reference_tokens, reference = run(load, options, torch.device("cpu"), torch.float32)
            full = torch.cat([prompt, reference_tokens], dim=1)
            with torch.no_grad():
                reference_logits = reference(full, **options).logits.float()
            scale = reference_logits.abs().max().item()
            for dtype in gpu_dtypes:
                tokens, model = run(load, options, device, dtype)
                with torch.no_grad():
                    logits = model(full.to(device), **options).logits.float().cpu()
                difference = (logits - reference_logits).abs()
                continuation = slice(prompt_tokens - 1, prompt_tokens + greedy_tokens - 1)
                top1 = (logits[0, continuation].argmax(-1) == reference_logits[0, continuation].argmax(-1)).float()
                same = (tokens == reference_tokens)[0].int()
                common_prefix = int(same.cumprod(0).sum())
                row = {"variant": name, "dtype": str(dtype).removeprefix("torch."),
                       "max_abs_logit_diff": difference.max().item(), "mean_abs_logit_diff": difference.mean().item(),
                       "logit_scale": scale, "top1_agreement": top1.mean().item(),
                       "greedy_tokens_equal": int(same.sum()), "greedy_common_prefix": common_prefix}  # fmt: skip
                if dtype == torch.float32 and load:  # FP8 caches: a summation-order difference can move a value
                    # across an e4m3 rounding boundary (one step: 6 %), so the logits are held to the bf16 bar
                    row["passed"] = common_prefix == greedy_tokens and row["mean_abs_logit_diff"] <= 1e-3 * scale
                elif dtype == torch.float32:
                    row["passed"] = row["max_abs_logit_diff"] <= FP32_LOGIT_TOLERANCE and common_prefix == greedy_tokens
                else:
                    row["passed"] = (row["top1_agreement"] >= BF16_TOP1_AGREEMENT
                                     and row["mean_abs_logit_diff"] <= BF16_LOGIT_FRACTION * scale)  # fmt: skip
                section.add(row)
                del model
        except Exception as exc:  # noqa: BLE001
            section.error(name, exc)


# ---- decode at DeepSeek-V3.2's attention geometry


def decode_section(section: Section, device, sizes: dict, work: Path) -> None:
    """Eager rows (and transformers') at every (context, batch) first; then compiled rows, longest context first, while
    time is left: a static cache's buffers have fixed addresses and shapes, so every (context, batch) compiles anew."""
    import torch

    from mla_dsa.bench import (
        decode_bytes,
        decode_weight_bytes,
        load_models,
        our_cache,
        random_cache_contents,
        set_their_topk,
        their_cache,
    )

    directory, config = _bench_model(work, sizes)
    bandwidth, _ = _measured_speeds(work)
    theirs, ours = load_models(directory, device, torch.bfloat16)
    weight_bytes = decode_weight_bytes(ours)
    k = config["index_topk"]
    set_their_topk(theirs, k)
    section.data.update(index_topk=k, weight_bytes=weight_bytes, config=config)
    torch._dynamo.config.cache_size_limit = 64
    if device.type == "cpu":  # the dry run checks the graph capture (fullgraph), not CPU code generation
        compiled = torch.compile(ours.forward, fullgraph=True, backend="eager", dynamic=False)
    else:  # inductor + CUDA graphs
        # dynamic=False: a static cache's buffers are fixed, so each (context, batch) is its own graph anyway, and
        # the automatic dynamic recompile took 85 s on the second shape in the first run (a static one 5-19 s)
        compiled = torch.compile(ours.forward, fullgraph=True, mode="reduce-overhead", dynamic=False)
    steps = sizes["steps"]

    def static_cache(contents, batch: int, context: int):
        return our_cache(ours, contents, batch, max_cache_len=context + steps + 4)

    def measure(row: dict, label: str, forward, cache, **settings) -> torch.Tensor | None:
        try:
            start = time.time()
            model, graphs = (ours, compiled) if forward is compiled else (forward, None)
            row[f"{label}_ms"], logits = _time_decode(model, cache, row["context"], steps, row["batch"], graphs,
                                                      **settings)  # fmt: skip
            row[f"{label}_seconds_total"] = round(time.time() - start, 1)  # compilation included
            return logits
        except Exception as exc:  # noqa: BLE001
            section.error(f"decode {label} context={row['context']} batch={row['batch']}", exc)
            row[f"{label}_error"] = type(exc).__name__
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def rooflines(row: dict) -> None:
        if not bandwidth:
            return
        for name, sparse in (("dsa", True), ("dense", False)):
            step_bytes = decode_bytes(config, row["context"], k, sparse, weight_bytes, 2, row["batch"])
            row[f"roofline_{name}_ms"] = 1000 * step_bytes / bandwidth
        for label in ("ours_dsa_eager", "ours_dsa_compiled", "ours_dense_eager", "ours_dense_compiled"):
            if f"{label}_ms" in row:
                row[f"{label}_vs_roofline"] = row[f"{label}_ms"] / row[f"roofline_{label.split('_')[1]}_ms"]
        fastest = min(row.get("ours_dsa_eager_ms", float("inf")), row.get("ours_dsa_compiled_ms", float("inf")))
        if "theirs_ms" in row and fastest < float("inf"):
            row["speedup_vs_theirs"] = row["theirs_ms"] / fastest

    _peer_agreement_in_float32(section, directory, config, device, min(sizes["contexts"]))
    rows = {}
    for context in sizes["contexts"]:
        contents = random_cache_contents(context, config, device, torch.bfloat16)
        for batch in sizes["batches"]:
            if section.left() < 15:
                section.data["errors"].append(f"context={context} batch={batch}: not run (section time limit)")
                continue
            row = rows[context, batch] = {"context": context, "batch": batch, "index_topk": k}
            eager = measure(row, "ours_dsa_eager", ours, our_cache(ours, contents, batch), index_topk=k)
            measure(row, "ours_dense_eager", ours, our_cache(ours, contents, batch), use_sparse_attention=False)
            if context * batch <= sizes["theirs_max_tokens"]:
                their_logits = measure(row, "theirs", theirs, their_cache(theirs, contents, batch))
                if their_logits is not None and eager is not None:
                    row["theirs_vs_ours_max_abs_logit_diff"] = (their_logits - eager).abs().max().item()
                    row["logit_scale"] = their_logits.abs().max().item()
            rooflines(row)
            section.add(dict(row))
            if context == max(sizes["contexts"]) and batch == max(sizes["batches"]) and section.left() > 60:
                cache = our_cache(ours, contents, batch)
                _profile(lambda: _time_decode(ours, cache, context, 1, batch, index_topk=k),  # noqa: B023
                         device, f"eager DSA decode step, context {context}, batch {batch} (3 steps)")  # fmt: skip
                del cache
        del contents
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # Compiled: the longest context first (the goals are set there), DSA before dense, each a compilation.
    longest = max(sizes["contexts"])
    plan = (
        []
        if not sizes["compile"]
        else [(longest, batch, "dsa") for batch in sizes["batches"]] + [(longest, 1, "dense")]
    )
    plan += (
        []
        if not sizes["compile"]
        else [(context, 1, "dsa") for context in sorted(sizes["contexts"], reverse=True) if context != longest]
    )
    plan += [] if not sizes["compile"] else [(longest, batch, "dense") for batch in sizes["batches"] if batch != 1]
    contents, contents_context = None, None
    for context, batch, kind in plan:
        if section.left() < (20 if device.type == "cpu" else 60) or (context, batch) not in rows:
            section.data["errors"].append(f"compiled {kind} context={context} batch={batch}: not run (time limit)")
            continue
        if contents_context != context:
            contents, contents_context = None, None
            contents, contents_context = random_cache_contents(context, config, device, torch.bfloat16), context
        row = rows[context, batch]
        settings = {"index_topk": k} if kind == "dsa" else {"use_sparse_attention": False}
        logits = measure(row, f"ours_{kind}_compiled", compiled, static_cache(contents, batch, context), **settings)
        if logits is not None and kind == "dsa":
            eager = measure(dict(row), "eager_check", ours, our_cache(ours, contents, batch), index_topk=k)
            if eager is not None:
                row["compiled_vs_eager_max_abs_logit_diff"] = (logits - eager).abs().max().item()
        rooflines(row)
        section.data["rows"] = list(rows.values())
        section.save()
        print(json.dumps(row), flush=True)


def _peer_agreement_in_float32(section: Section, directory: Path, config: dict, device, context: int) -> None:
    """Ours against transformers' DeepseekV32 in float32 on one decode step over the same random cache: bf16 makes
    the two select different keys where index scores nearly tie, float32 must not."""
    import torch

    from mla_dsa.bench import load_models, our_cache, random_cache_contents, set_their_topk, their_cache

    try:
        theirs, ours = load_models(directory, device, torch.float32)
        k = config["index_topk"] // 2  # DSA active even where the context is 2 k
        set_their_topk(theirs, k)
        contents = random_cache_contents(context, config, device, torch.float32)
        _, mine = _time_decode(ours, our_cache(ours, contents), context, 1, 1, index_topk=k)
        _, their = _time_decode(theirs, their_cache(theirs, contents), context, 1, 1)
        section.data["float32_peer_agreement"] = {"context": context, "index_topk": k,
                                                  "max_abs_logit_diff": (mine - their).abs().max().item(),
                                                  "logit_scale": their.abs().max().item()}  # fmt: skip
        print(json.dumps(section.data["float32_peer_agreement"]), flush=True)
        del theirs, ours, contents
        _empty_cache(device)
    except Exception as exc:  # noqa: BLE001
        section.error("float32 peer agreement", exc)


def _time_decode(model, cache, context: int, steps: int, batch: int, forward=None, **settings):
    """`mla_dsa.bench.time_decode` with two warm-up steps: a compiled `forward` compiles and records its CUDA graph
    there."""
    from mla_dsa.bench import time_decode

    return time_decode(model, cache, context, steps, batch, forward=forward, warmup=2, **settings)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- prefill against the compute roofline


def prefill_section(section: Section, device, sizes: dict, work: Path) -> None:
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from mla_dsa import MlaDsaForCausalLM
    from mla_dsa.bench import prefill_flops
    from mla_dsa.loading import loading_kwargs

    directory, config = _bench_model(work, sizes)
    _, gemm_flops = _measured_speeds(work)
    k = config["index_topk"]

    @torch.no_grad()
    def one(model, length: int) -> dict:
        torch.manual_seed(0)
        ids = torch.randint(0, config["vocab_size"], (1, length)).to(device)
        model(ids[:, :256], use_cache=True, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        _synchronize(device)
        result = {"seconds": time.perf_counter() - start}
        if device.type == "cuda":
            result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return result

    ours = MlaDsaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    flops_config = DeepseekV32Config.from_pretrained(directory)  # the bench's FLOP count reads its fields
    plan = [("ours", length) for length in sizes["prefill"]]
    plan += [("theirs", length) for length in sizes["prefill"] if length <= sizes["theirs_prefill_max"]]
    theirs = None
    for which, length in plan:
        if section.left() < 10:
            section.data["errors"].append(f"{which} {length}: not run (section time limit)")
            continue
        row = {"which": which, "length": length, "index_topk": k, "flops": prefill_flops(flops_config, length, k)}
        if gemm_flops:
            row["roofline_s"] = row["flops"] / gemm_flops
        try:
            if which == "theirs" and theirs is None:
                del ours
                _empty_cache(device)
                theirs = DeepseekV32ForCausalLM.from_pretrained(directory, **loading_kwargs({"dtype": torch.bfloat16}))
                theirs = theirs.to(device).eval()
                theirs.config.index_topk = k
                for layer in theirs.model.layers:
                    layer.self_attn.indexer.index_topk = k
            row.update(one(ours if which == "ours" else theirs, length))
            if "roofline_s" in row:
                row["vs_roofline"] = row["seconds"] / row["roofline_s"]
        except Exception as exc:  # noqa: BLE001
            section.error(f"prefill {which} {length}", exc)
            row["error"] = f"{type(exc).__name__}"
            _empty_cache(device)
        section.add(row)


# ---- training steps at long context


def training_section(section: Section, device, sizes: dict, work: Path) -> None:
    """Both stages at each length, shortest first; the first step of each (stage, length) allocates the optimizer
    state, the second is timed. One dense-stage step at the shortest length is profiled (the log's table)."""
    import torch

    from mla_dsa import MlaDsaForCausalLM
    from mla_dsa.training import prepare_indexer_training

    directory, config = _bench_model(work, sizes)
    model = MlaDsaForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    checkpointing = {"dense": False, "sparse": False}
    failed = set()
    for length in sizes["training"]:
        for stage in ("dense", "sparse"):
            if section.left() < 15 or stage in failed:
                section.data["errors"].append(f"{stage} {length}: not run (time limit or a shorter one failed)")
                continue
            prepare_indexer_training(model, stage)
            parameters = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(parameters, lr=1e-5)
            row = {"stage": stage, "length": length, "trainable_parameters": sum(p.numel() for p in parameters)}
            for attempt in (True,) if checkpointing[stage] else (False, True):
                _checkpointing(model, attempt)
                row["gradient_checkpointing"] = attempt
                try:
                    row.update(_train_step(model, optimizer, stage, length, config["vocab_size"], device, autocast))
                    row.pop("error", None)
                    checkpointing[stage] = attempt
                    break
                except torch.OutOfMemoryError as exc:
                    row["error"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
                    optimizer.zero_grad(set_to_none=True)
                    _empty_cache(device)
                except Exception as exc:  # noqa: BLE001
                    section.error(f"training {stage} {length}", exc)
                    row["error"] = type(exc).__name__
                    break
            if "error" in row:
                failed.add(stage)
            section.add(row)
            if stage == "dense" and length == sizes["training"][0] and "error" not in row and section.left() > 40:
                step = functools.partial(_train_step, model, optimizer, stage, length, config["vocab_size"], device,
                                         autocast, repeats=1)  # fmt: skip
                _profile(step, device, f"dense-stage training step, {length} tokens")
            del optimizer
            _empty_cache(device)
    _checkpointing(model, False)


def _checkpointing(model, enable: bool) -> None:
    """transformers >= 5.2x names it activation checkpointing (the old name warns); older releases have only that."""
    new = getattr(model, f"activation_checkpointing_{'enable' if enable else 'disable'}", None)
    (new or getattr(model, f"gradient_checkpointing_{'enable' if enable else 'disable'}"))()


def _train_step(model, optimizer, stage: str, length: int, vocab: int, device, autocast, repeats: int = 2) -> dict:
    import torch

    from mla_dsa.indexer_loss import IndexerLoss

    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (1, length)).to(device)
    indexer_loss = IndexerLoss(model, stage).install()
    times = []
    for _ in range(repeats):  # the first step allocates the optimizer state and warms the allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        indexer_loss.reset()
        with autocast:
            sparse = stage == "sparse"
            out = model(ids, labels=ids if sparse else None, use_sparse_attention=sparse)
            loss = indexer_loss.kl + (out.loss if sparse else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    indexer_loss.remove()
    result = {"seconds": times[-1], "first_step_seconds": times[0], "loss": loss.item(),
              "indexer_kl": indexer_loss.kl.item()}  # fmt: skip
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _profile(work, device, what: str, rows: int = 15) -> None:
    """One call of `work` under torch.profiler: its most expensive ops (device time on a GPU) into the log."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        work()
        _synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"profile of one {what}:\n" + profiler.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


SECTIONS = {"env": env_section, "correctness": correctness_section, "decode": decode_section,
            "prefill": prefill_section, "training": training_section}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- tables
def _f(value, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    """Markdown lines: a header, its rule (numbers right-aligned) and one line per row."""
    rule = ["---:" if header.endswith(("(ms)", "(s)", "GB", "tokens", "batch", "context", "x")) else "---"
            for header in headers]  # fmt: skip
    return ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"] + [
        "| " + " | ".join(_f(cell) if not isinstance(cell, str) else cell for cell in row) + " |" for row in rows
    ]


def tables(results: dict) -> str:
    """The README's tables, from whatever sections ran."""
    sections = results["sections"]
    env = sections.get("env", {})
    lines = [
        f"GPU day: {env.get('device', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}"
        f", {results['date']}; copy {_f(env.get('bandwidth_gb_s'), 0)} GB/s, bf16 matmul "
        f"{_f(env.get('bf16_matmul_tflop_s'), 0)} TFLOP/s. Command: `{results['command']}`",
        "",
    ]
    for name, section in sections.items():
        status = section.get("outcome", {})
        errors = "".join(f"; {error}" for error in section.get("errors", [])[:6])
        lines.append(f"- {name}: {status.get('status', '?')} in {_f(status.get('seconds'), 0)} s{errors}")
    lines.append("")
    rows = sections.get("correctness", {}).get("rows", [])
    if rows:
        headers = ["variant", "GPU dtype", "max abs logit diff", "mean", "top-1 agreement", "greedy tokens equal",
                   "equal prefix", "passed"]  # fmt: skip
        cells = [[r["variant"], r["dtype"], r["max_abs_logit_diff"], r["mean_abs_logit_diff"], r["top1_agreement"],
                  r["greedy_tokens_equal"], r["greedy_common_prefix"], str(r["passed"])] for r in rows]  # fmt: skip
        lines += _table(headers, cells) + [""]
    rows = sections.get("decode", {}).get("rows", [])
    if rows:
        headers = ["context", "batch", "ours DSA eager (ms)", "ours DSA compiled (ms)", "ours dense eager (ms)",
                   "ours dense compiled (ms)", "transformers DeepseekV32 (ms)", "speed-up x", "roofline DSA (ms)",
                   "compiled / roofline x", "roofline dense (ms)"]  # fmt: skip
        keys = ["ours_dsa_eager_ms", "ours_dsa_compiled_ms", "ours_dense_eager_ms", "ours_dense_compiled_ms",
                "theirs_ms", "speedup_vs_theirs", "roofline_dsa_ms", "ours_dsa_compiled_vs_roofline",
                "roofline_dense_ms"]  # fmt: skip
        lines += _table(headers, [[r["context"], r["batch"]] + [r.get(key) for key in keys] for r in rows]) + [""]
    rows = sections.get("prefill", {}).get("rows", [])
    if rows:
        headers = ["prefill tokens", "implementation", "seconds (s)", "roofline (s)", "/ roofline x", "peak GPU GB"]
        keys = ["seconds", "roofline_s", "vs_roofline", "peak_gpu_gb"]
        cells = [[r["length"], r["which"] + (f" ({r['error']})" if "error" in r else "")] + [r.get(k) for k in keys]
                 for r in rows]  # fmt: skip
        lines += _table(headers, cells) + [""]
    rows = sections.get("training", {}).get("rows", [])
    if rows:
        headers = ["stage", "tokens", "gradient checkpointing", "step (s)", "peak GPU GB", "loss"]
        cells = [[r["stage"] + (f" ({r['error']})" if "error" in r else ""), r["length"],
                  str(r["gradient_checkpointing"]), r.get("seconds"), r.get("peak_gpu_gb"), r.get("loss")]
                 for r in rows]  # fmt: skip
        lines += _table(headers, cells)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
