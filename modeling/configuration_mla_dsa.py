"""Configuration of an MLA model with DeepSeek Sparse Attention (DSA).

Field names and meanings follow transformers' DeepseekV2/V3/V32 configs, so a `config.json` written for any of them
(or for GLM-5, or a DeepSeek-format checkpoint of another name such as Kimi-K2's) reads into `MlaDsaConfig` where the
mla_dsa package is installed (`foreign_config_reader`). Part of the trust_remote_code payload: it imports only
transformers.
"""

from typing import Any

from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging

logger = logging.get_logger(__name__)

MODEL_TYPE = "mla_dsa"
PAYLOAD_VERSION_KEY = "mla_dsa_payload_version"
LAYER_TYPE = "mla_dsa_latent"  # the entry of `config.layer_types` that `DynamicCache(config)` builds our layer for
# Every name a cache goes by in some supported transformers release (5.24 renamed `past_key_values` to `cache`):
# Trainer drops these outputs at evaluation, device placement leaves them alone.
CACHE_NAMES = ["cache", "past_key_values"]

# The release of this payload; config.json records it (`PAYLOAD_VERSION_KEY`) so a checkpoint says which code wrote
# it. A checkpoint without it was written by 0.1.0. `mla-dsa upgrade-code DIR` refreshes an older checkpoint's code.
PAYLOAD_VERSION = "0.7.14"
FIRST_PAYLOAD_VERSION = "0.1.0"

ATTENTION_MODES = ("auto", "mha", "absorbed")
INDEXER_TYPES = ("full", "shared")
CHOICES = {"attention_mode": ATTENTION_MODES, "indexer_cache_dtype": ("auto", "fp8"),
           "latent_cache_dtype": ("auto", "fp8"), "indexer_scale_fmt": (None, "ue8m0")}  # fmt: skip
ROUTING_CHOICES = {"scoring_func": ("softmax", "sigmoid"),
                   "topk_method": ("greedy", "group_limited_greedy", "noaux_tc")}  # fmt: skip

# A config.json without these cannot describe its checkpoint's tensors: a default is used, with a warning.
REQUIRED_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim",
)  # fmt: skip
POSITIVE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
    "v_head_dim", "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings", "mha_max_length",
    "query_chunk_size", "moe_layer_freq",
)  # fmt: skip
MLA_FIELD_PREFIXES = ("index_", "indexer", "kv_", "q_", "qk_", "v_head", "use_sparse", "rope_", "dense_attention")

# Files of the payload, as `auto_map` names them; `save_pretrained` copies them beside the weights.
AUTO_MAP = {
    "AutoConfig": "configuration_mla_dsa.MlaDsaConfig",
    "AutoModel": "modeling_mla_dsa.MlaDsaModel",
    "AutoModelForCausalLM": "modeling_mla_dsa.MlaDsaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_mla_dsa.MlaDsaForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_mla_dsa.MlaDsaForTokenClassification",
}


