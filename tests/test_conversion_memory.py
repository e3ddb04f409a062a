"""`mla-dsa convert` streams: its peak memory is the interpreter's plus a few shards, not the checkpoint's size.

A deepseek_v3-format checkpoint of ~500 MB in ~20 MB shards is written tensor by tensor (no model is built); the CLI
converts it in its own process, and the peak resident set size of that process (getrusage of a waited-for child) is
compared with the same measure for a process that only imports torch and mla_dsa.
"""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from checkpoints import INDEX_NAME, synthetic_v3_config, weight_map, write_synthetic_checkpoint

SHARD_BYTES = 20_000_000
SHARDS_OF_HEADROOM = 5
MEASURE = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def measured(*command: str) -> subprocess.Popen:
    """Runs `command` under a tiny parent that reports the child's peak RSS when it exits."""
    return subprocess.Popen([sys.executable, "-c", MEASURE, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def peak_rss_bytes(process: subprocess.Popen) -> int:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return int(re.search(r"MAXRSS_KB (\d+)", out).group(1)) * 1024


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
def test_peak_memory_is_a_few_shards_above_the_interpreter(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    baseline_process = measured(sys.executable, "-c", "import torch, mla_dsa")
    config = synthetic_v3_config()
    info = write_synthetic_checkpoint(src, config, shard_bytes=SHARD_BYTES)
    baseline = peak_rss_bytes(baseline_process)

    largest, total = info["largest"], info["total"]
    bound = baseline + SHARDS_OF_HEADROOM * largest
    assert info["shards"] >= 20 and total >= 400e6
    assert SHARDS_OF_HEADROOM * largest <= total / 4, "the bound must be far below the checkpoint size"

    peak = peak_rss_bytes(measured(sys.executable, "-m", "mla_dsa", "convert", str(src), str(dst), "--no-progress"))
    mb = 1e6
    print(
        f"\nconversion peak RSS {peak / mb:.0f} MB; interpreter baseline {baseline / mb:.0f} MB; "
        f"largest shard {largest / mb:.1f} MB x {info['shards']} shards = {total / mb:.0f} MB; "
        f"bound {bound / mb:.0f} MB; above baseline {(peak - baseline) / mb:.0f} MB"
    )
    assert peak < bound, f"peak {peak / mb:.0f} MB >= baseline {baseline / mb:.0f} MB + {SHARDS_OF_HEADROOM} shards"

    # and the conversion is complete: every source tensor plus five indexer tensors per layer, the same bytes
    source_map, output_map = weight_map(src), weight_map(dst)
    layers = config.num_hidden_layers
    assert len(output_map) == len(source_map) + 5 * layers
    assert set(source_map) <= set(output_map)
    index = json.loads((dst / INDEX_NAME).read_text())
    indexer_bytes = index["metadata"]["total_size"] - total
    assert 0 < indexer_bytes < total / 20
    for name in ("model.embed_tokens.weight", f"model.layers.{layers - 1}.mlp.experts.15.down_proj.weight"):
        with safe_open(str(src / source_map[name]), "pt") as a, safe_open(str(dst / output_map[name]), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    sizes = [(dst / shard).stat().st_size for shard in set(output_map.values())]
    assert max(sizes) <= largest + math.ceil(indexer_bytes / layers) * 2
