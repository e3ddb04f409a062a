"""Indexer training (DeepSeek-V3.2 paper, §2.1) on Transformers' Trainer, and the PEFT hooks around it.

- Dense warm-up (`stage="dense"`): everything but the indexer frozen, dense attention, loss = KL(p_t || softmax(I_t))
  to the head-summed main attention over all causal keys.
- Sparse stage (`stage="sparse"`): top-k selection on, everything trainable; the indexer learns only from the KL over
  its selected keys (it reads detached inputs), the main model only from the LM loss, so it adapts
  to sparse attention. Fully, or through LoRA (`lora_rank`: PEFT adapters on attention, MLP and indexer, merged into
  the saved checkpoint or saved as an adapter). `dense_control=True` is the control run: the same training with dense
  attention and no indexer loss, so that what sparse attention costs is not confused with what more training gains.

`mla-dsa train-indexer` runs either stage on a checkpoint and text files; under `accelerate launch` it is
data-parallel (gloo on CPU, NCCL on GPUs) with no code of ours involved in the distribution.
"""

import contextlib
import inspect
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging

from .conversion.source import TRAINING_RUN_FILE, ConversionError
from .cpu_linear import cpu_has_bf16_matmul
from .indexer_loss import STAGES, IndexerLoss

logger = logging.get_logger(__name__)

LORA_SAVES = ("merged", "adapter")
RUN_FILE = TRAINING_RUN_FILE  # in OUT: which stage the run there is (so --resume cannot cross stages), and its log
# Default learning rates: the paper's (dense warm-up 1e-3; sparse stage 7.3e-6 for a 7168-wide model), the sparse
# one scaled up by sqrt(7168 / hidden_size) for narrower models, which tolerate larger steps.
DENSE_LR = 1e-3
SPARSE_LR_AT_V3_WIDTH = 7.3e-6
V3_HIDDEN_SIZE = 7168

# PEFT `target_modules` patterns (strings are matched with re.fullmatch against module names).
INDEXER_TARGETS = r".*\.self_attn\.indexer\.(wq_b|wk|weights_proj)"
ATTENTION_TARGETS = r".*\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
MLP_TARGETS = r".*\.mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)"
# The routed experts are fused parameters, not Linear modules: PEFT reaches them through `target_parameters`.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
TARGET_PATTERNS = {"indexer": INDEXER_TARGETS, "attention": ATTENTION_TARGETS, "mlp": MLP_TARGETS}
# A model converted from GQA (`linear_latent_norm` in its config) holds its query and key/value latents scaled down
# into their norms' linear regime (conversion/gqa_math.py): an optimizer step of ordinary size on q_a_proj or
# kv_a_proj_with_mqa would leave it, so those projections are never trained (nor given LoRA) there; the rest of the
# attention (q_b_proj, kv_b_proj, o_proj) adapts around them.
PRESCALED_PROJECTIONS = ("q_a_proj", "kv_a_proj_with_mqa")
PRESCALED_ATTENTION_TARGETS = r".*\.self_attn\.(q_proj|q_b_proj|kv_b_proj|o_proj)"  # ATTENTION_TARGETS less those


def has_routed_experts(model: torch.nn.Module) -> bool:
    """Whether any layer holds fused routed-expert parameters (`EXPERT_PARAMETERS`) that LoRA can target."""
    return any(name.endswith(EXPERT_PARAMETERS) for name, _ in model.named_parameters())


def has_prescaled_latent(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "linear_latent_norm", False))