# A class of its own rather than a subclass of DeepseekV3Config or DeepseekV32Config: it must read all three
# families' config.json (V2's softmax routing and group-limited greedy, V3's noaux_tc, V3.2's indexer), and it is
# frozen into checkpoints, where a parent's changed default or renamed field in a later transformers release would
# silently change what an old checkpoint means. Field names and meanings are DeepSeek's, so configs stay compatible.
class MlaDsaConfig(PreTrainedConfig):
    r"""
    Multi-head Latent Attention (DeepSeek-V2/V3) with a lightning indexer and top-k token selection (DeepSeek-V3.2).

    Every DeepSeek field keeps its transformers name. The defaults are DeepSeek-V3.2's. Fields of our own:

    use_sparse_attention (`bool`, defaults to `True`):
        Attend only to the `index_topk` keys the indexer selects. `False`, or `index_topk` >= the context, is
        exactly dense MLA.
    scoring_func (`str`, defaults to `"sigmoid"`):
        MoE router scores: `"softmax"` (DeepSeek-V2) or `"sigmoid"` (DeepSeek-V3).
    topk_method (`str`, defaults to `"noaux_tc"`):
        `"greedy"` or `"group_limited_greedy"` (V2, softmax scores) or `"noaux_tc"` (V3, sigmoid scores plus
        `e_score_correction_bias`).
    attention_mode (`str`, defaults to `"auto"`):
        `"mha"`: per-head keys and values expanded from the latent (top-k applied as a mask);
        `"absorbed"`: MQA over the latent with W_UK folded into the query and W_UV applied after attention
        (top-k applied by gathering the selected latent rows); `"auto"`: absorbed for decoding and for sparse
        prefill longer than `mha_max_length`, MHA otherwise.
    indexer_types (`list[str]`, defaults to `None`):
        Per layer, `"full"` (runs its own indexer) or `"shared"` (reuses the top-k selection of the nearest previous
        full layer, and has no indexer weights and caches no indexer keys), as GLM-5's `indexer_types`. `None`: every
        layer full (DeepSeek-V3.2).
    indexer_rope_interleave (`bool`, defaults to `False`):
        How the indexer rotates its RoPE dims: half-split pairs (DeepSeek-V3.2) or adjacent pairs (`True`, GLM-5).
    dense_attention_layers (`list[int]`, defaults to `None`):
        Layers that attend to every token even with DSA on (DeepSeek-V3.2 has none). Small models' first layer often
        spreads its attention over the whole context, which no top-k can cover.
    mha_max_length (`int`, defaults to 1024):
        In `"auto"` mode, the context length up to which a sparse multi-token forward uses masked MHA (O(L^2) work on
        dense kernels, where absorbed mode does O(L k) on gathered rows). Measured on 2 CPU cores at k = 256 with
        DeepSeek's head shapes (benchmarks/prefill_crossover.py): within 5 % of each other at 1K-2K keys, absorbed
        1.2x faster at 4K and 1.6x at 8K.
    query_chunk_size (`int`, defaults to 256):
        Queries processed together by the indexer and the sparse attention; bounds their memory to
        O(chunk * context) and O(chunk * index_topk).
    indexer_cache_dtype (`str`, defaults to `"auto"`):
        `"fp8"`: indexer keys are Hadamard-rotated and cached as e4m3 with one float32 scale per 128 values (132
        bytes per token for index_head_dim 128), as DeepSeek's inference code; queries are rounded the same way.
        `"auto"`: keys are cached in the model's dtype. Training (an indexer loss) always scores in full precision.
    indexer_scale_fmt (`str`, defaults to `None`):
        `"ue8m0"`: FP8 scales rounded up to powers of two (DeepSeek-V3.2's `scale_fmt`).
    latent_cache_dtype (`str`, defaults to `"auto"`):
        `"fp8"`: latent rows are cached in FlashMLA's layout, the `kv_lora_rank` values as e4m3 with one float32 scale
        per 128 and the RoPE values as bfloat16 (656 bytes per token for DeepSeek-V3.2's shapes; 788 with FP8
        indexer keys). Attention reads the rounded rows, for the new tokens too, as FlashMLA does. `"auto"`: the
        model's dtype. Training (an indexer loss) always uses full precision.
    """

    model_type = MODEL_TYPE
    # transformers' tensor-parallel plan (`from_pretrained(..., tp_plan="auto")` under torchrun), as DeepseekV32's:
    # query and key/value up-projections split by heads, o_proj and the MLPs' down projections reduce. The latent
    # (kv_a_proj_with_mqa, whose output every head reads) and the indexer stay whole on every process, so each one
    # caches the same latent and selects the same top-k; the router too, so every process routes alike.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Expert parallelism (`DistributedConfig(ep_size=...)`), as DeepseekV32's: each process owns a share of the
    # routed experts and tokens travel to them.
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    _auto_class = "AutoConfig"  # save_pretrained copies this file beside config.json
    keys_to_ignore_at_inference = CACHE_NAMES
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    # Multi-head latent attention
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    # Mixture of experts
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    routed_scaling_factor: float | int = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    output_router_logits: bool = False  # as DeepseekV32's: each MoE layer's router logits in the output
    # DeepSeek Sparse Attention
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    use_sparse_attention: bool = True
    indexer_types: list[str] | None = None
    indexer_rope_interleave: bool = False
    dense_attention_layers: list[int] | None = None
    # Execution
    attention_mode: str = "auto"
    mha_max_length: int = 1024
    query_chunk_size: int = 256
    indexer_cache_dtype: str = "auto"
    indexer_scale_fmt: str | None = None
    latent_cache_dtype: str = "auto"

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        # The rotary embedding reads `head_dim`: RoPE covers only the decoupled rope slice.
        self.head_dim = self.qk_rope_head_dim
        kwargs.pop("head_dim", None)
        kwargs.pop("qk_head_dim", None)
        if "auto_map" not in kwargs:
            kwargs["auto_map"] = dict(AUTO_MAP)
        if self.rope_parameters is None and "rope_scaling" not in kwargs and "rope_theta" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        # Derived, not a setting: every decoder layer caches latent + indexer keys, and this is what tells
        # `DynamicCache(config)` (generate's cache) to build MlaDsaCacheLayer for it.
        self.layer_types = [LAYER_TYPE] * self.num_hidden_layers
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        """Without `layer_types`: derived, and a generic reader of config.json (`PreTrainedConfig.from_json_file`,
        as Trainer's resume uses) accepts only transformers' own layer types."""
        config = super().to_dict()
        config.pop("layer_types", None)
        config[PAYLOAD_VERSION_KEY] = PAYLOAD_VERSION  # the code that writes this config
        return config

    # Validation through transformers' hook: `validate()` runs at construction, in `save_pretrained` and in
    # `from_dict` after from_pretrained's overrides. Not under huggingface_hub's `@strict` decorator, which would
    # re-raise each check's ValueError as a StrictDataclassClassValidationError (not a ValueError): loading, the CLI
    # and users' `except ValueError` rely on one ValueError naming the field.
    def validate(self) -> None:
        """Ours (`validate_fields`), each naming the field it refuses, then transformers' own checks."""
        self.validate_fields()
        # transformers' layer-type check knows only its own cache layer types: ours (one per layer) are set in
        # __post_init__, never read from config.json, so that check runs without them.
        ours, self.layer_types = self.layer_types, None
        try:
            super().validate()
        except Exception as err:  # huggingface_hub wraps each check's error: raise the ValueError itself
            if isinstance(err.__cause__, ValueError):
                raise err.__cause__ from None
            raise
        finally:
            self.layer_types = ours

    def validate_fields(self) -> None:
        """Shapes, the DSA fields, RoPE and (where a layer routes) the MoE routing, in that order."""
        for name in POSITIVE_FIELDS:
            self._check(name, _is_int(getattr(self, name), 1), "a positive integer")
        for name in ("qk_nope_head_dim", "first_k_dense_replace"):
            self._check(name, _is_int(getattr(self, name), 0), "a non-negative integer")
        for name, choices in CHOICES.items():
            self._check(name, getattr(self, name) in choices, f"one of {choices}")
        q_rank, rank = self.q_lora_rank, self.kv_lora_rank
        rope_dim, index_dim = self.qk_rope_head_dim, self.index_head_dim
        self._check("q_lora_rank", q_rank is None or _is_int(q_rank, 1), "a positive integer or None (as V2-Lite)")
        self._check("qk_rope_head_dim", rope_dim % 2 == 0, "even (RoPE rotates pairs)")
        self._check("index_head_dim", index_dim >= rope_dim, f"at least qk_rope_head_dim={rope_dim} (rotated dims)")
        if self.latent_cache_dtype == "fp8":
            self._check("kv_lora_rank", rank % min(128, rank) == 0, "a multiple of 128 (or below 128) for fp8")
        if self.indexer_cache_dtype == "fp8":
            power_of_two = index_dim & (index_dim - 1) == 0 and index_dim >= 16
            self._check("index_head_dim", power_of_two, "a power of two >= 16 for fp8 (Hadamard rotation)")
        layers, dense, types = self.num_hidden_layers, self.dense_attention_layers, self.indexer_types
        dense_ok = (
            dense is None or isinstance(dense, (list, tuple)) and all(_is_int(i, 0) and i < layers for i in dense)
        )
        self._check("dense_attention_layers", dense_ok, f"None or a list of layer indices below {layers}")
        types_ok = types is None or isinstance(types, (list, tuple)) and len(types) == layers and types[0] == "full"
        types_ok = types_ok and (types is None or all(kind in INDEXER_TYPES for kind in types))
        self._check("indexer_types", types_ok, f"None or one of {INDEXER_TYPES} per layer ({layers}), the first 'full'")
        for layer in range(layers):
            source = self.indexer_source_layer(layer)
            if source != layer and source in (dense or ()):
                raise ValueError(f"MlaDsaConfig: layer {layer} shares the selection of layer {source}, which is in "
                                 "dense_attention_layers and selects nothing")  # fmt: skip
        rope = self.rope_parameters
        rope_types = ("default", *ROPE_INIT_FUNCTIONS)  # what the installed transformers computes
        rope_ok = isinstance(rope, dict) and rope.get("rope_type") in rope_types
        self._check("rope_parameters", rope_ok, f"a dict whose rope_type is one of {rope_types}")
        if any(self.is_moe_layer(idx) for idx in range(layers)):
            self.validate_routing()

    def validate_routing(self) -> None:
        """Routing fields matter only where a layer routes: a dense-only checkpoint (first_k_dense_replace >= layers)
        may keep transformers' defaults (n_group=8 with 4 experts), which its own classes load and run."""
        for name, choices in ROUTING_CHOICES.items():
            self._check(name, getattr(self, name) in choices, f"one of {choices}")
        self._check("moe_intermediate_size", _is_int(self.moe_intermediate_size, 1), "a positive integer")
        experts, per_token, method = self.n_routed_experts, self.num_experts_per_tok, self.topk_method
        self._check("num_experts_per_tok", _is_int(per_token, 1) and per_token <= experts, f"in 1..{experts} (experts)")
        if method == "noaux_tc":
            self._check("scoring_func", self.scoring_func == "sigmoid", "'sigmoid' for topk_method='noaux_tc' (V3)")
        if method in ("group_limited_greedy", "noaux_tc"):
            groups, group_k = self.n_group, self.topk_group
            self._check("n_group", _is_int(groups, 1) and experts % groups == 0, f"a divisor of {experts} (experts)")
            self._check("topk_group", _is_int(group_k, 1) and group_k <= groups, f"in 1..n_group={groups}")
            two_each = method != "noaux_tc" or experts // groups >= 2  # noaux_tc scores a group by its best two
            self._check("n_group", two_each, f"at most {experts} / 2 (experts) for noaux_tc")

    def _check(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"MlaDsaConfig: {name} must be {expected}, got {getattr(self, name)!r}")

    def is_shared_indexer_layer(self, layer_idx: int) -> bool:
        """Whether the layer reuses an earlier layer's top-k instead of running an indexer of its own."""
        return self.indexer_types is not None and self.indexer_types[layer_idx] == "shared"

    def indexer_source_layer(self, layer_idx: int) -> int:
        """The layer whose indexer selects this layer's keys: itself, or the nearest previous full layer."""
        while self.is_shared_indexer_layer(layer_idx):
            layer_idx -= 1
        return layer_idx

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq`-th layer."""
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and (layer_idx % self.moe_layer_freq == 0)
        )

    # Set by the mla_dsa package (`mla_dsa.deepseek_format`), which reads config.json files written for transformers'
    # DeepseekV2/V3/V32 and GlmMoeDsa (and DeepSeek-format models of other names) as ours; a checkpoint's own code
    # only ever reads its own config.
    foreign_config_reader = None

    @classmethod
    def own_fields(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        """A config dict's fields as ours (without `model_type`): ours as they are, another model's through
        `foreign_config_reader`."""
        model_type = config_dict.get("model_type", MODEL_TYPE)
        if model_type == MODEL_TYPE:
            return {name: value for name, value in config_dict.items() if name != "model_type"}
        if cls.foreign_config_reader is None:
            raise ValueError(
                f"MlaDsaConfig: a config.json of model_type {model_type!r} is read as ours by the mla_dsa package "
                "(pip install mla-dsa), or converted by `mla-dsa convert`"
            )
        return cls.foreign_config_reader(config_dict)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' reading of config.json, a DeepSeek-format one mapped onto our fields at once: it is read
        as ours by design, and transformers would otherwise warn on every such load that a `deepseek_v3` config
        "is not supported and can yield errors" as an `mla_dsa` one."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            config_dict = {**cls.own_fields(config_dict), "model_type": MODEL_TYPE}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "MlaDsaConfig":
        """Reads our own config.json (and, with the mla_dsa package, those of DeepSeek-format models).

        Warns, naming the field, when an MLA shape field is missing (its default is used) or when an unknown field
        looks like an MLA/DSA one (a typo the model would silently ignore)."""
        fields = cls.own_fields(config_dict)
        # derived, and RoPE's legacy fields (transformers turns them into rope_parameters)
        known = (
            set(cls.__dataclass_fields__)
            | set(cls.attribute_map)
            | {"qk_head_dim", "head_dim", "rope_scaling", "rope_theta"}
        )
        for name in REQUIRED_SHAPE_FIELDS:
            if name not in fields:
                logger.warning(f"MlaDsaConfig: config has no {name}; using the default {getattr(cls, name)!r}")
        for name in sorted(fields):
            if name not in known and name.startswith(MLA_FIELD_PREFIXES):
                logger.warning(f"MlaDsaConfig: unknown field {name} is ignored by the model (a typo?)")
        result = super().from_dict(fields, **kwargs)
        # from_pretrained(..., index_topk=-1) sets overrides after __post_init__ checked the fields: check again.
        config = result[0] if isinstance(result, tuple) else result
        config.layer_types = [LAYER_TYPE] * config.num_hidden_layers
        config.validate()
        return result


def _is_int(value: Any, at_least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


__all__ = ["MlaDsaConfig"]
