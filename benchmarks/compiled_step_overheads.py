"""What a compiled decode step pays outside its kernels, measured on the bench model at 4K (issue #33: ours is behind
llama.cpp at 4K, where the step is short): torch.compile's guard check before every call, and inductor's Python
wrapper around the kernels. Two A/Bs, each on a static cache filled at random:

- guards: the same compiled step with Dynamo's guards evaluated (the default) and skipped
  (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, documented as unsafe: a call whose inputs would fail a
  guard then runs the wrong graph), alternating rounds in one process;
- wrapper: the step compiled with inductor's Python wrapper (the default) and with its C++ one (`cpp_wrapper`), in
  alternating processes (two compiled versions of one forward in one process would share its guard checks).

    python benchmarks/compiled_step_overheads.py --dtypes bfloat16 float32 --threads 1 --rounds 6

Writes benchmarks/results_compiled_step_overheads.json: per row the median ms of each round (24 steps) per variant,
and whether the two wrappers gave bitwise the same logits on the first step.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import mla_dsa
from mla_dsa import bench

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
STEPS_PER_ROUND = 24
GUARDS = ("guards evaluated", "guards skipped")
WRAPPERS = ("python wrapper", "C++ wrapper")


def static_cache(model, context: int, slots: int):
    """A static cache holding `context` random rows, with `slots` free ones for the steps after them."""
    contents = bench.random_cache_contents(context, dtype=next(model.parameters()).dtype)
    return bench.our_cache(model, contents, max_cache_len=context + slots)


def alternate(variants: dict, context: int, rounds: int, topk: int, cache) -> tuple[dict, dict]:
    """({variant: [median ms of each round]}, {variant: its first step's logits}); each variant is (a compiled
    forward, a function called before its round). Every variant decodes from where the last one stopped."""
    position = context
    ids = torch.tensor([[5]])
    first_logits = {}

    def step(forward, name: str | None = None) -> float:
        nonlocal position
        start = time.perf_counter()
        out = forward(ids, position_ids=torch.tensor([[position]]), use_cache=True, cache=cache, index_topk=topk)
        position += 1
        if name is not None:
            first_logits[name] = out.logits.float()
        return time.perf_counter() - start

    for name, (forward, before) in variants.items():  # compile, and warm up
        before()
        step(forward, name)  # the first step's logits: every variant's comes from the same cache at `context`
        for _ in range(2):
            step(forward)
    results = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (forward, before) in variants.items():
            before()
            times = [step(forward) for _ in range(STEPS_PER_ROUND)]
            results[name].append(round(1000 * statistics.median(times), 3))
    torch.compiler.set_stance("default", skip_guard_eval_unsafe=False)
    return results, first_logits


def compiled_forward(model, wrapper: str):
    options = {"cpp_wrapper": True} if wrapper == "C++ wrapper" else {}
    return torch.compile(model.forward, fullgraph=True, options=options)


def run_guards(model, args) -> dict[str, list[float]]:
    """The guard A/B: one compiled step, its guards evaluated or skipped in alternate rounds (one process)."""
    compiled = compiled_forward(model, "python wrapper")
    variants = {
        "guards evaluated": (compiled, lambda: torch.compiler.set_stance("default")),
        "guards skipped": (compiled, lambda: torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)),
    }
    slots = (2 * args.rounds + 2) * STEPS_PER_ROUND
    return alternate(variants, args.context, args.rounds, 256, static_cache(model, args.context, slots))[0]


def run_wrapper(model, args) -> dict[str, list[float]]:
    """One wrapper's rounds (`args.wrapper`), in a process of its own: two compiled versions of one `forward` in one
    process would share its guard checks."""
    variants = {args.wrapper: (compiled_forward(model, args.wrapper), lambda: None)}
    slots = (args.rounds + 2) * STEPS_PER_ROUND
    results, first_logits = alternate(
        variants, args.context, args.rounds, 256, static_cache(model, args.context, slots)
    )
    # the first step's logits, for the parent to compare the wrappers' (each process fills its cache alike)
    save_file({"logits": first_logits[args.wrapper]}, args.checkpoint.parent / f"logits-{args.wrapper}.safetensors")
    return results


def measure(args) -> dict:
    """This process's measurement (`args.measure`) of one dtype and thread count on `args.checkpoint`."""
    torch.set_num_threads(args.threads[0])
    model = mla_dsa.load_checkpoint(args.checkpoint, dtype=DTYPES[args.dtypes[0]]).eval()
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        return run_guards(model, args) if args.measure == "guards" else run_wrapper(model, args)


def run(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = bench.build_model(Path(tmp) / "v32")
        checkpoint = Path(tmp) / "ours"
        mla_dsa.convert_checkpoint(source, checkpoint, index_topk=256, progress=False)

        def child(measure: str, dtype: str, threads: int, wrapper: str = "python wrapper") -> dict:
            command = [sys.executable, __file__, "--measure", measure, "--checkpoint", str(checkpoint), "--dtypes",
                       dtype, "--threads", str(threads), "--context", str(args.context), "--rounds", str(args.rounds),
                       "--wrapper", wrapper]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            return json.loads(result.stdout.strip().splitlines()[-1])

        for dtype in args.dtypes:
            for threads in args.threads:
                row = {"dtype": dtype, "threads": threads, "context": args.context, **child("guards", dtype, threads)}
                for _ in range(args.processes):  # alternating processes, each one wrapper's rounds
                    for wrapper in WRAPPERS:
                        row.setdefault(wrapper, []).extend(child("wrapper", dtype, threads, wrapper)[wrapper])
                logits = [load_file(checkpoint.parent / f"logits-{name}.safetensors")["logits"] for name in WRAPPERS]
                row["wrappers_bitwise_equal"] = torch.equal(*logits)  # the same kernels, called from C++
                row["medians"] = {name: statistics.median(row[name]) for name in (*GUARDS, *WRAPPERS)}
                print(json.dumps(row["medians"] | {"dtype": dtype, "threads": threads}), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--processes", type=int, default=3, help="processes per wrapper, alternating")
    parser.add_argument("--measure", choices=["guards", "wrapper"], help=argparse.SUPPRESS)  # a child process's part
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--wrapper", default="python wrapper", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results_compiled_step_overheads.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    rows = run(args)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    args.out.write_text(json.dumps({"machine": machine, "command": " ".join(["python", *sys.argv]), "rows": rows},
                                   indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