def _is_dsa_model(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "mla_dsa"


def _dsa_model(model: torch.nn.Module) -> torch.nn.Module:
    """The MlaDsaPreTrainedModel inside `model` (a PeftModel, DDP wrapper, ... or the model itself)."""
    for module in model.modules():
        if _is_dsa_model(module):
            return module
    raise ValueError(f"{type(model).__name__} contains no mla_dsa model")


def prepare_indexer_training(model: torch.nn.Module, stage: str) -> torch.nn.Module:
    """Sets which parameters a stage of the paper's recipe trains; returns `model`. The stage's loss is computed
    beside the model (`IndexerLoss(model, stage)`, which `IndexerTrainer(stage=...)` installs): the model's config is
    never changed.

    dense: only `*.indexer.*` parameters trainable. sparse: every parameter trainable.
    On a PEFT model only adapter parameters (LoRA, `modules_to_save`) are ever made trainable: dense trains the
    indexer's adapters, sparse all adapters."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    prescaled = has_prescaled_latent(_dsa_model(model))  # _dsa_model fails clearly on a model with no mla_dsa inside
    peft = _is_peft(model)
    for name, param in model.named_parameters():
        trainable = not peft or "lora_" in name or ".modules_to_save." in name
        if stage == "dense":
            trainable = trainable and ".indexer." in name
        if prescaled and any(f".{projection}." in name for projection in PRESCALED_PROJECTIONS):
            trainable = False
        param.requires_grad_(trainable)
    return model


def indexer_lora_config(
    targets: tuple[str, ...] = ("indexer",),
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    train_indexer_norm: bool = True,
    prescaled_latent: bool = False,
    routed_experts: bool = True,
    **kwargs,
):
    """A `peft.LoraConfig` for MLA+DSA models.

    `targets` picks LoRA sites among "indexer" (wq_b, wk, weights_proj), "attention" (q/kv projections, o_proj) and
    "mlp" (dense MLP, experts, shared experts). With `train_indexer_norm`, the indexer's small LayerNorm `k_norm` is
    trained in full (`modules_to_save`) when the indexer is targeted. `prescaled_latent` (a model converted from GQA,
    `has_prescaled_latent(model)`): no LoRA on q_a_proj and kv_a_proj_with_mqa, whose latents are scaled far down.
    `routed_experts=False` (`has_routed_experts(model)` is False: every MLP dense) asks PEFT for no expert parameters,
    which it would otherwise warn it could not find."""
    from peft import LoraConfig

    unknown = set(targets) - set(TARGET_PATTERNS)
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {sorted(TARGET_PATTERNS)}, got {targets}")
    patterns = dict(TARGET_PATTERNS)
    if prescaled_latent:
        patterns["attention"] = PRESCALED_ATTENTION_TARGETS
    pattern = "|".join(f"(?:{patterns[t]})" for t in targets)
    modules_to_save = ["k_norm"] if train_indexer_norm and "indexer" in targets else None
    expert_parameters = list(EXPERT_PARAMETERS) if "mlp" in targets and routed_experts else None
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern,
        target_parameters=expert_parameters, modules_to_save=modules_to_save, task_type="CAUSAL_LM", **kwargs,
    )  # fmt: skip


def _is_peft(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@torch.no_grad()
def evaluate_indexer(
    model: torch.nn.Module, windows: torch.Tensor, index_topk: int | None = None, batch_size: int = 4,
    source: torch.nn.Module | None = None,
) -> dict[str, float]:  # fmt: skip
    """Dense vs sparse LM loss and the indexer's agreement with dense attention, on token windows [N, L].

    Returns dense_loss (this model, dense attention), sparse_loss, loss_ratio (sparse_loss over the dense loss of
    `source`, the dense model this one came from, when given - `source_dense_loss` - else over this model's own),
    kl (mean over the DSA layers and queries of KL(p_t || softmax(I_t)), p_t this model's dense head-summed
    attention), kl_uniform (the same KL for a uniform choice over the visible keys), captured_kl
    (1 - kl / kl_uniform: 1 is a perfect indexer, 0 no better than uniform), recall (share of p_t's mass inside the
    indexer's top-k, over queries with more than k keys), index_topk, seq_len and windows."""
    dsa = _dsa_model(model)
    k = index_topk or dsa.config.index_topk
    models = [model] + ([source] if source is not None else [])
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    names = ("dense_loss", "sparse_loss", "kl", "kl_uniform", "recall") + (("source_dense_loss",) if source else ())
    totals = dict.fromkeys(names, 0.0)  # each batch's means weighted by its windows (the last may be short)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        with IndexerLoss(model, "dense") as indexer_loss:
            dense = model(batch, labels=batch, index_topk=k, use_sparse_attention=False, use_cache=False)
        sparse = model(batch, labels=batch, index_topk=k, use_sparse_attention=True, use_cache=False)
        share = len(batch)
        totals["dense_loss"] += share * dense.loss.item()
        totals["sparse_loss"] += share * sparse.loss.item()
        totals["kl"] += share * indexer_loss.kl.item()
        totals["kl_uniform"] += share * indexer_loss.kl_uniform.item()
        totals["recall"] += share * indexer_loss.recall.item()
        if source is not None:
            dense = {"use_sparse_attention": False} if _is_dsa_model(source) else {}  # a DSA source: its dense loss
            totals["source_dense_loss"] += share * source(batch, labels=batch, use_cache=False, **dense).loss.item()
    for m, training in zip(models, was_training, strict=True):
        m.train(training)
    result = {name: value / max(1, len(windows)) for name, value in totals.items()}
    result["loss_ratio"] = result["sparse_loss"] / result["source_dense_loss" if source else "dense_loss"]
    result["captured_kl"] = 1 - result["kl"] / result["kl_uniform"]
    result.update(index_topk=k, seq_len=int(windows.shape[1]), windows=int(windows.shape[0]))
    if math.isnan(result["recall"]):
        result["recall"] = None  # no query had more than k keys
    return result


@torch.no_grad()
def oracle_recall(model: torch.nn.Module, windows: torch.Tensor, k: int) -> list[float]:
    """Per layer, the share of the dense head-summed attention mass inside its own k largest weights (the oracle
    selection), over queries with more than k keys: the most any top-k holds, so the ceiling of the indexer's recall
    in `evaluate_indexer`. One window [L] of `windows` [N, L] at a time (it builds [H, L, L] per layer)."""
    was_training = model.training
    model.eval()
    shares = [0.0] * _dsa_model(model).config.num_hidden_layers
    for row in windows:
        attentions = model(row[None], output_attentions=True, use_sparse_attention=False, use_cache=False).attentions
        for layer, probs in enumerate(attentions):
            mass = probs.sum(1) / probs.shape[1]  # [1, L, L], rows sum to 1
            shares[layer] += mass.topk(k, dim=-1).values.sum(-1)[:, k:].mean().item() / len(windows)
    model.train(was_training)
    return shares


def default_learning_rate(stage: str, hidden_size: int) -> float:
    if stage == "dense":
        return DENSE_LR
    return SPARSE_LR_AT_V3_WIDTH * max(1.0, V3_HIDDEN_SIZE / hidden_size) ** 0.5


class WindowDataset(torch.utils.data.Dataset):
    """`count` windows of `seq_len` tokens at pseudo-random offsets fixed by (seed, index): the same examples in the
    same order however many processes read them."""

    def __init__(self, corpus: torch.Tensor, seq_len: int, count: int, seed: int = 0):
        if len(corpus) <= seq_len:
            raise ValueError(f"the data has {len(corpus)} tokens, fewer than --seq-len {seq_len} + 1")
        self.corpus, self.seq_len, self.count = corpus, seq_len, count
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(corpus) - seq_len, (count,), generator=generator)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[index])
        ids = self.corpus[start : start + self.seq_len].long()
        return {"input_ids": ids, "labels": ids.clone()}


def train_indexer(
    checkpoint: str | Path,
    stage: str,
    data_files: list[str | Path],
    out_dir: str | Path,
    steps: int = 200,
    seq_len: int = 512,
    batch_size: int = 4,
    learning_rate: float | None = None,
    index_topk: int | None = None,
    save_steps: int | None = None,
    logging_steps: int = 10,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    max_tokens: int | None = None,
    optim: str = "adamw_torch",
    lora_rank: int | None = None,
    lora_save: str = "merged",
    dense_control: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    lr_scheduler: str = "constant_with_warmup",
    bf16: bool = False,
    overwrite: bool = False,
    gradient_checkpointing: bool = False,
    gradient_accumulation_steps: int = 1,
    trust_remote_code: bool = False,
) -> Path:
    """One stage of indexer training with transformers' Trainer; saves a loadable DSA checkpoint to `out_dir`.

    `lora_rank`: train PEFT LoRA adapters of that rank (attention, MLP and indexer; the indexer's k_norm in full)
    instead of the weights; `lora_save="merged"` writes them merged into a plain checkpoint, "adapter" writes the
    PEFT adapter alone (`load_trained(out_dir)` or PEFT's `PeftModel.from_pretrained(base, out_dir)` loads it).
    `dense_control` (sparse stage): the same training with dense attention and no indexer loss. `callbacks`: more
    transformers `TrainerCallback`s (an evaluation every N steps, early stopping, ...). `lr_scheduler`: a transformers
    `lr_scheduler_type` ("constant_with_warmup", as the paper; "cosine", "linear", ...), after a 5 % warm-up
    (none for runs under 20 steps).
    `bf16`: the Trainer's bf16 mixed precision (weights and optimizer in float32, matrix products in bfloat16 under
    autocast; on a CPU with bf16 dot products, AVX512-BF16 or AMX, several times faster than float32; on one without
    AVX-512, several times slower: it warns).
    `gradient_checkpointing`: the Trainer's activation checkpointing (each decoder layer recomputed in backward), for
    long sequences. `gradient_accumulation_steps`: the Trainer's; each step takes that many batches of `batch_size`
    one after another, so a step's batch is `batch_size * gradient_accumulation_steps` sequences (per process) held
    in the memory of `batch_size`. `trust_remote_code`: read the text with a tokenizer that is code of its own
    (Kimi-K2's), running the code the checkpoint ships.
    With `save_steps`, a Trainer checkpoint (weights, optimizer and RNG state) goes to `out_dir/checkpoints` every
    `save_steps` steps, the newest kept, and `resume=True` continues from it; without, none is written.
    `out_dir/mla-dsa-training.json` records the run and its logged losses. Runs data-parallel unchanged under
    `accelerate launch`: `batch_size` is per process."""
    from .data import load_tokenizer, text_files_corpus
    from .modeling.configuration_mla_dsa import MlaDsaConfig

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if lora_save not in LORA_SAVES:
        raise ValueError(f"lora_save must be one of {LORA_SAVES}, got {lora_save!r}")
    if dense_control and stage != "sparse":
        raise ValueError("dense_control is the sparse stage's control run: pass stage='sparse'")
    out_dir = Path(out_dir)
    bf16 = _bf16_as_launched(bf16, out_dir)
    _check_output(Path(checkpoint), out_dir, resume, overwrite, data_files)
    config = MlaDsaConfig.from_pretrained(checkpoint)
    _check_quantized_training(checkpoint, config, lora_rank, lora_save)
    lr = learning_rate if learning_rate is not None else default_learning_rate(stage, config.hidden_size)
    processes = max(1, int(os.environ.get("WORLD_SIZE", "1")))  # as launched (torchrun, accelerate launch)
    # An absolute path: a LoRA adapter saved alone records it as its base model, which `eval` then finds from any
    # directory (a relative one sent it to the hub); the run's settings record it so too.
    local = Path(checkpoint).resolve() if Path(checkpoint).is_dir() else checkpoint
    settings = {"checkpoint": str(local), "data": [str(Path(f).resolve()) for f in data_files],
                "max_tokens": max_tokens, "seq_len": seq_len, "batch_size": batch_size,
                "gradient_accumulation_steps": gradient_accumulation_steps, "processes": processes,
                "deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true", "learning_rate": lr,
                "lr_scheduler": lr_scheduler, "optim": optim, "seed": seed, "lora_rank": lora_rank,
                "dense_control": dense_control,
                "index_topk": index_topk if index_topk is not None else config.index_topk}  # fmt: skip
    if resume:
        _check_resumed_run(out_dir, stage, settings)
        if out_dir.is_dir() and any(out_dir.iterdir()) and not any((out_dir / "checkpoints").glob("checkpoint-*")):
            # (an empty or new OUT starts the run: a job script may always pass --resume)
            raise ConversionError(out_dir, "--resume: OUT holds no Trainer checkpoint to continue from (a run keeps "
                                           "one only with --save-steps N), so it would train again from step 0: pass "
                                           "--overwrite for that, or pick another --out")  # fmt: skip
    check_seq_len(checkpoint, config, seq_len)
    tokenizer = load_tokenizer(checkpoint, "train-indexer", trust_remote_code=trust_remote_code)
    corpus = text_files_corpus(data_files, tokenizer, max_tokens=max_tokens)
    check_data_length(data_files, corpus, seq_len)
    # --index-topk is the k the model is trained at, so it is the k its output runs at (config.json of a merged or
    # full checkpoint; the run record, which `load_trained` reads, for an adapter)
    overrides = {} if index_topk is None else {"index_topk": index_topk}
    model = _model_to_train(local, overrides, lora_rank, seed)
    use_cache = _dsa_model(model).config.use_cache  # the Trainer sets it to its arguments' (False): restored for saving
    prepare_indexer_training(model, stage)
    args = _training_arguments(out_dir, stage, steps, batch_size, lr, save_steps, logging_steps, seed, progress, optim,
                               lr_scheduler, bf16, gradient_checkpointing, gradient_accumulation_steps)  # fmt: skip
    _warn_if_bf16_is_slow_here(args)
    world = max(1, args.world_size)
    dataset = WindowDataset(corpus, seq_len, steps * batch_size * gradient_accumulation_steps * world, seed=seed)
    trainer = IndexerTrainer(model=model, args=args, train_dataset=dataset, stage=stage, index_topk=index_topk,
                             dense_attention=dense_control, callbacks=callbacks)  # fmt: skip
    _warn_if_sharding_fell_back(trainer)
    _fetch_moe_blocks_whole_under_deepspeed(trainer, model)
    _keep_the_chosen_optimizer_under_deepspeed(trainer)
    has_checkpoint = resume and any((out_dir / "checkpoints").glob("checkpoint-*"))
    if trainer.is_world_process_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        run = {"stage": stage, "checkpoint": str(checkpoint), "processes": world, "sharded": _shards_weights(trainer),
               "lora_rank": lora_rank, "dense_control": dense_control, "bf16": bf16,
               "index_topk": _dsa_model(model).config.index_topk, "steps": steps, "settings": settings}  # fmt: skip
        (out_dir / RUN_FILE).write_text(json.dumps(run) + "\n")
    trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    trained = _gather_trained_weights(model, trainer.is_deepspeed_enabled)  # every process takes part
    if trainer.is_world_process_zero():
        if trained is not None:  # DeepSpeed or FSDP: the checkpoint again, whole, with the trained weights, to save
            model = _model_with_trained_weights(trainer, local, overrides, lora_rank, seed, trained)
        (out_dir / RUN_FILE).write_text(json.dumps({**run, "log_history": trainer.state.log_history}) + "\n")
        checkpoints = out_dir / "checkpoints"
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):  # Trainer makes it even when it saves nothing
            checkpoints.rmdir()
        if lora_rank is not None and lora_save == "merged":
            model = model.merge_and_unload()
        _dsa_model(model).config.use_cache = use_cache
        if lora_rank is None or lora_save == "merged":
            _cast_to_checkpoint_dtype(model, config.dtype)
        model.save_pretrained(out_dir)
        _save_tokenizer(tokenizer, Path(checkpoint), out_dir)
        if lora_rank is not None and lora_save == "adapter" and index_topk not in (None, config.index_topk):
            warnings.warn(f"the adapter in {out_dir} was trained at index_topk={index_topk}, its base checkpoint says "
                          f"{config.index_topk}: mla_dsa.training.load_trained({str(out_dir)!r}) (and eval) run it at "
                          f"{index_topk}; loaded by PEFT or AutoModelForCausalLM it runs at {config.index_topk} unless "
                          f"index_topk={index_topk} is passed to the base model's from_pretrained", UserWarning,
                          stacklevel=2)  # fmt: skip
    return out_dir


