"""Tensor and expert parallelism through transformers' own engine - `from_pretrained(..., tp_plan="auto")` and
`distributed_config=DistributedConfig(ep_size=...)` under torchrun (CPU, gloo) - on a DSA checkpoint with MoE
layers equal one process."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.distributed import DistributedConfig

import mla_dsa

from peers import save_peer

WORKER = Path(__file__).parent / "tp_worker.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Our checkpoint (payload included) from a DeepSeek-V3.2 peer: MoE layers, 4 heads, DSA at k = 5, a vocabulary
    that splits evenly over 2 ranks (transformers 5.14's colwise_gather_output for lm_head requires it)."""
    root = tmp_path_factory.mktemp("tp")
    save_peer("deepseek_v32", root / "peer", index_topk=5, vocab_size=96)
    mla_dsa.MlaDsaForCausalLM.from_pretrained(root / "peer").save_pretrained(root / "dsa")
    return root / "dsa"


@pytest.mark.slow
@pytest.mark.compat  # transformers 5.14's tensor-parallel engine runs it too
def test_two_process_tensor_and_expert_parallel_equal_one_process(checkpoint, tmp_path):
    out = tmp_path / "tp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
               str(WORKER), str(checkpoint), str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr:
        # A worker aborted by std::terminate from a thread of torch's (SIGABRT, no Python traceback) seconds after
        # loading: seen twice in about twenty clean-clone CI runs, on transformers 5.14 beside another test process
        # on these 2 cores, never when run alone (0 in 6). Rerun once; every check below is unchanged.
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads(out.read_text())
    assert run["world_size"] == 2
    # The plan really split the model: half the query heads per process, attention and expert weights sharded.
    assert run["local_q_width"] == 2 * (16 + 8)  # 2 of 4 heads x (nope 16 + rope 8)
    sharded = " ".join(run["sharded"])
    for name in ("self_attn.q_b_proj", "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.experts.gate_up_proj",
                 "mlp.experts.down_proj", "mlp.shared_experts.up_proj", "layers.0.mlp.gate_proj"):  # fmt: skip
        assert name in sharded, name
    assert "indexer" not in sharded  # every process selects the same top-k from the whole indexer
    assert run["forward_diff"] <= 1e-5
    # 24 cached steps from a 12-token prompt: far past index_topk = 5, so every step is sparse.
    assert run["tokens"][0] == run["tokens"][1] and len(run["tokens"][0]) == 24
    assert run["decode_diff"] <= 1e-5
    assert run["generated"][0] == run["generated"][1]
    assert "needs all 4 heads" in run["indexer_loss_error"]
    # Expert parallelism (transformers' ep plan): each process owns 4 of the 8 routed experts, tokens travel to them.
    # Only where DistributedConfig has `ep_size` (not 5.14, whose expert-parallel styles differ).
    ep = run["expert_parallel"]
    if "ep_size" in inspect.signature(DistributedConfig).parameters:
        assert ep["local_experts"] == 4
        assert ep["forward_diff"] <= 1e-5 and ep["decode_diff"] <= 1e-5
        assert ep["tokens"] == run["tokens"][1]
    else:
        assert ep is None
