"""`mla-dsa convert SRC DST`: a dense MLA checkpoint becomes a DSA checkpoint, streaming, atomically, resumably.

1. Read SRC's config and safetensors headers (no tensor data) and plan the output: the same tensor names (MTP layers
   and FP8 scales dropped), plus an indexer per layer unless SRC has one, grouped into output shards that follow
   SRC's shards, so writing output shard i reads only source shard i (and the odd tensor it refers to).
2. Write each output shard into a temporary sibling of DST (`.DST.mla-dsa-partial`), each file atomically, and
   record it in a state file: after a kill, `--resume` skips finished shards and yields the same bytes.
3. Write config.json (an `MlaDsaConfig` with `auto_map`), the payload files, the index json, tokenizer and
   generation files; check every planned tensor is in place with its shape; optionally run both models (`--verify`);
   then rename the directory to DST. SRC is only ever read.

Peak memory: Python + torch, plus one output shard being assembled, plus the tensors an informed indexer init reads.
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..modeling.configuration_mla_dsa import MlaDsaConfig
from ..modeling.deepseek_format_mla_dsa import config_from_deepseek, deepseek_family
from .indexer_init import INDEXER_INITS, init_indexer
from .payload import payload_files
from .source import INDEX_NAME, SCALE_SUFFIX, ConversionError, SourceCheckpoint, TensorInfo, read_json

STATE_NAME = ".mla-dsa-convert-state.json"
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INDEXER_PARAMS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FORMAT_VERSION = 1


@dataclass
class ConvertOptions:
    dtype: str = "auto"
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    dense_attention_layers: list[int] | None = None
    indexer_init: str = "random"
    seed: int = 0
    max_shard_size: int | str = "5GB"
    resume: bool = False
    overwrite: bool = False
    verify: bool = False
    verify_tolerance: float | None = None
    follow_symlinks: bool = False
    progress: bool = True


@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str | None = None  # the source tensor it copies, or None for a new indexer tensor
    layer: int | None = None


@dataclass
class OutputShard:
    filename: str
    tensors: list[OutputTensor] = field(default_factory=list)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, **options) -> Path:
    """Converts the dense MLA checkpoint at `src` into a DSA checkpoint at `dst`; returns `dst`.

    Options (see `ConvertOptions`): dtype ("auto" keeps each tensor's dtype, FP8 becomes bf16), index_n_heads,
    index_head_dim, index_topk, indexer_init ("random" | "svd"), seed, max_shard_size, resume, overwrite,
    verify (run SRC and DST and compare logits), progress. Raises `ConversionError` (one line naming the file)."""
    opts = ConvertOptions(**options)
    if opts.dtype not in DTYPES:
        raise ConversionError(dst, f"--dtype must be one of {list(DTYPES)}, got {opts.dtype!r}")
    if opts.indexer_init not in INDEXER_INITS:
        raise ConversionError(dst, f"--indexer-init must be one of {INDEXER_INITS}, got {opts.indexer_init!r}")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    partial = dst.parent / f".{dst.name}.mla-dsa-partial"
    finished = opts.resume and not partial.exists() and dst.is_dir() and any(dst.iterdir())
    _check_paths(src, dst, opts.overwrite or finished)
    source = SourceCheckpoint(src, follow_symlinks=opts.follow_symlinks)
    config = target_config(source, opts)
    plan = plan_output(source, config, opts)
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
        _write_shards(source, config, plan, partial, opts)
        _write_metadata(source, config, plan, partial)
    except OSError as err:  # disk full, permissions...: finished shards stay for --resume
        where = err.filename or partial
        raise ConversionError(where, f"write failed ({err.strerror or err}); fix it and rerun with --resume") from None
    finally:
        source.close()
    check_output(partial, plan)
    if opts.verify:
        verify_logits(source, partial, config, opts)
    _move_into_place(partial, dst)
    return dst


# ------------------------------------------------------------------------------------------------------ planning
def target_config(source: SourceCheckpoint, opts: ConvertOptions) -> MlaDsaConfig:
    """The MlaDsaConfig of the output: SRC's architecture plus the indexer shape from the options."""
    config_path = source.path / "config.json"
    has_indexer = source_family(source) in ("deepseek_v32", "mla_dsa")
    fields = config_from_deepseek(source.config)
    for name in ("index_n_heads", "index_head_dim", "index_topk"):
        wanted = getattr(opts, name)
        if wanted is not None:
            if has_indexer and name != "index_topk" and fields.get(name) not in (None, wanted):
                raise ConversionError(config_path, f"SRC already has an indexer with {name}={fields[name]}; "
                                                   f"cannot change it to {wanted}")  # fmt: skip
            fields[name] = wanted
    if not has_indexer:
        heads, head_dim = default_indexer_shape(fields)
        fields.setdefault("index_n_heads", heads)
        fields.setdefault("index_head_dim", head_dim)
    if opts.dense_attention_layers is not None:
        fields["dense_attention_layers"] = list(opts.dense_attention_layers)
    fields["architectures"] = ["MlaDsaForCausalLM"]
    fields["dtype"] = str(_model_dtype(source, opts)).removeprefix("torch.")
    fields.pop("torch_dtype", None)
    try:
        return MlaDsaConfig(**fields)
    except (ValueError, TypeError) as err:
        raise ConversionError(config_path, str(err)) from None


def source_family(source: SourceCheckpoint) -> str:
    """The DeepSeek model type SRC is read as: its own, or, for other MLA checkpoints in DeepSeek's format that
    transformers has no class for (Kimi-K2's "kimi_k2", ...), the family its `architectures` or fields name.
    transformers' own MLA variants (GLM-4-MoE-Lite, MiniCPM3, LongCat, ...) are refused: their math differs."""
    config_path = source.path / "config.json"
    try:
        family = deepseek_family(source.config)
    except ValueError as err:
        raise ConversionError(config_path, str(err)) from None
    if family != source.model_type and _is_transformers_model_type(source.model_type):
        raise ConversionError(config_path, f"model_type {source.model_type!r} is transformers' own MLA variant, "
                                           "whose attention and routing need not be DeepSeek's; mla-dsa converts "
                                           "DeepSeek-format checkpoints (deepseek_v2/v3/v32, and model types "
                                           "transformers has no class for whose fields are DeepSeek's, as Kimi-K2's "
                                           "kimi_k2)")  # fmt: skip
    return family


def _is_transformers_model_type(model_type: str | None) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def default_indexer_shape(fields: dict) -> tuple[int, int]:
    """64 heads x 128 dims (DeepSeek-V3.2) for large models; smaller models get at least 8 heads (fewer make ReLU
    ties in the index score common) and a head of max(2 * qk_rope_head_dim, hidden_size / 8) up to 128 dims."""
    heads = fields.get("num_attention_heads", 128)
    hidden = fields.get("hidden_size", 7168)
    rope = fields.get("qk_rope_head_dim", 64)
    return min(64, max(8, heads)), min(128, max(2 * rope, hidden // 8))


def _model_dtype(source: SourceCheckpoint, opts: ConvertOptions) -> torch.dtype:
    if DTYPES[opts.dtype] is not None:
        return DTYPES[opts.dtype]
    anchor = source.tensors.get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    if anchor is None or anchor.is_fp8:
        return torch.bfloat16
    return anchor.dtype


def expected_tensors(config: MlaDsaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an MlaDsaForCausalLM of `config` saves (built on the meta device)."""
    from ..modeling.modeling_mla_dsa import MlaDsaForCausalLM

    with torch.device("meta"):
        model = MlaDsaForCausalLM(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def plan_output(source: SourceCheckpoint, config: MlaDsaConfig, opts: ConvertOptions) -> list[OutputShard]:
    """Output shards in order, each listing its tensors; checks SRC against the config on the way."""
    expected = expected_tensors(config)
    model_dtype = _model_dtype(source, opts)
    kept = _kept_source_tensors(source, config, expected)
    indexer_source = _layers_with_indexer(kept, config)
    groups: list[list[OutputTensor]] = [[] for _ in source.shards]
    shard_pos = {shard: pos for pos, shard in enumerate(source.shards)}
    for info in kept.values():
        dtype = _output_dtype(info, opts, model_dtype)
        groups[shard_pos[info.shard]].append(OutputTensor(info.name, dtype, info.shape, source=info.name))
    for layer in range(config.num_hidden_layers):
        if layer in indexer_source:
            continue
        anchor = f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"
        group = groups[shard_pos[kept[anchor].shard]]
        for param in INDEXER_PARAMS:
            name = f"model.layers.{layer}.self_attn.indexer.{param}"
            group.append(OutputTensor(name, model_dtype, expected[name], layer=layer))
    return _split_into_shards(groups, opts.max_shard_size)


def _kept_source_tensors(source, config, expected) -> dict[str, TensorInfo]:
    kept = {}
    for name, info in source.tensors.items():
        where = source.path / info.shard
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue  # multi-token-prediction layers
        if name.endswith(SCALE_SUFFIX) or name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in expected:
            raise ConversionError(where, f"unexpected tensor {name} (not part of this MLA architecture)")
        if info.shape != expected[name]:
            raise ConversionError(where, f"tensor {name} has shape {list(info.shape)}, "
                                         f"the config expects {list(expected[name])}")  # fmt: skip
        if info.is_fp8 and name + SCALE_SUFFIX not in source.tensors:
            raise ConversionError(where, f"FP8 tensor {name} has no {name + SCALE_SUFFIX}")
        kept[name] = info
    missing = [name for name in expected if name not in kept and ".self_attn.indexer." not in name]
    if missing:
        raise ConversionError(source.path, f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    return kept


def _layers_with_indexer(kept: dict[str, TensorInfo], config) -> set[int]:
    layers = set()
    for layer in range(config.num_hidden_layers):
        present = [f"model.layers.{layer}.self_attn.indexer.{p}" in kept for p in INDEXER_PARAMS]
        if all(present):
            layers.add(layer)
        elif any(present):
            raise ConversionError(f"layer {layer}", "SRC has some but not all indexer tensors")
    return layers


def _output_dtype(info: TensorInfo, opts: ConvertOptions, model_dtype: torch.dtype) -> torch.dtype:
    if info.is_fp8:
        return model_dtype
    target = DTYPES[opts.dtype]
    if target is None or not info.dtype.is_floating_point or info.name.endswith("e_score_correction_bias"):
        return info.dtype
    return target


def _split_into_shards(groups: list[list[OutputTensor]], max_shard_size) -> list[OutputShard]:
    pieces: list[list[OutputTensor]] = []
    for group in groups:
        if not group:
            continue
        by_name = {tensor.name: tensor for tensor in group}
        meta = {tensor.name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta") for tensor in group}
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
        pieces.extend([by_name[name] for name in names] for names in split.filename_to_tensors.values())
    if len(pieces) == 1:
        return [OutputShard("model.safetensors", pieces[0])]
    total = len(pieces)
    return [OutputShard(f"model-{i + 1:05d}-of-{total:05d}.safetensors", p) for i, p in enumerate(pieces)]


# ------------------------------------------------------------------------------------------------------- writing
def _fingerprint(source: SourceCheckpoint, plan: list[OutputShard], opts: ConvertOptions) -> str:
    """Identifies one conversion: same SRC, options and plan. A partial conversion resumes only if it matches."""
    described = {
        "version": _FORMAT_VERSION,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("resume", "overwrite", "verify", "progress")},
        "source": sorted((i.name, i.shard, str(i.dtype), i.shape) for i in source.tensors.values()),
        "sizes": {shard: (source.path / shard).stat().st_size for shard in source.shards},
        "plan": [(s.filename, [(t.name, str(t.dtype), t.shape, t.source) for t in s.tensors]) for s in plan],
    }
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


def _write_shards(source, config, plan: list[OutputShard], partial: Path, opts: ConvertOptions) -> None:
    fingerprint = _fingerprint(source, plan, opts)
    state = _start_state(partial, fingerprint, opts.resume)
    todo = [shard for shard in plan if not _is_done(partial, shard, state)]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="converting shards", unit="shard",
               disable=not opts.progress)  # fmt: skip
    produce = _Producer(source, config, opts)
    for shard in todo:
        tensors = {}
        for tensor in shard.tensors:
            bar.set_postfix_str(tensor.name, refresh=False)
            tensors[tensor.name] = produce(tensor)
        tmp = partial / (shard.filename + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, partial / shard.filename)
        del tensors
        state["done"][shard.filename] = (partial / shard.filename).stat().st_size
        _save_state(partial, state)
        bar.update(1)
    bar.close()


class _Producer:
    """Makes each output tensor: a source tensor (dequantized, cast) or a new indexer tensor. The five indexer tensors
    of a layer come from one init call, kept until the next layer's are asked for."""

    def __init__(self, source: SourceCheckpoint, config: MlaDsaConfig, opts: ConvertOptions):
        self.source, self.config, self.opts = source, config, opts
        self._layer: int | None = None
        self._indexer: dict[str, torch.Tensor] = {}

    def __call__(self, tensor: OutputTensor) -> torch.Tensor:
        if tensor.source is not None:
            return self.source.read(tensor.source, fp8_dtype=tensor.dtype).to(tensor.dtype).contiguous()
        if self._layer != tensor.layer:
            self._layer = tensor.layer
            self._indexer = init_indexer(
                self.config, tensor.layer, self.opts.indexer_init, self.opts.seed,
                read=lambda name: self.source.read(name, torch.float32),
            )  # fmt: skip
        suffix = tensor.name.split(".self_attn.indexer.")[1]
        return self._indexer[suffix].to(tensor.dtype).contiguous()


def _start_state(partial: Path, fingerprint: str, resume: bool) -> dict:
    state_path = partial / STATE_NAME
    if partial.exists() and resume and state_path.exists():
        state = read_json(state_path)
        if state.get("fingerprint") == fingerprint:
            _remove_strays(partial, state)
            return state
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    state = {"fingerprint": fingerprint, "done": {}}
    _save_state(partial, state)
    return state


def _remove_strays(partial: Path, state: dict) -> None:
    """A kill inside a write leaves temporary files (ours, or safetensors' own): drop all but finished shards."""
    for path in partial.iterdir():
        if path.name != STATE_NAME and path.name not in state["done"]:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _is_done(partial: Path, shard: OutputShard, state: dict) -> bool:
    path = partial / shard.filename
    return shard.filename in state["done"] and path.exists() and path.stat().st_size == state["done"][shard.filename]


def _save_state(partial: Path, state: dict) -> None:
    tmp = partial / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, partial / STATE_NAME)


def _write_metadata(source: SourceCheckpoint, config: MlaDsaConfig, plan: list[OutputShard], partial: Path) -> None:
    config.save_pretrained(partial)
    for payload in payload_files():
        shutil.copyfile(payload, partial / payload.name)
    if len(plan) > 1:
        total_size = sum(_nbytes(t) for shard in plan for t in shard.tensors)
        weight_map = {t.name: shard.filename for shard in plan for t in shard.tensors}
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for extra in source.extra_files():
        shutil.copyfile(extra, partial / extra.name)


def _nbytes(tensor: OutputTensor) -> int:
    count = 1
    for dim in tensor.shape:
        count *= dim
    return count * torch.empty(0, dtype=tensor.dtype).element_size()


def check_output(directory: Path, plan: list[OutputShard]) -> None:
    """Every planned tensor is in its shard with its dtype and shape, and the index json agrees."""
    written = SourceCheckpoint(directory)
    planned = {t.name: (shard.filename, t) for shard in plan for t in shard.tensors}
    if set(written.tensors) != set(planned):
        missing = sorted(set(planned) - set(written.tensors))
        extra = sorted(set(written.tensors) - set(planned))
        raise ConversionError(directory, f"output does not match the plan: missing {missing[:3]}, extra {extra[:3]}")
    for name, info in written.tensors.items():
        filename, tensor = planned[name]
        if info.shard != filename or info.shape != tensor.shape or info.dtype != tensor.dtype:
            raise ConversionError(directory / info.shard, f"tensor {name} is {info.dtype} {list(info.shape)} in "
                                                          f"{info.shard}; planned {tensor.dtype} {list(tensor.shape)} "
                                                          f"in {filename}")  # fmt: skip


def _move_into_place(partial: Path, dst: Path) -> None:
    (partial / STATE_NAME).unlink(missing_ok=True)
    if dst.exists():
        old = dst.parent / f".{dst.name}.mla-dsa-old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(partial, dst)
        shutil.rmtree(old)
    else:
        os.replace(partial, dst)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise ConversionError(src, "SRC is not a directory")
    if dst == src or src in dst.parents:
        raise ConversionError(dst, "DST is inside SRC; the source is never written to")
    if dst in src.parents:
        raise ConversionError(dst, "SRC is inside DST; replacing DST would delete the source")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(dst, "DST exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(dst, "DST exists and is not empty; pass --overwrite to replace it")


# ------------------------------------------------------------------------------------------------------- verify
def verify_logits(source: SourceCheckpoint, converted: Path, config: MlaDsaConfig, opts: ConvertOptions) -> float:
    """Runs SRC (transformers' own class where one exists) and the converted model with every token selected on a
    short random input, in float32; raises ConversionError above tolerance. Returns the max logit difference."""
    from ..modeling.modeling_mla_dsa import MlaDsaForCausalLM

    generator = torch.Generator().manual_seed(opts.seed)
    input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    reference = _reference_model(source, config, opts)
    converted_model = MlaDsaForCausalLM.from_pretrained(converted, dtype=torch.float32, use_sparse_attention=False)
    with torch.no_grad():
        expected = reference(input_ids).logits.float()
        actual = converted_model.eval()(input_ids).logits.float()
    diff = (expected - actual).abs().max().item()
    tolerance = opts.verify_tolerance or 1e-4 * max(1.0, expected.abs().max().item())
    print(f"verify: max |logit difference| = {diff:.3e} (tolerance {tolerance:.1e})")
    if not diff <= tolerance:
        raise ConversionError(converted, f"--verify failed: max logit difference {diff:.3e} > {tolerance:.1e}")
    return diff


def _reference_model(source: SourceCheckpoint, config: MlaDsaConfig, opts: ConvertOptions) -> torch.nn.Module:
    """SRC through transformers' class for its model type, run in float32 on the source tensors rounded to the
    output dtype exactly as the conversion rounds them (FP8 dequantized, --dtype cast)."""
    import transformers

    from ..modeling.modeling_mla_dsa import MlaDsaForCausalLM

    model_type = source_family(source)
    if model_type == "mla_dsa":
        model = MlaDsaForCausalLM(MlaDsaConfig(**{**config.to_dict(), "use_sparse_attention": False}))
    else:
        fields = {k: v for k, v in source.config.items() if k not in ("model_type", "quantization_config")}
        peer_config = transformers.AutoConfig.for_model(model_type, **{**fields, "dtype": "float32"})
        if model_type == "deepseek_v32":
            peer_config.index_topk = 1 << 30
        model = transformers.AutoModelForCausalLM.from_config(peer_config, dtype=torch.float32)
    model_dtype = _model_dtype(source, opts)
    state = {}
    for name, info in source.tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            dtype = _output_dtype(info, opts, model_dtype)
            state[name] = source.read(name, fp8_dtype=dtype).to(dtype).float()
    source.close()
    _load_into(model, state)
    return model.eval()


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads per-expert checkpoint tensors, fusing them where transformers' class stores experts as 3D tensors."""
    own = model.state_dict()
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        match = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if match and match.group(1) + ".gate_up_proj" in own:
            fused.setdefault(match.group(1), {}).setdefault(int(match.group(2)), {})[match.group(3)] = tensor
    for prefix, experts in fused.items():
        order = sorted(experts)
        state[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order]
        )
        state[prefix + ".down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    state = {name: tensor for name, tensor in state.items() if name in own}
    missing = [name for name in own if name not in state and "rotary" not in name and name != "lm_head.weight"]
    if missing:
        raise ConversionError("verify", f"reference model is missing {missing[:3]}")
    model.load_state_dict(state, strict=False)
    if "lm_head.weight" not in state:
        model.tie_weights()


__all__ = [
    "ConvertOptions",
    "convert_checkpoint",
    "default_indexer_shape",
    "plan_output",
    "source_family",
    "target_config",
]
