"""Run by `torchrun --nproc-per-node 2 tests/fsdp_worker.py CKPT OUT.json SCENARIO ...`
(tests/test_sharded_training.py).

Sharded indexer training as `accelerate launch --config_file examples/accelerate_fsdp.yaml` sets it up on GPUs:
FSDP2 (`fully_shard`) on each indexer and each decoder layer (children first, as accelerate's wrap policy), then on
the whole model, parameters resharded after forward. A scenario, "STAGE[+FLAG...]": each process runs one training
step of STAGE on its share of a batch, the loss as `IndexerTrainer.compute_loss` makes it under FSDP (the indexer's
KL from `IndexerLoss`; in the sparse stage plus the LM loss through the model's forward), then an SGD step. The
reference, in the same process and unsharded: the same step over each process's share in turn, gradients averaged,
as data parallelism averages them.
Rank 0 writes, per scenario, what both did or the error the sharded step raised.

FLAGs: `lora` (PEFT LoRA on the indexer, as `train-indexer --lora`), `checkpointing` (transformers' activation
checkpointing, as `--gradient-checkpointing`), `checkpoint-wrapper` (torch's, as accelerate's
fsdp_activation_checkpointing), `layers-only` (no unit of the indexer's own: the decoder layers only).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from peft import get_peft_model
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from mla_dsa.indexer_loss import IndexerLoss
from mla_dsa.training import _gather_trained_weights, indexer_lora_config, prepare_indexer_training

EXAMPLE_CONFIG = Path(__file__).parent.parent / "examples" / "accelerate_fsdp.yaml"

LEARNING_RATE = 0.1
# The units examples/accelerate_fsdp.yaml names (fsdp_transformer_layer_cls_to_wrap)
FSDP_CONFIG = yaml.safe_load(EXAMPLE_CONFIG.read_text())["fsdp_config"]
UNITS = tuple(FSDP_CONFIG["fsdp_transformer_layer_cls_to_wrap"].split(","))


def build(checkpoint: str, stage: str, flags: set[str]) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32)
    if "checkpointing" in flags:  # transformers' (the Trainer's gradient_checkpointing)
        model.gradient_checkpointing_enable()
    if "lora" in flags:
        torch.manual_seed(0)  # the same adapters in both models
        model = get_peft_model(model, indexer_lora_config(("indexer",), r=4))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero, so that the adapters change the scores and every adapter gets a gradient
                torch.nn.init.normal_(param, std=0.1)
    model.train()
    return prepare_indexer_training(model, stage)


def shard(model: torch.nn.Module, flags: set[str]) -> None:
    """fully_shard bottom-up, as accelerate's FSDP2 wrap policy with fsdp_transformer_layer_cls_to_wrap."""
    units = ("MlaDsaDecoderLayer",) if "layers-only" in flags else UNITS
    if "checkpoint-wrapper" in flags:  # accelerate's fsdp_activation_checkpointing: torch's wrapper on each layer
        apply_activation_checkpointing(model, check_fn=lambda module: type(module).__name__ == "MlaDsaDecoderLayer")
    # accelerate's policy looks through a checkpoint wrapper and shards the wrapper
    targets = [m for m in model.modules() if type(getattr(m, "_checkpoint_wrapped_module", m)).__name__ in units]
    wrapped = {id(m._checkpoint_wrapped_module) for m in targets if hasattr(m, "_checkpoint_wrapped_module")}
    for module in [m for m in targets if id(m) not in wrapped][::-1]:
        fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)


def training_step(model: torch.nn.Module, stage: str, input_ids: torch.Tensor) -> torch.Tensor:
    """The loss of one step (backward done), as IndexerTrainer computes it under FSDP."""
    with IndexerLoss(model, stage) as indexer_loss:
        if stage == "dense":  # the warm-up attends densely; the LM loss trains nothing in it
            loss = 0.0
            model(input_ids, use_sparse_attention=False)
        else:  # FSDP gathers lm_head only inside the forward: the LM loss through it
            loss = model(input_ids, labels=input_ids, use_sparse_attention=True).loss
        loss = loss + indexer_loss.kl
        loss.backward()
    return loss.detach()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's (DTensor's) whole value; a plain tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def run(checkpoint: str, scenario: str) -> dict:
    """One scenario, "STAGE[+FLAG...]": the sharded step against the reference (see the module's docstring)."""
    stage, *flag_list = scenario.split("+")
    flags = set(flag_list)
    rank, world = dist.get_rank(), dist.get_world_size()
    # 24 tokens a sequence against the test checkpoints' index_topk = 4: the sparse stage really selects
    batch = torch.randint(3, 90, (2 * world, 24), generator=torch.Generator().manual_seed(1))
    shares = [batch[r::world] for r in range(world)]

    single = build(checkpoint, stage, flags)
    single_losses = [training_step(single, stage, share) for share in shares]
    trainable = {name: param for name, param in single.named_parameters() if param.requires_grad}
    single_grads = {name: param.grad / world for name, param in trainable.items()}
    with torch.no_grad():
        single_after = {name: param - LEARNING_RATE * single_grads[name] for name, param in trainable.items()}

    sharded = build(checkpoint, stage, flags)
    shard(sharded, flags)
    optimizer = torch.optim.SGD([p for p in sharded.parameters() if p.requires_grad], lr=LEARNING_RATE)
    try:
        loss = training_step(sharded, stage, shares[rank])
    except ValueError as err:  # refused (on every process alike, before any layer ran)
        return {"error": str(err)}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss)
    # (a checkpoint wrapper puts its own name in the parameters')
    params = {name.replace("._checkpoint_wrapped_module", ""): p for name, p in sharded.named_parameters()}
    missing_grads = sorted(name for name in trainable if params[name].grad is None)
    grads = {name: full(params[name].grad) for name in trainable if name not in missing_grads}
    optimizer.step()
    after = {name: full(params[name].detach()) for name in trainable}
    # What train-indexer saves after a sharded run: every trained weight gathered whole on the main process
    saved = _gather_trained_weights(sharded)
    return {
        "saved": sorted(saved) if rank == 0 else sorted(trainable),
        "saved_diff": max((saved[name] - single_after[name]).abs().max().item() for name in saved) if rank == 0 else 0,
        "trainable": sorted(trainable),
        "sharded": sorted(name for name, param in params.items() if hasattr(param, "full_tensor")),
        "missing_grads": missing_grads,
        "losses": [x.item() for x in losses],
        "single_losses": [x.item() for x in single_losses],
        "grad_norm": max(single_grads[name].norm().item() for name in trainable),
        "grad_diff": max((grads[name] - single_grads[name]).abs().max().item() for name in grads),
        "step_diff": max((after[name] - single_after[name]).abs().max().item() for name in trainable),
    }


def main(checkpoint: str, out_path: str, *scenarios: str) -> None:
    dist.init_process_group("gloo")
    results = {scenario: run(checkpoint, scenario) for scenario in scenarios}
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump({"world_size": dist.get_world_size(), "scenarios": results}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