def _model_to_train(checkpoint: str | Path, overrides: dict, lora_rank: int | None, seed: int) -> torch.nn.Module:
    """The checkpoint in float32, with the run's LoRA adapters (attention, MLP, indexer) where `lora_rank` is given."""
    from .loading import load_checkpoint
    from .modeling.modeling_mla_dsa import MlaDsaForCausalLM

    model = load_checkpoint(checkpoint, MlaDsaForCausalLM, dtype=torch.float32, **overrides)
    if lora_rank is None:
        return model
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)  # the adapters' random init: the same seed, the same run
    lora = indexer_lora_config(("attention", "mlp", "indexer"), r=lora_rank, lora_alpha=2 * lora_rank,
                               prescaled_latent=has_prescaled_latent(model),
                               routed_experts=has_routed_experts(model))  # fmt: skip
    return get_peft_model(model, lora)


def _shards_weights(trainer: Trainer) -> bool:
    """Whether `trainer` splits the weights over the processes (FSDP, DeepSpeed ZeRO-3): known before it trains."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled())


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether training holds `model`'s weights split over the processes: DeepSpeed ZeRO-3 (which marks the parameters
    it partitions with a `ds_id`), or FSDP (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())


def _gather_trained_weights(model: torch.nn.Module, under_deepspeed: bool = False) -> dict[str, torch.Tensor] | None:
    """Every process calls it after training. Under DeepSpeed (`under_deepspeed`: the Trainer ran it) or a sharded run
    (FSDP), each trained parameter whole, in float32, gathered onto the main process one at a time (the others get an
    empty dict); None where the main process's model holds its trained weights as they are (one process, DDP). The
    main process alone would have saved ZeRO-3's empty shards (`save_pretrained` failed on them), and under
    DeepSpeed's bf16 its bf16 copies of the weights, where the float32 masters are in its optimizer (a sparse-stage
    update to a norm weight near 1 is far below bf16's step there: it was lost whole). Frozen weights are not
    gathered: the checkpoint holds them."""
    if not under_deepspeed and not _is_sharded(model):
        return None
    from torch.distributed.tensor import DTensor

    main = torch.distributed.get_rank() == 0
    whole = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        value = None
        if under_deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(param)  # the optimizer's float32 master, whole (None where it keeps none)
        if value is None and hasattr(param, "ds_id"):
            from deepspeed.zero import GatheredParameters

            with GatheredParameters([param]):
                value = param.detach().clone()
        elif value is None:
            value = param.full_tensor() if isinstance(param, DTensor) else param
        if main:  # named as the unwrapped model names it (torch's activation checkpointing wrapper adds a level)
            whole[name.replace("._checkpoint_wrapped_module", "")] = value.detach().to("cpu", torch.float32, copy=True)
    return whole


def _model_with_trained_weights(trainer: Trainer, checkpoint: str | Path, overrides: dict, lora_rank: int | None,
                                seed: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:  # fmt: skip
    """The trained model whole on this process, to merge and save: the checkpoint loaded again as it was for training
    (with the same adapters), then the gathered trained weights copied in. Under ZeRO-3, transformers would load it
    partitioned (`deepspeed.zero.Init`, which every process must enter): its DeepSpeed setting is lifted meanwhile."""
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config

    zero3 = is_deepspeed_zero3_enabled()
    if zero3:
        unset_hf_deepspeed_config()
    try:
        model = _model_to_train(checkpoint, overrides, lora_rank, seed)
    finally:
        if zero3:
            set_hf_deepspeed_config(trainer.accelerator.state.deepspeed_plugin.hf_ds_config)  # the one lifted
    params = dict(model.named_parameters())
    if not weights or weights.keys() - params.keys():  # nothing trained may be left out of the save
        raise RuntimeError(f"the gathered weights do not name the model's parameters: {sorted(weights)[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model


def _cast_to_checkpoint_dtype(model: torch.nn.Module, dtype: "torch.dtype | str | None") -> None:
    """Puts the trained float32 weights back in the dtype the checkpoint was stored in (a float16 or bfloat16 one
    stays so on disk and in `dtype="auto"` loads), leaving float32 what transformers keeps float32 when it loads a
    model in that dtype (the router; in float16 also the indexer's head weights and a GQA conversion's latent
    projections, whose values lie below float16's normal range)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return
    kept = list(model._keep_in_fp32_modules_strict or ())
    kept += list(model._keep_in_fp32_modules or ()) if dtype == torch.float16 else []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(module in name for module in kept):
            tensor.data = tensor.data.to(dtype)


# What a tokenizer reads besides the files its class names (vocab_files_names)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json",
                   "chat_template.jinja")  # fmt: skip


