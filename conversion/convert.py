"""`mla-dsa convert SRC DST`: a dense MLA checkpoint becomes a DSA checkpoint, streaming, atomically, resumably.

1. Plan (`plan.py`): read SRC's config and safetensors headers (no tensor data) and plan the output: the same tensor
   names (MTP layers and FP8 scales dropped), plus an indexer per layer unless SRC has one, grouped into output shards
   that follow SRC's shards.
2. Write (`write.py`): each output shard into a temporary sibling of DST (`.DST.mla-dsa-partial`), each file
   atomically, recorded in a state file (after a kill, `--resume` skips finished shards and yields the same bytes);
   then config.json (an `MlaDsaConfig` with `auto_map`), the payload files, the index json, tokenizer and generation
   files; check every planned tensor is in place with its shape.
3. Verify (`verify.py`, with `--verify`): run both models; then rename the directory to DST. SRC is only ever read.

Peak memory: Python + torch, plus one output shard being assembled, plus the tensors an informed indexer init reads.
"""

import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

from ..modeling.configuration_mla_dsa import MlaDsaConfig
from .calibrate import CalibrationOptions, calibration_windows
from .export import export_refusals, export_warnings
from .gqa import (
    GQA_MODEL_TYPES,
    checked_shape,
    has_attention_biases,
    is_gqa_source,
    mla_config_fields,
    verify_mla_stage,
    write_mla_stage,
)
from .indexer_init import INDEXER_INITS
from .plan import DTYPES, ConvertOptions, check_options, default_indexer_shape, plan_output, target_config
from .source import ConversionError, SourceCheckpoint, read_json
from .verify import verify_logits, verify_sparse
from .write import check_output, move_into_place, write_metadata, write_shards


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, **options) -> Path:
    """Converts the dense MLA checkpoint at `src` into a DSA checkpoint at `dst`; returns `dst`.

    Options (see `ConvertOptions`): dtype ("auto" keeps each tensor's dtype, FP8 becomes bf16), index_n_heads,
    index_head_dim, index_topk, indexer_init ("random" | "svd" | "calibrate", which fits each indexer to its layer's
    attention on `calibration_data` text files: calibration_tokens, calibration_seq_len, calibration_steps,
    calibration_lr), seed, max_shard_size, resume, overwrite,
    verify (run SRC and DST and compare logits), progress, export ("deepseek_v32": DeepSeek-V3.2's native format,
    which transformers' DeepseekV32ForCausalLM, vLLM and SGLang load without custom code; "glm_moe_dsa": GLM-5's;
    "gguf": a GGUF file for llama.cpp, written by the converter of the llama.cpp checkout `llama_cpp`, in `gguf_type`
    f32, f16 or bf16).
    Raises `ConversionError` (one line naming the file)."""
    if options.get("export") == "gguf":  # ours as DeepSeek-V3.2's format, then llama.cpp's converter
        from .llama_cpp import convert_to_gguf

        return convert_to_gguf(src, dst, options)
    opts = ConvertOptions(**options)
    check_options(opts)
    src_config = read_json(Path(src) / "config.json") if Path(src, "config.json").is_file() else {}
    if opts.from_gqa or (opts.from_gqa is None and is_gqa_source(src_config)):
        return _convert_gqa(Path(src), Path(dst), opts)
    gqa_flags = {"--kv-lora-rank": opts.kv_lora_rank, "--qk-rope-head-dim": opts.qk_rope_head_dim,
                 "--from-gqa": opts.from_gqa}  # fmt: skip
    what = next((flag for flag, value in gqa_flags.items() if value is not None), None)
    if what is not None:
        raise ConversionError(src, f"{what} applies to GQA sources ({', '.join(GQA_MODEL_TYPES)}); SRC's model_type "
                                   f"is {src_config.get('model_type')!r}")  # fmt: skip
    if opts.dtype not in DTYPES:
        raise ConversionError(dst, f"--dtype must be one of {list(DTYPES)}, got {opts.dtype!r}")
    if opts.indexer_init not in INDEXER_INITS:
        raise ConversionError(dst, f"--indexer-init must be one of {INDEXER_INITS}, got {opts.indexer_init!r}")
    if opts.indexer_init == "calibrate" and not opts.calibration_data:
        raise ConversionError(dst, "--indexer-init calibrate needs --calibration-data FILES (a few thousand tokens)")
    if opts.indexer_init != "calibrate" and opts.calibration_data:
        raise ConversionError(dst, f"--calibration-data is read only with --indexer-init calibrate, not "
                                   f"{opts.indexer_init}")  # fmt: skip
    src, dst = Path(src).resolve(), Path(dst).resolve()
    _check_calibration_files(opts.calibration_data, dst)
    partial = dst.parent / f".{dst.name}.mla-dsa-partial"
    finished = opts.resume and not partial.exists() and dst.is_dir() and any(dst.iterdir())
    _check_paths(src, dst, opts.overwrite or finished)
    source = SourceCheckpoint(src, follow_symlinks=opts.follow_symlinks)
    config = target_config(source, opts)
    if opts.export is not None:
        refusals = export_refusals(config, opts.export)
        if refusals:
            source.close()
            raise ConversionError(dst, f"cannot export to {opts.export}: " + "; ".join(refusals))
        for warning in export_warnings(config, opts.export):
            warnings.warn(f"--export {opts.export}: {warning}", UserWarning, stacklevel=2)
    plan = plan_output(source, config, opts)
    if opts.indexer_init != "random" and not any(t.source is None for shard in plan for t in shard.tensors):
        source.close()
        raise ConversionError(src, f"SRC has an indexer in every layer that needs one: --indexer-init "
                                   f"{opts.indexer_init} makes only the indexers a conversion grafts")  # fmt: skip
    if opts.indexer_init == "calibrate":
        try:  # refuse unusable data (no tokenizer, too few tokens) before anything is written
            calibration_windows(source, config, CalibrationOptions.of(opts))
        except ConversionError:
            source.close()
            raise
    if finished:  # a kill after the final rename: --resume finds DST complete, or refuses it as any other DST
        try:
            check_output(dst, plan)
        except ConversionError:
            source.close()
            _check_paths(src, dst, opts.overwrite)
        else:
            source.close()
            return dst
    try:
        write_shards(source, config, plan, partial, opts)
        write_metadata(source, config, plan, partial, opts.export)
    except OSError as err:  # disk full, permissions...: finished shards stay for --resume
        where = err.filename or partial
        raise ConversionError(where, f"write failed ({err.strerror or err}); fix it and rerun with --resume") from None
    finally:
        source.close()
    check_output(partial, plan)
    if opts.verify:
        verify_logits(source, partial, config, opts)
        verify_sparse(partial, config, opts)
    move_into_place(partial, dst)
    return dst


