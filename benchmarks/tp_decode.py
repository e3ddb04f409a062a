"""Decode speed under tensor parallelism: the bench model (`mla-dsa bench`'s) at one context, 1 process vs
`torchrun --nproc-per-node N` with `tp_plan="auto"` (CPU: gloo), measured in one run.

    python benchmarks/tp_decode.py [--context 65536] [--nproc 2] [--steps 20] [--json out.json]

Both sides decode from the same random cache contents (as `mla-dsa bench` does) with the same weights, threads split
evenly: 1 process uses all of this machine's cores, each of the N processes 1/N of them. Prints ms/token for both and
their first-step logit difference.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mla_dsa.bench import build_model, our_cache, random_cache_contents, time_decode, topk_for


def measure(model_dir: str, context: int, steps: int, tensor_parallel: bool) -> dict:
    import mla_dsa

    extra = {"tp_plan": "auto"} if tensor_parallel else {}
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra).eval()
    ms, logits = time_decode(model, our_cache(model, random_cache_contents(context)), context, steps,
                             index_topk=topk_for(context))  # fmt: skip
    return {"ms_per_token": ms, "logits": logits.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one rank of the torchrun side
        import torch.distributed as dist

        result = measure(args.worker[0], args.context, args.steps, tensor_parallel=True)
        if dist.get_rank() == 0:
            Path(args.worker[1]).write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()
        return
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model")
        torch.set_num_threads(cores)
        single = measure(str(model_dir), args.context, args.steps, tensor_parallel=False)
        out = Path(tmp) / "tp.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // args.nproc))}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(args.nproc),
            __file__,
            "--context",
            str(args.context),
            "--steps",
            str(args.steps),
            "--worker",
            str(model_dir),
            str(out),
        ]
        subprocess.run(command, env=env, check=True)
        parallel = json.loads(out.read_text())
    diff = (torch.tensor(single["logits"]) - torch.tensor(parallel["logits"])).abs().max().item()
    row = {
        "context": args.context,
        "index_topk": topk_for(args.context),
        "cores": cores,
        "nproc": args.nproc,
        "one_process_ms": single["ms_per_token"],
        "tensor_parallel_ms": parallel["ms_per_token"],
        "speedup": single["ms_per_token"] / parallel["ms_per_token"],
        "first_step_logit_max_abs_diff": diff,
    }
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