def _save_tokenizer(tokenizer, checkpoint: Path, out_dir: Path) -> None:
    """The trained checkpoint's tokenizer. One that is code of its own (Kimi-K2's) is copied as the checkpoint holds
    it, code and files: its class's `save_pretrained` need not write what it reads (transformers 5 saves a fast
    tokenizer's vocabulary into tokenizer.json, not into the file such a class opens)."""
    from .conversion.source import tokenizer_code_files

    code = tokenizer_code_files(checkpoint) if checkpoint.is_dir() else set()
    if not code:
        tokenizer.save_pretrained(out_dir)
        return
    for name in sorted({*code, *TOKENIZER_FILES, *getattr(tokenizer, "vocab_files_names", {}).values()}):
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out_dir / name)


def load_trained(path: str | Path, **kwargs) -> torch.nn.Module:
    """The model `train_indexer` saved at `path`: a checkpoint, or a LoRA adapter (`lora_save="adapter"`) applied to
    the checkpoint it was trained from and merged. `kwargs` go to `from_pretrained` (float32 unless given)."""
    from .loading import load_checkpoint
    from .modeling.modeling_mla_dsa import MlaDsaForCausalLM

    path = Path(path)
    kwargs.setdefault("dtype", torch.float32)
    base_path = trained_base(path)
    recorded = json.loads((path / RUN_FILE).read_text()).get("index_topk") if (path / RUN_FILE).is_file() else None
    if base_path != path and recorded is not None:  # an adapter: the k it was trained at
        kwargs.setdefault("index_topk", recorded)
    base = load_checkpoint(base_path, MlaDsaForCausalLM, **kwargs)
    if base.name_or_path == str(path):
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, path).merge_and_unload()


