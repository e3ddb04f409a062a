"""Run by `torchrun --nproc-per-node 2 tests/tp_worker.py CKPT OUT.json` (tests/test_tensor_parallel.py).

Loads CKPT through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True, tp_plan="auto")`, again with
expert parallelism (`DistributedConfig`), and, in the same process without a plan, as the one-process reference;
rank 0 writes what they did on the same inputs: a full forward of a batch, cached decoding step by step, greedy
generate(), and which weights the plans split.
"""

import inspect
import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from mla_dsa.indexer_loss import IndexerLoss

DECODE_STEPS = 24


def decode(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy cached decoding by hand: the tokens and each step's logits."""
    out = model(prompt, use_cache=True)
    cache, logits, tokens = out.past_key_values, [out.logits[:, -1]], []
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        tokens.append(int(token))
        out = model(token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return tokens, logits


# Expert parallelism as our plan declares it (`ep_dispatch_experts`) comes with DistributedConfig's `ep_size`; older
# releases (5.14) route through an `ep_router` style of their own, which our router does not follow.
EXPERT_PARALLEL = "ep_size" in inspect.signature(DistributedConfig).parameters


def expert_parallel_run(checkpoint: str, single, batch, prompt, single_logits) -> dict:
    world = dist.get_world_size()
    experts = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        trust_remote_code=True,
        dtype=torch.float32,
        distributed_config=DistributedConfig(tp_size=world, ep_size=world),
    )
    experts.eval()
    with torch.no_grad():
        forward_diff = (experts(batch).logits - single(batch).logits).abs().max().item()
        tokens, logits = decode(experts, prompt, DECODE_STEPS)
        decode_diff = max((a - b).abs().max().item() for a, b in zip(logits, single_logits, strict=True))
    local_experts = _local(experts.model.layers[1].mlp.experts.gate_up_proj).shape[0]
    return {"forward_diff": forward_diff, "decode_diff": decode_diff, "tokens": tokens, "local_experts": local_experts}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def main(checkpoint: str, out_path: str) -> None:
    parallel = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, tp_plan="auto",
                                                    dtype=torch.float32).eval()  # fmt: skip
    single = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    batch = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    prompt = batch[:1]
    with torch.no_grad():
        forward_diff = (parallel(batch).logits - single(batch).logits).abs().max().item()
        parallel_tokens, parallel_logits = decode(parallel, prompt, DECODE_STEPS)
        single_tokens, single_logits = decode(single, prompt, DECODE_STEPS)
        decode_diff = max((a - b).abs().max().item() for a, b in zip(parallel_logits, single_logits, strict=True))
        greedy = dict(max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS, do_sample=False)
        generated = [parallel.generate(prompt, **greedy).tolist(), single.generate(prompt, **greedy).tolist()]
    # Split weights hold fewer elements here than in the one-process model (a DTensor's local shard on transformers
    # 5.24, a plain tensor on 5.14).
    whole = dict(single.named_parameters())
    sharded = sorted(name for name, param in parallel.named_parameters()
                     if _local(param).numel() < whole[name].numel())  # fmt: skip
    local_heads = parallel.model.layers[0].self_attn.q_b_proj(torch.zeros(1, 1, 48)).shape[-1]
    try:  # the indexer loss would see only this process's heads: refused, not silently wrong
        with IndexerLoss(parallel, "dense"):
            parallel(batch, use_sparse_attention=False)
        indexer_loss_error = None
    except ValueError as err:
        indexer_loss_error = str(err)
    ep = expert_parallel_run(checkpoint, single, batch, prompt, single_logits) if EXPERT_PARALLEL else None
    if dist.get_rank() == 0:
        result = {"expert_parallel": ep, "world_size": dist.get_world_size(),
                  "forward_diff": forward_diff, "decode_diff": decode_diff,
                  "tokens": [parallel_tokens, single_tokens], "generated": generated, "sharded": sharded,
                  "local_q_width": local_heads, "indexer_loss_error": indexer_loss_error}  # fmt: skip
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