def _convert_gqa(src: Path, dst: Path, opts: ConvertOptions) -> Path:
    """GQA SRC: its dense MLA checkpoint first (`gqa.py`, in `.DST.mla-dsa-gqa`), then that converted to DSA."""
    src, dst = src.resolve(), dst.resolve()
    _check_paths(src, dst, True)  # DST's own emptiness is checked by the second stage
    _check_calibration_files(opts.calibration_data, dst)
    stage = dst.parent / f".{dst.name}.mla-dsa-gqa"
    source = SourceCheckpoint(src, follow_symlinks=opts.follow_symlinks)
    try:
        if not is_gqa_source(source.config):
            raise ConversionError(src / "config.json", f"--from-gqa: model_type {source.model_type!r} is not one of "
                                                       f"{', '.join(GQA_MODEL_TYPES)}")  # fmt: skip
        _check_indexer_options(source, dst, opts)  # before minutes of the GQA stage's calibration
        write_mla_stage(source, stage, opts)
        if opts.verify:
            verify_mla_stage(source, stage, opts)
    except OSError as err:
        raise ConversionError(err.filename or stage, f"write failed ({err.strerror or err}); fix it and rerun with "
                                                     "--resume") from None  # fmt: skip
    finally:
        source.close()
    rest = {k: v for k, v in asdict(opts).items()
            if k not in ("from_gqa", "kv_lora_rank", "qk_rope_head_dim", "follow_symlinks")}  # fmt: skip
    if opts.indexer_init != "calibrate":
        rest["calibration_data"] = None  # read by the first stage only
    result = convert_checkpoint(stage, dst, **rest)
    shutil.rmtree(stage)
    return result


def _check_indexer_options(source: SourceCheckpoint, dst: Path, opts: ConvertOptions) -> None:
    """The indexer flags against the MLA model the GQA stage will write: a shape the DSA stage refuses (a head
    narrower than the RoPE dims it rotates, say) is refused now, not after the GQA stage's calibration."""
    geometry, rank = checked_shape(source, opts)
    fields = mla_config_fields(source.config, rank, geometry.rope_dim, has_attention_biases(source))
    fields["index_n_heads"], fields["index_head_dim"] = default_indexer_shape(fields)
    fields.update({name: getattr(opts, name) for name in ("index_n_heads", "index_head_dim", "index_topk")
                   if getattr(opts, name) is not None})  # fmt: skip
    try:
        MlaDsaConfig(**fields)
    except ValueError as err:
        raise ConversionError(dst, f"{err} (from the indexer flags)") from None


def _check_calibration_files(paths, dst: Path) -> None:
    """Each calibration file exists, and lies outside DST (which the conversion replaces: a file there would be read,
    then deleted)."""
    for path in paths or ():
        if Path(path).is_dir():
            raise ConversionError(path, "is a directory: pass the text files in it (DIR/*.py, DIR/*.txt)")
        if not Path(path).is_file():
            raise ConversionError(path, "calibration data file not found")
        if dst in Path(path).resolve().parents:
            raise ConversionError(path, "is inside DST, which the conversion replaces: move the data out of DST")


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if src.is_file() and src.suffix == ".gguf":
        raise ConversionError(src, "is a GGUF file (llama.cpp's format); SRC is a safetensors checkpoint directory: "
                                   "save it as one first (transformers' from_pretrained(DIR, gguf_file=NAME) then "
                                   "save_pretrained; SmolLM2's: mla_dsa.smollm2.smollm2_checkpoint())")  # fmt: skip
    if not src.is_dir():
        raise ConversionError(src, "SRC is not a directory")
    if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        raise ConversionError(src, "is a LoRA adapter, not a checkpoint: convert the checkpoint it adapts, or merge "
                                   "it first (train-indexer --lora-save merged; or mla_dsa.training.load_trained(SRC)"
                                   ".save_pretrained(DIR), and AutoTokenizer.from_pretrained(SRC).save_pretrained(DIR) "
                                   "for its tokenizer)")  # fmt: skip
    if dst == src or src in dst.parents:
        raise ConversionError(dst, "DST is inside SRC; the source is never written to")
    if dst in src.parents:
        raise ConversionError(dst, "SRC is inside DST; replacing DST would delete the source")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(dst, "DST exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(dst, "DST exists and is not empty; pass --overwrite to replace it")


__all__ = ["ConvertOptions", "convert_checkpoint"]