def trained_base(path: str | Path) -> Path:
    """The checkpoint whose weights `path` holds: `path` itself, or for a LoRA adapter the checkpoint it adapts."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return path
    return Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])


def _training_arguments(out_dir: Path, stage: str, steps: int, batch_size: int, lr: float, save_steps: int | None,
                        logging_steps: int, seed: int, progress: bool, optim: str, lr_scheduler: str,
                        bf16: bool = False, gradient_checkpointing: bool = False,
                        gradient_accumulation_steps: int = 1):  # fmt: skip
    """The Trainer settings of one stage: the LR schedule after a 5 % warm-up (constant by default), no weight decay,
    clipped gradients, the newest checkpoint kept (with `save_steps`), a fixed data order."""
    from transformers import TrainingArguments

    # transformers 5.25 renamed the Trainer's gradient checkpointing to activation checkpointing (the old name warns)
    parameters = inspect.signature(TrainingArguments).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in parameters else "gradient_checkpointing"
    checkpointing = {name: True, f"{name}_kwargs": {"use_reentrant": False}} if gradient_checkpointing else {}
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=lr,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=steps // 20,  # none under 20 steps: the warm-up's first step has a learning rate of 0
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        # Trainer checkpoints (weights, optimizer and RNG state: 3x the model in the sparse stage) only when asked,
        # the newest one kept: they exist for --resume.
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or max(steps, 1),
        save_total_limit=1,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        ddp_find_unused_parameters=stage == "sparse",  # the sparse stage's dense layers leave their indexer unused
        use_cpu=not torch.cuda.is_available(),
        optim=optim,
        bf16=bf16,
        **checkpointing,
    )


def _bf16_as_launched(bf16: bool, out_dir: Path) -> bool:
    """`bf16`, or bf16 as `accelerate launch --mixed_precision bf16` asks: the Trainer reads that setting too (the run
    was bf16 while its arguments said float32), and under DeepSpeed transformers stopped the first step on the
    mismatch. fp16, which no stage is made for, is refused before anything loads."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched == "fp16":
        raise ConversionError(out_dir, "train-indexer trains in float32 or with --bf16, not in fp16: it was launched "
                                       "with accelerate's --mixed_precision fp16; launch with bf16 or no")  # fmt: skip
    return bf16 or launched == "bf16"


