"""Compiled decode with torchao's int8 weight-only weights against bf16 weights, same model, one process, alternating
rounds (what `TorchAoConfig(Int8WeightOnlyConfig())` gives a user of transformers; activations and caches stay bf16).

    python benchmarks/int8_decode.py --checkpoint ~/.cache/mla-dsa/long-context/mla-320 --context 4096 --threads 1

ms per decoded token after a CONTEXT-token random cache (as `mla-dsa bench`), `torch.compile(model.forward,
fullgraph=True)` with inductor's freezing; bf16 rows run their large linear layers on oneDNN (`use_onednn_linear`, as
`mla-dsa serve`). Writes benchmarks/results_int8_decode.json.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

import mla_dsa
from mla_dsa import bench


def decode_ms(checkpoint: str, context: int, steps: int, int8: bool) -> float:
    model = mla_dsa.load_checkpoint(checkpoint, dtype=torch.bfloat16).eval()
    if int8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    else:
        mla_dsa.use_onednn_linear(model)
    contents = bench.random_cache_contents(context, model.config.to_dict(), dtype=torch.bfloat16)
    cache = bench.our_cache(model, contents, max_cache_len=context + steps + 4)
    torch._dynamo.reset()
    forward = torch.compile(model.forward, fullgraph=True)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        return bench.time_decode(model, cache, context, steps, forward=forward, warmup=2,
                                 index_topk=bench.topk_for(context))[0]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results_int8_decode.json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"bf16_ms": [], "int8_weight_only_ms": []}
    for _ in range(args.rounds):
        runs["bf16_ms"].append(decode_ms(args.checkpoint, args.context, args.steps, int8=False))
        runs["int8_weight_only_ms"].append(decode_ms(args.checkpoint, args.context, args.steps, int8=True))
        print({name: f"{values[-1]:.1f}" for name, values in runs.items()}, flush=True)
    result = {"checkpoint": Path(args.checkpoint).name, "context": args.context, "threads": args.threads,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "runs": runs,
              **{name: statistics.median(values) for name, values in runs.items()}}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({name: result[name] for name in runs}))


if __name__ == "__main__":
    main()
