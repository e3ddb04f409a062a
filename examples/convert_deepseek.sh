#!/usr/bin/env bash
# Convert a published DeepSeek-V3.1 checkpoint (FP8, 163 shards, 689 GB) into a bf16 DSA checkpoint on one machine.
#
# Needs: ~1.4 TB free next to DST (671 B parameters in bf16 + 1.7 GB of indexer), under 10 GB of RAM with
# --max-shard-size 5GB (one output shard assembled at a time + the largest tensor), any CPU. Disk bound: reads 689 GB,
# writes 1.34 TB. Interrupted? Run the same command with --resume: finished shards are kept.
#
#   bash examples/convert_deepseek.sh /data/DeepSeek-V3.1 /data/DeepSeek-V3.1-DSA
#
# Then train the indexer (dense warm-up, then the sparse stage) before relying on sparse attention:
#   accelerate launch --config_file examples/accelerate_ddp.yaml -m mla_dsa train-indexer /data/DeepSeek-V3.1-DSA \
#       --stage dense --data corpus/*.txt --steps 1000 --seq-len 131072 --out /data/DeepSeek-V3.1-DSA-warm
set -euo pipefail
SRC=${1:?usage: convert_deepseek.sh SRC DST [extra mla-dsa convert options]}
DST=${2:?usage: convert_deepseek.sh SRC DST [extra mla-dsa convert options]}
shift 2
mla-dsa convert "$SRC" "$DST" --dtype auto --index-n-heads 64 --index-head-dim 128 --index-topk 2048 \
    --indexer-init random --max-shard-size 5GB --resume "$@"