def _warn_if_bf16_is_slow_here(args) -> None:
    if args.bf16 and args.device.type == "cpu" and not cpu_has_bf16_matmul():
        warnings.warn("train-indexer --bf16: this CPU has no bfloat16 matrix instructions (AVX-512 or AMX), so "
                      "PyTorch multiplies bf16 matrices in a slow reference loop: this run will be several times "
                      "slower than in float32 (drop --bf16)", stacklevel=3)  # fmt: skip


def _warn_if_sharding_fell_back(trainer: Trainer) -> None:
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP, but accelerate shards only on GPU-type
    devices: on a CPU-only machine it runs plain data parallelism without a word. Say so, once."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        if trainer.is_world_process_zero():
            logger.warning(
                "train-indexer: launched with an FSDP config, but accelerate shards only on GPUs: this run is "
                f"data-parallel (DDP) over {trainer.args.world_size} processes, each holding the whole model"
            )


def _fetch_moe_blocks_whole_under_deepspeed(trainer: Trainer, model: torch.nn.Module) -> None:
    """Under DeepSpeed, each MoE block is a ZeRO-3 "leaf": its weights are fetched together, as accelerate's
    `--deepspeed_moe_layer_cls_names` does for the classes it names (named here for the user). With LoRA on the routed
    experts (PEFT's parameter wrappers) the order ZeRO-3 fetched their weights in changed from step to step, and
    ZeRO-3 stopped the second step ("tracing error")."""
    moe = "MlaDsaMoE"
    if not trainer.is_deepspeed_enabled or not any(type(module).__name__ == moe for module in model.modules()):
        return
    plugin = trainer.accelerator.state.deepspeed_plugin
    named = plugin.transformer_moe_cls_names or os.environ.get("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", "")
    names = [name for name in named.split(",") if name]
    plugin.transformer_moe_cls_names = ",".join(names if moe in names else [*names, moe])


# --optim choices that accelerate's swap (below) replaces by an equivalent DeepSpeed CPU optimizer
DEEPSPEED_CPU_EQUIVALENTS = ("adamw_torch", "adamw_torch_fused", "adagrad")


def _keep_the_chosen_optimizer_under_deepspeed(trainer: Trainer) -> None:
    """Where DeepSpeed offloads the optimizer, accelerate replaces the Trainer's by DeepSpeed's CPU Adam (its
    `zero_force_ds_cpu_optimizer`, on by default), keeping only the learning rate and weight decay: the same training
    for AdamW, and for any other `--optim` (sgd, adafactor, ...) another optimizer, without a word. The switch is
    turned off for those, so the optimizer chosen runs; a config that sets it is left as it says."""
    if not trainer.is_deepspeed_enabled:
        return
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    if offload.get("device", "none") != "none" and optim not in DEEPSPEED_CPU_EQUIVALENTS:
        config.setdefault("zero_force_ds_cpu_optimizer", False)


def _check_quantized_training(checkpoint: str | Path, config, lora_rank: int | None, lora_save: str) -> None:
    """A checkpoint saved quantized (torchao, bitsandbytes: a `quantization_config` in its config) trains LoRA adapters
    only, and only they can be saved: the Trainer refuses to train its weights, and transformers cannot write its
    quantized weights again (a merged or full save failed after training, leaving OUT half-written)."""
    quantization = getattr(config, "quantization_config", None)
    if quantization and (lora_rank is None or lora_save != "adapter"):
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        method = method or getattr(quantization, "quant_method", "quantized")
        raise ConversionError(Path(checkpoint) / "config.json", f"its weights are {method}-quantized: only LoRA "
                              "adapters train on them and only they can be saved; pass --lora R --lora-save adapter "
                              "(or train the unquantized checkpoint)")  # fmt: skip


def check_seq_len(checkpoint: str | Path, config, seq_len: int) -> None:
    """Windows no longer than the positions the model was built for (checked before any weight is loaded)."""
    if seq_len > config.max_position_embeddings:
        limit = config.max_position_embeddings
        raise ConversionError(Path(checkpoint) / "config.json", f"--seq-len {seq_len} is beyond the model's "
                                                                f"max_position_embeddings={limit}")  # fmt: skip


def check_data_length(data_files: list, corpus: torch.Tensor, seq_len: int) -> None:
    """At least one window of seq_len + 1 tokens (inputs and their next-token labels)."""
    if len(corpus) <= seq_len:
        where = data_files[0] if len(data_files) == 1 else f"{len(data_files)} data files"
        raise ConversionError(where, f"the data has {len(corpus)} tokens, fewer than --seq-len {seq_len} + 1")


