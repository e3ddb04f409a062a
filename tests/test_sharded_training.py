"""Sharded (FSDP2) indexer training, as `accelerate launch --config_file examples/accelerate_fsdp.yaml` runs it on GPUs,
proven on CPU: torchrun, gloo, torch's `fully_shard` on the units the example config names. accelerate itself shards
only on GPUs (docs/training.md), so the worker applies FSDP2 as accelerate's wrap policy does and computes the loss
as `IndexerTrainer` does under FSDP. Each sharded step equals one process's step over both shares of the batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "fsdp_worker.py"
TRAINED = ["dense", "sparse", "dense+lora", "sparse+lora", "sparse+checkpointing", "sparse+checkpoint-wrapper",
           "sparse+layers-only"]  # fmt: skip
REFUSED = ["dense+layers-only", "dense+checkpointing", "dense+checkpoint-wrapper"]
# GLM-5's sharing: layer 1 has no indexer and attends with layer 0's selection, whose indexer learns from both
SHARED_TRAINED = ["dense", "sparse", "dense+lora"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(checkpoint: Path, out: Path, scenarios: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(WORKER), str(checkpoint), str(out), *scenarios]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = json.loads(out.read_text())
    assert runs["world_size"] == 2
    return runs["scenarios"]


@pytest.fixture(scope="module")
def sharded_runs(ours_v32_topk4, v32_topk4, tmp_path_factory) -> dict:
    from mla_dsa.cli import main

    root = tmp_path_factory.mktemp("fsdp")
    shared = root / "shared"
    assert main(["convert", str(v32_topk4), str(shared), "--indexer-types", "FSF", "--no-progress"]) == 0
    runs = {("every-layer", name): run for name, run in launch(ours_v32_topk4, root / "v32.json",
                                                                TRAINED + REFUSED).items()}  # fmt: skip
    runs |= {("shared", name): run for name, run in launch(shared, root / "shared.json", SHARED_TRAINED).items()}
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "indexers, scenario", [("every-layer", s) for s in TRAINED] + [("shared", s) for s in SHARED_TRAINED]
)
def test_a_sharded_training_step_equals_one_process(sharded_runs, indexers, scenario):
    run = sharded_runs[indexers, scenario]
    assert "error" not in run, run.get("error")
    trainable, sharded = run["trainable"], set(run["sharded"])
    # Really sharded: every trainable parameter split over the two processes (the indexers' included).
    assert any(".indexer." in name for name in trainable)
    assert set(trainable) <= sharded
    if indexers == "shared":
        assert not any(".layers.1.self_attn.indexer." in name for name in sharded)
    if scenario.startswith("dense"):  # the warm-up trains the indexers (or their adapters) only
        assert all(".indexer." in name for name in trainable)
    # Each process's loss is the one process's loss on its share; every gradient reached its shard, averaged over the
    # processes as data parallelism averages it; the optimizer's step on the shards equals the unsharded step.
    assert run["losses"] == pytest.approx(run["single_losses"], rel=1e-5)
    assert run["missing_grads"] == []
    assert run["grad_norm"] > 0
    assert run["grad_diff"] <= 1e-6 * max(1.0, run["grad_norm"])
    assert run["step_diff"] <= 1e-6
    # What train-indexer saves: every trained weight, whole, as the one process's step left it
    assert run["saved"] == trainable
    assert run["saved_diff"] <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("scenario", REFUSED)
def test_a_dense_stage_fsdp_cannot_run_is_refused_with_the_fix(sharded_runs, scenario):
    """The dense stage's backward gathers the indexer alone (the frozen layers carry no gradient): without a unit of
    the indexer's own it failed in backward, and a layer's recompute under activation checkpointing still would."""
    error = sharded_runs["every-layer", scenario]["error"]
    if scenario.endswith("layers-only"):
        assert "MlaDsaIndexer" in error and "fsdp_transformer_layer_cls_to_wrap" in error
    else:
        assert "activation checkpointing" in error and "--gradient-checkpointing" in error
