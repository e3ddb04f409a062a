"""Float32 linear layers on the CPU: PyTorch's default (MKL) against oneDNN (`mla_dsa.use_onednn_linear`), one run.

    python benchmarks/onednn_linear.py [--threads 1 2] [--contexts 4096 16384] [--checkpoint DIR] [--json out.json]

1. One product per shape (the bench model's and SmolLM2's projections, SmolLM2's LM head) at 1, 4 and 256 rows:
   `F.linear` (MKL), MKL's packed product (what inductor's freezing turns a float32 `nn.Linear` into; 1 and 4 rows)
   and oneDNN's (`torch.ops.mkldnn._linear_pointwise`), ms each, and the weight bytes read per ms for one row.
2. A decode step of the `mla-dsa bench` model (float32, our cache filled with random latents) and, with
   `--checkpoint`, of a checkpoint of ours at 4K, eager and compiled (`torch.compile(fullgraph=True)` on a static
   cache under inductor's freezing, as `llama_cpp_speed.py`): the model as loaded, with its layers of 2 M weights
   and more on oneDNN, and with every layer on oneDNN.
Each figure per thread count in the same process, alternating. The machine must be otherwise idle.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mla_dsa
from mla_dsa import bench

sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_speed import ours_decode  # noqa: E402

SHAPES = {"bench q_b_proj": (8192, 1024), "bench o_proj": (1024, 2048), "SmolLM2 MLP up": (1536, 576),
          "SmolLM2 MLP down": (576, 1536), "SmolLM2 LM head": (49152, 576)}  # fmt: skip


def ms_per_call(function, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return 1000 * (time.perf_counter() - start) / calls


def product_ms(x: torch.Tensor, weight: torch.Tensor) -> dict:
    """ms of `x @ weight.T` by F.linear, oneDNN's product and, for decode-sized batches, MKL's packed one (packing
    the 49,152 x 576 LM head for 256 rows crashed torch 2.14.1's MKL here)."""
    calls, transposed = (200 if x.shape[0] < 64 else 10), weight.t()
    times = {"f_linear_ms": ms_per_call(lambda: F.linear(x, weight), calls),
             "onednn_ms": ms_per_call(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
                                      calls)}  # fmt: skip
    if x.shape[0] <= 4:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(transposed, x.shape[0])
        times["mkl_packed_ms"] = ms_per_call(lambda: torch.ops.mkl._mkl_linear(x, packed, transposed, None,
                                                                               x.shape[0]), calls)  # fmt: skip
    return times


@torch.no_grad()
def product_rows(threads: int) -> list[dict]:
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features)
        for batch in (1, 4, 256):
            row = {"what": "product", "shape": name, "out": out_features, "in": in_features, "rows": batch,
                   "threads": threads, **product_ms(torch.randn(batch, in_features), weight)}  # fmt: skip
            if batch == 1:
                megabytes = weight.numel() * weight.element_size() / 1e6
                row |= {f"{engine}_gb_s": megabytes / row[f"{engine}_ms"]
                        for engine in ("f_linear", "mkl_packed", "onednn")}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# The model as loaded; layers of 2 M weights and more on oneDNN (`use_onednn_linear`'s rule before it read the thread
# count); every layer on oneDNN (its rule from two threads on).
VARIANTS = {"default": None, "onednn": 1 << 21, "onednn_all": 0}


def decode_row(name: str, checkpoint: Path, threads: int, context: int, k: int) -> dict:
    row = {"what": "decode", "model": name, "threads": threads, "context": context, "index_topk": k}
    for variant, minimum in VARIANTS.items():
        model = mla_dsa.load_checkpoint(checkpoint, dtype=torch.float32).eval()
        if minimum is not None:
            row[f"{variant}_layers"] = mla_dsa.use_onednn_linear(model, min_weight_elements=minimum)
        row[f"{variant}_eager_ms"] = ours_decode(model, context, k, 10, compiled=False)
        row[f"{variant}_compiled_ms"] = ours_decode(model, context, k, 10, compiled=True)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--checkpoint", default=None, help="also a checkpoint of ours (e.g. SmolLM2's mla-320), 4K")
    parser.add_argument("--json", default="benchmarks/results_onednn_linear.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = bench.build_model(Path(tmp) / "v32")
        checkpoints = {k: mla_dsa.convert_checkpoint(source, Path(tmp) / f"k{k}", index_topk=k, progress=False)
                       for k in sorted({bench.topk_for(context) for context in args.contexts})}  # fmt: skip
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows += product_rows(threads)
            for context in args.contexts:
                rows.append(decode_row("bench", checkpoints[bench.topk_for(context)], threads, context,
                                       bench.topk_for(context)))  # fmt: skip
            if args.checkpoint:
                rows.append(decode_row(Path(args.checkpoint).name, Path(args.checkpoint), threads, 4096, 256))
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "command": "python benchmarks/onednn_linear.py " + " ".join(sys.argv[1:])}  # fmt: skip
    Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