def _check_output(checkpoint: Path, out_dir: Path, resume: bool, overwrite: bool, data_files=()) -> None:
    """As `convert` treats DST: OUT is never the input checkpoint (nor holds it, nor lies in it), and a non-empty
    OUT is only continued (`resume`) or replaced (`overwrite`, which empties it first, and never deletes the training
    data), never written over."""
    checkpoint, target = checkpoint.resolve(), out_dir.resolve()
    if target == checkpoint or checkpoint in target.parents:
        raise ConversionError(out_dir, "OUT is the input checkpoint or inside it; the input is never written to")
    if target in checkpoint.parents:
        raise ConversionError(out_dir, "the input checkpoint is inside OUT; replacing OUT would delete it")
    if target.exists() and not target.is_dir():
        raise ConversionError(out_dir, "OUT exists and is not a directory")
    if not resume and target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ConversionError(out_dir, "OUT exists and is not empty; pass --resume to continue the run it holds, "
                                           "or --overwrite to replace it")  # fmt: skip
        inside = [path for path in data_files if target in Path(path).resolve().parents]
        if inside:
            raise ConversionError(inside[0], "is inside OUT, which --overwrite replaces: move the data out of OUT")
        shutil.rmtree(target)


# train-indexer's flag for each setting a resumed run must share with the run it continues (--steps may differ: a
# finished run resumed with more steps trains on)
RESUMED_SETTINGS = {"checkpoint": "CHECKPOINT", "data": "--data", "max_tokens": "max_tokens", "seq_len": "--seq-len",
                    "batch_size": "--batch-size", "gradient_accumulation_steps": "--gradient-accumulation-steps",
                    "processes": "processes", "deepspeed": "DeepSpeed", "learning_rate": "--lr",
                    "lr_scheduler": "--lr-scheduler",
                    "optim": "--optim", "seed": "--seed", "lora_rank": "--lora", "dense_control": "--dense-control",
                    "index_topk": "--index-topk"}  # fmt: skip


def _check_resumed_run(out_dir: Path, stage: str, settings: dict) -> None:
    """--resume continues the run OUT holds: the same stage with the same settings, or nothing. Anything else would
    continue one run with another's data, batches, learning rate or selection (the Trainer restores the optimizer and
    schedule of the first and trains on), and the record would describe neither."""
    run_file = out_dir / RUN_FILE
    if not run_file.is_file():
        return
    run = json.loads(run_file.read_text())
    if run.get("stage") != stage:
        raise ConversionError(out_dir, f"holds a {run.get('stage')}-stage run; --resume continues it only with --stage "
                                       f"{run.get('stage')} (or pick another --out for the {stage} stage)")  # fmt: skip
    recorded = run.get("settings", {})  # runs recorded before this check hold the stage only
    changed = [key for key in RESUMED_SETTINGS if key in recorded and recorded[key] != settings[key]]
    if changed:
        was = ", ".join(_setting_words(key, recorded[key]) for key in changed)
        now = ", ".join(_setting_words(key, settings[key]) for key in changed)
        raise ConversionError(out_dir, f"holds a run with {was}; --resume continues it only with the same settings "
                                       f"(this command: {now}): pass those, or pick another --out")  # fmt: skip


def _setting_words(key: str, value) -> str:
    flag = RESUMED_SETTINGS[key]
    if key in ("dense_control", "deepspeed"):  # (a DeepSpeed checkpoint holds its optimizer state its own way)
        return flag if value else f"no {flag}"
    if key == "lora_rank" and value is None:
        return "full weights (no --lora)"
    if key == "checkpoint":
        return f"CHECKPOINT {value}"
    if key == "data":
        return f"--data of {len(value)} file(s) from {value[0] if value else '-'}"
    if key == "processes":
        return f"{value} process(es)"
    return f"{flag} {value}"


# Tokens per block of the chunked LM loss: its logits [block, vocabulary] in float32 (0.2 GB at SmolLM2's 49,152).
LM_LOSS_BLOCK = 1024


def chunked_causal_lm_loss(lm_head: torch.nn.Module, hidden_states: torch.Tensor, labels: torch.Tensor,
                           block: int = LM_LOSS_BLOCK) -> torch.Tensor:  # fmt: skip
    """transformers' causal LM loss (labels shifted by one, -100 ignored, the mean over the counted tokens) from the
    final hidden states [B, S, hidden], `block` tokens at a time under activation checkpointing: no [S, vocabulary]
    logits, log-probabilities or gradient exist at once (at 8K tokens of SmolLM2 those were ~5 GB of a training
    step), and backward recomputes each block's logits.

    A frozen head (LoRA, or any stage that trains no head) is recomputed by the reentrant checkpoint: the other keeps
    a frozen weight by reference, not its values, and DeepSpeed ZeRO-3 empties a partitioned weight again as soon as
    the recomputing forward returns, before backward reads it. A trainable head takes the non-reentrant one, which
    hands ZeRO-3 one gradient per step (the reentrant one, a gradient per block: ZeRO-3 refuses the second)."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].to(hidden_states.device)  # [B, S]
    reentrant = not any(param.requires_grad for param in lm_head.parameters())
    total = hidden_states.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_states.shape[1], block):
        end = min(hidden_states.shape[1], start + block)
        total = total + checkpoint(_lm_loss_sum, lm_head, hidden_states[:, start:end], targets[:, start:end],
                                   use_reentrant=reentrant)  # fmt: skip
    return total / (targets != -100).sum().clamp(min=1)


def _lm_loss_sum(lm_head: torch.nn.Module, hidden_states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden_states).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                             reduction="sum")  # fmt: skip


class _ProgressPostfix(TrainerCallback):
    """Shows the latest loss, KL and recall on the Trainer's progress bar."""

    def __init__(self, progress: ProgressCallback | None):
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "indexer_kl", "recall")}
            bar.set_postfix(shown, refresh=False)


