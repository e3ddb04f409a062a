"""Planning a conversion from SRC's config and safetensors headers alone (no tensor data): the output config, and
which tensors go into which output shard.

The output keeps SRC's tensor names. Name rules, as data below: what is dropped (`DROPPED_TENSORS`, and layers past
`num_hidden_layers`: DeepSeek-V3's multi-token-prediction layers) and what is added (`INDEXER_PARAMS` per layer that
has no indexer). Output shards follow SRC's shards, so writing output shard i reads only source shard i (and the odd
tensor it refers to).
"""

import re
from dataclasses import dataclass, field

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from ..deepseek_format import config_from_deepseek, deepseek_family, glm_indexer_types
from ..modeling.configuration_mla_dsa import POSITIVE_FIELDS, REQUIRED_SHAPE_FIELDS, MlaDsaConfig
from ..modeling.modeling_mla_dsa import FUSED_EXPERTS, LATENT_MODULES
from .source import SCALE_SUFFIX, ConversionError, SourceCheckpoint, TensorInfo

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The tensors of one layer's indexer, under `model.layers.{i}.self_attn.indexer.`.
INDEXER_PARAMS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
# Source tensors the output does not carry: FP8 block scales (the output is dequantized) and RoPE buffers some
# exporters save (recomputed from the config).
DROPPED_TENSORS = (re.compile(re.escape(SCALE_SUFFIX) + "$"), re.compile(r"rotary_emb\.inv_freq$"))
# The router's weight and bias, written float32 whatever --dtype says (with --dtype auto, as the source has them):
# transformers keeps both float32 in a model of any dtype (`_keep_in_fp32_modules_strict`), and a bf16-rounded router
# weight sends tokens to other experts.
FLOAT32_TENSORS = (re.compile(r"e_score_correction_bias$"), re.compile(r"\.mlp\.gate\.weight$"))
# The indexer's head weights, written float32 in a float16 checkpoint: transformers keeps them float32 in a float16
# model (`_keep_in_fp32_modules`, as DeepseekV32 and GlmMoeDsa), and its save_pretrained writes them so.
FLOAT16_KEPT_TENSORS = re.compile(r"\.self_attn\.indexer\.weights_proj\.weight$")
# A GQA conversion's latent down-projections and norms (`linear_latent_norm`): its latents sit below float16's normal
# range, so a float16 checkpoint keeps these in float32, as `from_pretrained` keeps them in a float16 model.
LATENT_TENSORS = re.compile(r"\.self_attn\.(" + "|".join(LATENT_MODULES) + r")\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class ConvertOptions:
    dtype: str = "auto"
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    dense_attention_layers: list[int] | None = None
    index_share: int | None = None  # one full indexer in N layers (GLM-5.2's pattern), the rest shared
    indexer_types: str | list[str] | None = None  # "FSSF..." or ["full", "shared", ...]
    export: str | None = None  # a serving format (`export.EXPORT_FORMATS`), or None for ours
    indexer_init: str = "random"
    from_gqa: bool | None = None  # None: GQA sources (llama, mistral, qwen2, ...) are detected from model_type
    kv_lora_rank: int | None = None  # a GQA source's latent width (default: its full key/value width, no compression)
    qk_rope_head_dim: int | None = None  # a GQA source's shared RoPE key (default: one head's width)
    calibration_data: list[str] | None = None  # text files for indexer_init="calibrate"
    calibration_tokens: int = 4096
    calibration_seq_len: int = 512
    calibration_steps: int = 100
    calibration_lr: float = 1e-2
    seed: int = 0
    max_shard_size: int | str = "5GB"
    resume: bool = False
    overwrite: bool = False
    verify: bool = False
    verify_tolerance: float | None = None
    follow_symlinks: bool = False
    trust_remote_code: bool = False  # SRC's tokenizer may run the code it ships (Kimi-K2's, Moonlight's)
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


# Options that must be positive where given: checked before SRC is read, so a bad value is blamed on the option.
POSITIVE_OPTIONS = ("index_n_heads", "index_head_dim", "index_topk", "index_share", "kv_lora_rank", "qk_rope_head_dim",
                    "calibration_tokens", "calibration_seq_len", "calibration_steps", "calibration_lr",
                    "verify_tolerance")  # fmt: skip


def check_options(opts: ConvertOptions) -> None:
    """ValueError naming the option (as its command-line flag) for a value no conversion can use."""
    for name in POSITIVE_OPTIONS:
        value = getattr(opts, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")


def check_source_shape(config: dict, config_path) -> None:
    """SRC's shape fields, where present, are positive integers: anything else is one error naming the field (a
    string or null there failed later with a TypeError from deep inside the plan)."""
    for name in dict.fromkeys(REQUIRED_SHAPE_FIELDS + POSITIVE_FIELDS):
        value = config.get(name)
        if name not in config or value is None and name not in REQUIRED_SHAPE_FIELDS:  # optional and unset
            continue
        least, what = (1, "a positive integer") if name in POSITIVE_FIELDS else (0, "an integer >= 0")
        if isinstance(value, bool) or not isinstance(value, int) or value < least:  # qk_nope_head_dim may be 0
            raise ConversionError(config_path, f"{name} must be {what}, got {value!r}")


def target_config(source: SourceCheckpoint, opts: ConvertOptions) -> MlaDsaConfig:
    """The MlaDsaConfig of the output: SRC's architecture plus the indexer shape from the options."""
    config_path = source.path / "config.json"
    check_source_shape(source.config, config_path)
    has_indexer = source_family(source) in ("deepseek_v32", "glm_moe_dsa", "mla_dsa")
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
    if opts.index_share is not None or opts.indexer_types is not None:
        fields["indexer_types"] = sharing_pattern(opts, fields.get("num_hidden_layers", 61), config_path)
    fields["architectures"] = ["MlaDsaForCausalLM"]
    fields["num_nextn_predict_layers"] = 0  # SRC's multi-token-prediction layers are not carried over
    fields["dtype"] = str(model_dtype(source, opts)).removeprefix("torch.")
    fields.pop("torch_dtype", None)
    try:
        return MlaDsaConfig(**fields)
    except (ValueError, TypeError) as err:
        raise ConversionError(config_path, str(err)) from None


def sharing_pattern(opts: ConvertOptions, num_layers: int, config_path) -> list[str] | None:
    """The output's indexer_types from --index-share N (GLM's rule: full where max(i - 1, 0) % N == 0) or
    --indexer-types FSSF...; None when every layer stays full."""
    if opts.index_share is not None and opts.indexer_types is not None:
        raise ConversionError(config_path, "pass --index-share or --indexer-types, not both")
    if opts.index_share is not None:
        sharing = {"index_topk_freq": opts.index_share}
    else:
        if isinstance(opts.indexer_types, str) and set(opts.indexer_types) - {"F", "S"}:
            raise ConversionError(config_path, f"--indexer-types is one F or S per layer, got {opts.indexer_types!r}")
        sharing = {"index_topk_pattern": opts.indexer_types}
    return glm_indexer_types({"num_hidden_layers": num_layers, **sharing})  # GLM's own two ways of saying it


def source_family(source: SourceCheckpoint) -> str:
    """The DeepSeek model type SRC is read as: its own, or, for other MLA checkpoints in DeepSeek's format that
    transformers has no class for (Kimi-K2's "kimi_k2", ...), the family its `architectures` or fields name.
    transformers' own MLA variants (GLM-4-MoE-Lite, MiniCPM3, LongCat, ...) are refused: their math differs."""
    config_path = source.path / "config.json"
    try:
        family = deepseek_family(source.config)
    except ValueError as err:
        raise ConversionError(config_path, f"{err}; GQA models (model_type llama, mistral, qwen2) are converted "
                                           "through MLA") from None  # fmt: skip
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
    ties in the index score common) and a head of max(2 * qk_rope_head_dim, hidden_size / 8) up to 128 dims, never
    narrower than the RoPE dims it rotates (a GQA conversion's RoPE key may be wider)."""
    heads = fields.get("num_attention_heads", 128)
    hidden = fields.get("hidden_size", 7168)
    rope = fields.get("qk_rope_head_dim", 64)
    return min(64, max(8, heads)), max(rope, min(128, max(2 * rope, hidden // 8)))


def model_dtype(source: SourceCheckpoint, opts: ConvertOptions) -> torch.dtype:
    if DTYPES[opts.dtype] is not None:
        return DTYPES[opts.dtype]
    anchor = source.tensors.get("model.layers.0.self_attn.kv_b_proj.weight")  # never kept float32 (LATENT_TENSORS)
    if anchor is None or anchor.is_fp8:
        return torch.bfloat16
    return anchor.dtype


def expected_tensors(config: MlaDsaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an MlaDsaForCausalLM of `config` saves (built on the meta device)."""
    from ..modeling.modeling_mla_dsa import MlaDsaForCausalLM

    with torch.device("meta"):
        model = MlaDsaForCausalLM(config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        shapes.update(checkpoint_names(name, tuple(tensor.shape)))
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def checkpoint_names(name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors a model tensor is saved as: DeepSeek's per-expert names for the fused experts
    (`FUSED_EXPERTS`, what transformers' conversion mapping writes), the name itself otherwise."""
    for fused, parts in FUSED_EXPERTS.items():
        if name.endswith(f"mlp.experts.{fused}"):
            prefix, experts = name[: -len(fused)], shape[0]  # "...mlp.experts."
            rows = shape[1] // len(parts)
            return {f"{prefix}{e}.{part}.weight": (rows, shape[2]) for e in range(experts) for part in parts}
    return {name: shape}


def plan_output(source: SourceCheckpoint, config: MlaDsaConfig, opts: ConvertOptions) -> list[OutputShard]:
    """Output shards in order, each listing its tensors; checks SRC against the config on the way."""
    expected = expected_tensors(config)
    dtype_of_model = model_dtype(source, opts)
    kept = _kept_source_tensors(source, config, expected)
    indexer_source = _layers_with_indexer(kept, config)
    groups: list[list[OutputTensor]] = [[] for _ in source.shards]
    shard_pos = {shard: pos for pos, shard in enumerate(source.shards)}
    linear_latent = bool(getattr(config, "linear_latent_norm", False))
    for info in kept.values():
        dtype = output_dtype(info, opts, dtype_of_model, linear_latent)
        groups[shard_pos[info.shard]].append(OutputTensor(info.name, dtype, info.shape, source=info.name))
    for layer in range(config.num_hidden_layers):
        if layer in indexer_source or config.is_shared_indexer_layer(layer):  # a shared layer has no indexer
            continue
        anchor = f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"
        group = groups[shard_pos[kept[anchor].shard]]
        for param in INDEXER_PARAMS:
            name = f"model.layers.{layer}.self_attn.indexer.{param}"
            group.append(OutputTensor(name, float16_kept_dtype(name, dtype_of_model), expected[name], layer=layer))
    return _split_into_shards(groups, opts.max_shard_size)


def _kept_source_tensors(source, config, expected) -> dict[str, TensorInfo]:
    kept = {}
    for name, info in source.tensors.items():
        where = source.path / info.shard
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue  # multi-token-prediction layers
        if any(rule.search(name) for rule in DROPPED_TENSORS):
            continue
        if layer and ".self_attn.indexer." in name and config.is_shared_indexer_layer(int(layer.group(1))):
            continue  # SRC's indexer of a layer that now shares another's top-k
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


def output_dtype(info: TensorInfo, opts: ConvertOptions, model_dtype: torch.dtype, linear_latent: bool = False
                 ) -> torch.dtype:  # fmt: skip
    if info.is_fp8:
        return model_dtype
    target = DTYPES[opts.dtype]
    if target is None or not info.dtype.is_floating_point:
        return info.dtype
    if any(rule.search(info.name) for rule in FLOAT32_TENSORS):
        return torch.float32
    target = float16_kept_dtype(info.name, target)
    return latent_dtype(info.name, target) if linear_latent else target


def float16_kept_dtype(name: str, dtype: torch.dtype, kept: re.Pattern = FLOAT16_KEPT_TENSORS) -> torch.dtype:
    """float32 for a tensor a float16 checkpoint keeps float32 (`kept`), else `dtype`."""
    return torch.float32 if dtype == torch.float16 and kept.search(name) else dtype


def latent_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a `linear_latent_norm` checkpoint of `dtype` stores tensor `name` in (LATENT_TENSORS)."""
    return float16_kept_dtype(name, dtype, LATENT_TENSORS)


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


__all__ = [
    "DTYPES",
    "ConvertOptions",
    "OutputShard",
    "OutputTensor",
    "default_indexer_shape",
    "expected_tensors",
    "float16_kept_dtype",
    "latent_dtype",
    "model_dtype",
    "output_dtype",
    "plan_output",
    "source_family",
    "target_config",
]