class IndexerTrainer(Trainer):
    """Trainer for one stage of indexer training: every forward adds the stage's indexer loss (`IndexerLoss`) to the
    LM loss (the sparse stage's; the dense warm-up has none), with `index_topk` when given (the checkpoint's
    otherwise); or, with `dense_attention`, the sparse stage's dense control (LM loss under dense attention only). It
    logs the indexer's KL and recall next to the loss, and keeps the data order fixed so that one process and N
    processes see the same global batches."""

    def __init__(self, *args, stage: str, index_topk: int | None = None, dense_attention: bool = False, **kwargs):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        super().__init__(*args, **kwargs)
        self.stage, self.index_topk, self.dense_attention = stage, index_topk, dense_attention
        # Trainer's token-count loss scaling (x num_processes, expecting a globally normalised sum) would also scale
        # the indexer's KL, which is a per-process mean: keep both losses per-process means, which DDP averages.
        self.model_accepts_loss_kwargs = False
        self._indexer_logs: dict[str, list[float]] = {"indexer_kl": [], "recall": []}
        # Installed while the Trainer trains or evaluates (activation checkpointing replays each layer, and its loss,
        # in backward), removed after: the model it hands back computes no indexer loss.
        self.indexer_loss = None if dense_attention else IndexerLoss(self.model, stage)
        progress = next((c for c in self.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
        self.add_callback(_ProgressPostfix(progress))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Trainer reloads a checkpoint's weights with `load_state_dict`, blind to the names `save_pretrained` wrote:
        routed experts are saved per expert (`mlp.experts.0.gate_proj.weight`) and held fused
        (`mlp.experts.gate_up_proj`), so on resume they silently kept their starting weights (a "missing keys"
        warning) while their optimizer state was restored. A full model's checkpoint is read back through
        `from_pretrained`, which maps the names as it does for any load; adapters and sharded (FSDP) checkpoints
        as Trainer reads them."""
        model = self.model if model is None else model
        saved_whole = any(Path(resume_from_checkpoint).glob("model*.safetensors"))
        if _is_peft(model) or not has_routed_experts(model) or not saved_whole:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(model.parameters()).dtype
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
        model.load_state_dict(saved.state_dict())  # strict: every tensor, or an error naming the ones missing

    def train(self, *args, **kwargs):
        with self._indexer_loss_installed():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._indexer_loss_installed():
            return super().evaluate(*args, **kwargs)

    @contextlib.contextmanager
    def _indexer_loss_installed(self):
        installed = self.indexer_loss is not None and not self.indexer_loss.installed
        if installed:
            self.indexer_loss.install()
        try:
            yield
        finally:
            if installed:
                self.indexer_loss.remove()

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if self.dense_attention:  # the control run: the LM loss under dense attention, no indexer loss
            inputs["use_sparse_attention"] = False
        else:  # the warm-up attends densely (the LM loss trains nothing in it); the sparse stage through the selection
            inputs.update(index_topk=self.index_topk, use_sparse_attention=self.stage == "sparse")
            self.indexer_loss.reset()
        lm_loss = labels is not None and (self.dense_attention or self.stage == "sparse")
        if lm_loss and (self.is_fsdp_enabled or not model.training):
            # FSDP gathers lm_head's shards only inside the model's forward; an evaluation's metrics read the logits.
            outputs = model(**inputs, labels=labels)
            loss = outputs.loss
        else:
            # One logit row is all the output needs: the LM loss reads the final hidden states instead, a bounded
            # block of tokens at a time (`chunked_causal_lm_loss`), never the [tokens, vocabulary] logits at once.
            outputs = model(**inputs, logits_to_keep=1, output_hidden_states=lm_loss)
            hidden = outputs.hidden_states[-1] if lm_loss else None
            loss = chunked_causal_lm_loss(_dsa_model(model).lm_head, hidden, labels) if lm_loss else 0.0
        if not self.dense_attention:
            kl = self.indexer_loss.kl
            if kl is None:
                raise ValueError("the model ran no DSA layer's attention: nothing for the indexer to learn from")
            loss = loss + kl
            self._indexer_logs["indexer_kl"].append(kl.item())
            recall = self.indexer_loss.recall
            if not torch.isnan(recall):
                self._indexer_logs["recall"].append(recall.item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # The means over every process's batches since the last log (each process holds only its own; every process
        # logs at the same steps, so each takes part in the one sum, whatever it holds)
        sums = torch.tensor([[sum(values), len(values)] for values in self._indexer_logs.values()], dtype=torch.float64)
        if self.args.world_size > 1:  # (on the processes' device: NCCL reduces CUDA tensors only)
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
        for (name, values), (total, count) in zip(self._indexer_logs.items(), sums.tolist(), strict=True):
            if count:
                logs[name] = total / count
            values.clear()
        super().log(logs, *args, **kwargs)


__all__ = [
    "ATTENTION_TARGETS",
    "IndexerLoss",
    "IndexerTrainer",
    "INDEXER_TARGETS",
    "MLP_TARGETS",
    "STAGES",
    "WindowDataset",
    "chunked_causal_lm_loss",
    "evaluate_indexer",
    "has_routed_experts",
    "indexer_lora_config",
    "load_trained",
    "trained_base",
    "oracle_recall",
    "prepare_indexer_training",
    "train_indexer",
]
