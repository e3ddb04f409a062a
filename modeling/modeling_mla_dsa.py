"""MLA + DeepSeek Sparse Attention models, loadable with `trust_remote_code=True`. Read top to bottom: settings of one
forward, rotary embedding, which keys a query may see, the MLP and the MoE, the lightning indexer, the attention, the
decoder layer, the models.

Shapes: B batch, S new tokens (queries), T cached + new tokens (keys), H heads, R `kv_lora_rank`, dn/dr/dv
`qk_nope_head_dim`/`qk_rope_head_dim`/`v_head_dim`, k the number of selected keys per query.

What differs between the transformers releases this file runs on (5.14 to the newest) is read off the installed one,
never off version numbers: the cache's name (`CACHE_NAME`: 5.24 renamed `past_key_values` to `cache`) and `crop(-n)`
against `crop(length)` (the cache layers read both). The routed experts are `@use_experts_implementation`, a name
transformers looks for in this file's source before it lets `experts_implementation` be chosen.
"""

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.integrations import use_experts_implementation
from transformers.modeling_layers import (
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_mla_dsa import (
    FP8_BLOCK,
    OWN_LAYER_TYPE,
    MlaDsaCache,
    cache_lengths,
    check_cache,
    fp8_round_trip,
    pack_fp8_rows,
    pack_latent_rows,
    static_cache_size,
    unpack_fp8_rows,
    unpack_latent_rows,
)
from .configuration_mla_dsa import (
    ATTENTION_MODES,
    CACHE_NAMES,
    MODEL_TYPE,
    MlaDsaConfig,
)

logger = logging.get_logger(__name__)


CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
DEPRECATED_CACHE_NAME = "past_key_values" if CACHE_NAME == "cache" else None


def take_cache(cache, kwargs: dict, owner: str):
    """The cache a forward was given as `cache` or as `past_key_values` (popped from `kwargs`).

    `past_key_values` warns where the running transformers has deprecated it, as transformers' own models do."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is None:
        return cache
    if cache is not None:
        raise ValueError(f"{owner}: got both `cache` and `past_key_values`; pass the cache once, as `cache`")
    if DEPRECATED_CACHE_NAME is not None:
        warnings.warn(
            f"`past_key_values` is deprecated for `{owner}` (as in transformers' own models since 5.24); use `cache`",
            FutureWarning,
            stacklevel=3,
        )
    return legacy


# Where the indexer's training losses are (the model computes none): the installed package, outside every checkpoint.
TRAINING_MOVED = (
    "the indexer's training losses are computed by the mla_dsa package, not by the model: "
    "`with mla_dsa.IndexerLoss(model, stage) as indexer_loss: out = model(...)`, then `indexer_loss.kl`"
)


@dataclass(frozen=True)
class DsaSettings:
    """use_sparse_attention: attend only to the `index_topk` keys the indexer selects (no effect where the context
    is no longer than k). attention_mode: "auto" | "mha" | "absorbed" (see `MlaDsaAttention`)."""

    use_sparse_attention: bool
    index_topk: int
    attention_mode: str

    @classmethod
    def resolve(
        cls,
        config,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
    ) -> "DsaSettings":
        if isinstance(getattr(config, "indexer_loss", None), str):  # the switch of payloads before 0.4.0
            raise ValueError(f"config.indexer_loss is no longer read: {TRAINING_MOVED}")
        if use_sparse_attention is None:
            use_sparse_attention = config.use_sparse_attention
        index_topk = config.index_topk if index_topk is None else index_topk
        if isinstance(index_topk, bool) or not isinstance(index_topk, int) or index_topk <= 0:
            raise ValueError(f"index_topk must be a positive integer, got {index_topk!r}")
        attention_mode = config.attention_mode if attention_mode is None else attention_mode
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
        return cls(bool(use_sparse_attention), index_topk, attention_mode)


class MlaDsaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class MlaDsaRotaryEmbedding(nn.Module):
    """Rotary embedding of the decoupled RoPE slice. Two layouts rotate it: adjacent pairs (x0, x1), (x2, x3), ...
    for the main attention of V2/V3 checkpoints (`rope_interleave=True`; V2 writes it as complex multiplication), and
    half-split (NeoX) pairs (x_i, x_{i + d/2}) for the V3.2 indexer and `rope_interleave=False`.

    cos/sin [B, S, qk_rope_head_dim] for positions [B, S], any position (past max_position_embeddings too), in
    every rope type transformers computes: default, linear, yarn, llama3, ... and, through transformers' own
    `dynamic_rope_update`, "dynamic" (NTK frequencies grow with the sequence) and "longrope" (long factors past the
    original length)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings  # read by dynamic_rope_update
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            inv_freq, self.attention_scaling = _default_inv_freq(config), 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, **kwargs) -> tuple[torch.Tensor, float]:
        return _default_inv_freq(config), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _default_inv_freq(config) -> torch.Tensor:
    dim = config.qk_rope_head_dim
    base = config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def apply_rotary_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x_i, x_{i+d/2}); cos/sin [..., d] broadcast against x [..., d]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs (x_{2i}, x_{2i+1}); the result is laid out [rotated evens | rotated odds].

    Queries and keys both come out in that layout, so their dot products equal those of the interleaved layout."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def yarn_softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times mscale^2 under YaRN with `mscale_all_dim` (DeepSeek-V3's long-context scaling)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = rope["factor"]
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    return scale


class VisibleKeys:
    """Which keys each query may see: causal by cache position, not padding, and, in a packed row (several
    sequences one after another, as DataCollatorWithFlattening makes them), only its own sequence's; or, given a
    custom mask (`key_padding_mask` [B or 1, S, T], from a 4D attention mask), exactly what it says."""

    def __init__(
        self,
        past_len: int | torch.Tensor,
        num_keys: int,
        key_padding_mask: torch.Tensor | None,
        device: torch.device,
        segment_ids: torch.Tensor | None = None,
    ):
        self.past_len, self.num_keys = past_len, num_keys
        self.key_padding_mask = key_padding_mask  # [B, T] bool, a custom [B or 1, S, T] bool, or None
        self.custom = key_padding_mask is not None and key_padding_mask.dim() == 3
        self.segment_ids = segment_ids  # [B, T] int (which packed sequence each position is in) or None
        self.device = device

    def mask(self, start: int, end: int) -> torch.Tensor:
        """[B or 1, end - start, T] bool for queries start..end-1 of this forward."""
        if self.custom:
            return self.key_padding_mask[:, start:end]
        # past_len: an int, or a static cache's device scalar (then T is the cache's fixed size)
        query_pos = torch.arange(start, end, device=self.device) + self.past_len
        visible = (torch.arange(self.num_keys, device=self.device) <= query_pos[:, None]).unsqueeze(0)  # [1, s, T]
        if self.key_padding_mask is not None:
            visible = visible & self.key_padding_mask[:, None, :]
        if self.segment_ids is not None:
            query_segments = self.segment_ids[:, self.past_len + start : self.past_len + end]
            visible = visible & (query_segments[:, :, None] == self.segment_ids[:, None, :])
        return visible

    def causal_only(self, num_queries: int) -> bool:
        """Whether the queries of this forward see exactly the causal keys: no cache before them, no padding, no
        packing. Attention can then run as `is_causal`, which never builds an S x T mask."""
        no_past = not isinstance(self.past_len, torch.Tensor) and self.past_len == 0
        return no_past and num_queries == self.num_keys and self.key_padding_mask is None and self.segment_ids is None

    def causal_prefix(self, end: int, at_least: int) -> int:
        """How many leading keys queries before `end` may see, but at least `at_least` (so every query block selects
        the same number of keys), at most all. A static cache's device-side length gives no host-side bound: all."""
        if isinstance(self.past_len, torch.Tensor) or self.custom:
            return self.num_keys
        return min(self.num_keys, max(self.past_len + end, at_least))


def selected_keys_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, S, T] bool, True at the selected key positions `indices` [B, S, k]."""
    mask = torch.zeros(*indices.shape[:-1], num_keys, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def gather_rows(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """rows [B, T, C] picked by indices [B, s, k] -> [B, s, k, C] (index_select per batch row: a copy of just the
    selected rows, never of all T)."""
    picked = [rows[b].index_select(0, indices[b].reshape(-1)) for b in range(rows.shape[0])]
    stacked = picked[0].unsqueeze(0) if len(picked) == 1 else torch.stack(picked)
    return stacked.view(*indices.shape, rows.shape[-1])


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 over the last dim, cast back; a row with no valid entry gives zeros, not NaN."""
    dtype = scores.dtype
    masked = scores.float().masked_fill(~valid, float("-inf"))
    return torch.softmax(masked, dim=-1).nan_to_num(0.0).to(dtype)


class MlaDsaMLP(nn.Module):
    def __init__(self, config: MlaDsaConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MlaDsaRouter(nn.Module):
    """DeepSeek expert routing: V2 softmax (greedy / group-limited greedy) or V3 sigmoid with bias (noaux_tc)."""

    def __init__(self, config: MlaDsaConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        # float32 whatever the model's dtype, from construction on (as transformers' routers): bf16 picks other experts
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [N, hidden] -> the router logits [N, E] (float32; what `output_router_logits` returns, as
        transformers' DeepSeek routers do), the float32 expert weights [N, top_k] and the expert indices [N, top_k]."""
        logits = F.linear(hidden_states.float(), self.weight.float())  # [N, E]
        if self.config.scoring_func == "sigmoid":
            indices, weights = self._route_sigmoid(logits.sigmoid())
        else:
            indices, weights = self._route_softmax(logits.softmax(dim=-1))
        return logits, weights, indices

    def _route_sigmoid(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        choice = scores + self.e_score_correction_bias
        groups = choice.view(-1, self.config.n_group, self.num_experts // self.config.n_group)
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]: a group's two best experts
        choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.config.routed_scaling_factor

    def _route_softmax(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.topk_method == "group_limited_greedy":
            groups = scores.view(-1, self.config.n_group, self.num_experts // self.config.n_group)
            scores = scores.masked_fill(~self._group_mask(groups.max(dim=-1).values), 0.0)
        weights, indices = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.config.norm_topk_prob:
            return indices, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.config.routed_scaling_factor

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[N, E] bool: experts of the `topk_group` best groups."""
        best = group_scores.topk(self.config.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return group_mask.repeat_interleave(self.num_experts // self.config.n_group, dim=1)


# Each fused expert parameter [E, rows, cols] and the per-expert checkpoint tensors stacked in it along rows, in order:
# the one definition of the checkpoint names (loading, saving and the converter's plan all read it).
FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def expert_layout() -> list:
    """transformers' conversion between DeepSeek's per-expert checkpoint tensors and the fused expert parameters (the
    same rules as its own DeepSeek models')."""
    layout = []
    for fused, parts in FUSED_EXPERTS.items():
        operations = [MergeModulelist(dim=0)] + ([Concatenate(dim=1)] if len(parts) > 1 else [])
        sources = [f"mlp.experts.*.{part}.weight" for part in parts]
        layout.append(WeightConverter(source_patterns=sources if len(sources) > 1 else sources[0],
                                      target_patterns=f"mlp.experts.{fused}", operations=operations))  # fmt: skip
    return layout


def register_expert_layout() -> None:
    """Tells transformers' loading and saving how our experts map to checkpoint names (once per process)."""
    if get_checkpoint_conversion_mapping(MODEL_TYPE) is None:
        register_checkpoint_conversion_mapping(MODEL_TYPE, expert_layout())


@use_experts_implementation
class MlaDsaExperts(nn.Module):
    """The routed experts, fused: gate_up_proj [E, 2 * I, H] (each expert's [gate ; up]) and down_proj [E, H, I].
    transformers' `experts_implementation` may swap the forward (grouped matmuls, expert-parallel dispatch); this one
    runs each selected expert on its tokens. Routed experts have no biases (DeepSeek's have none)."""

    def __init__(self, config: MlaDsaConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        intermediate, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states [N, H]; top_k_index and top_k_weights [N, k] -> the weighted sum of the experts [N, H].
        An index outside this module's experts (expert parallelism's marker for another process's) is skipped."""
        out = torch.zeros_like(hidden_states)
        local_experts = self.gate_up_proj.shape[0]
        for expert_idx in top_k_index.unique().tolist():
            if not 0 <= expert_idx < local_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert_idx)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out.index_add_(0, token_idx, (expert_out * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


class MlaDsaMoE(nn.Module):
    """Routed experts (fused, `MlaDsaExperts`) plus always-on shared experts."""

    def __init__(self, config: MlaDsaConfig):
        super().__init__()
        self.experts = MlaDsaExperts(config)
        self.gate = MlaDsaRouter(config)
        if config.n_shared_experts:
            self.shared_experts = MlaDsaMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        routed = self.experts(flat, indices, weights).view(shape)
        if hasattr(self, "shared_experts"):
            routed = routed + self.shared_experts(hidden_states)
        return routed


# Queries per index-scoring block: their per-head scores [B, queries, heads, keys] within this many float32 elements
# (64 MiB on a CPU; 1 GiB on an accelerator, which has no cache to fit and a launch cost per kernel: on an H200 the
# CPU size made a 32K prefill of DeepSeek-V3.2's attention 7.9x slower).
_SCORE_BLOCK_ELEMENTS = 1 << 24
_GPU_SCORE_ELEMENTS = 1 << 28
# The index scoring's name in transformers' attention registry: a kernel (DeepGEMM's MQA logits) or the installed
# mla_dsa package's CPU-tuned scoring registered under it takes the place of `index_scores` below.
INDEX_SCORES = "mla_dsa_index_scores"


class TopkSelection(NamedTuple):
    """What the indexer chose for one forward. `indices` [B, S, k]: the selected key positions. `valid` [B, S, k]
    bool: whether each is a visible key (a query with fewer than k visible keys still gets k indices, and the rest
    must be masked out)."""

    indices: torch.Tensor
    valid: torch.Tensor


class MlaDsaIndexer(nn.Module):
    """The lightning indexer of DeepSeek Sparse Attention: it scores every visible key and selects the top k per query.

    Index score of query t for key s (DeepSeek-V3.2, semantics as transformers' `DeepseekV32Indexer`):

        I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s] * index_head_dim^-0.5),   w = weights_proj(h) * n_heads^-0.5

    with `q_I = wq_b(c_Q)` (`index_n_heads` heads), `k_I = k_norm(wk(h))` (one head, LayerNorm with bias), and RoPE on
    the FIRST `qk_rope_head_dim` dims of each, half-split (V3.2) or interleaved (GLM-5): the reverse of the main
    attention's `[nope | rope]` split. Scores are float32, `weights_proj` runs in its own (float32) dtype. Training (its
    KL losses) lives in the installed `mla_dsa` package, which scores with the same `queries`, `keys` and
    `index_scores`."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        # DeepSeek-V2-Lite has no query latent: the indexer's query then reads the hidden state, as `q_proj` does.
        query_input_dim = config.q_lora_rank if config.q_lora_rank is not None else config.hidden_size
        self.wq_b = nn.Linear(query_input_dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5
        self.fp8 = config.indexer_cache_dtype == "fp8"
        self.scale_fmt = config.indexer_scale_fmt
        self.fp8_block = min(FP8_BLOCK, self.head_dim)
        self.rope_interleave = config.indexer_rope_interleave

    def keys(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp8: bool) -> torch.Tensor:
        """The keys of the new tokens as the cache holds them: rotated [B, S, D], or with `fp8` the packed rows
        [B, S, D + 4 * D / 128] (uint8, see `cache_mla_dsa.py`)."""
        keys = _rotate_leading_dims(self.k_norm(self.wk(hidden_states)), cos, sin, self.rope_dim, self.rope_interleave)
        return pack_fp8_rows(keys, self.fp8_block, self.scale_fmt) if fp8 else keys

    def queries(self, hidden_states: torch.Tensor, query_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The rotated queries [B, S, H, D] and head weights [B, S, H] (float32) of the new tokens."""
        batch_size, seq_len, _ = hidden_states.shape
        queries = self.wq_b(query_latent).view(batch_size, seq_len, self.n_heads, self.head_dim)
        queries = _rotate_leading_dims(queries, cos.unsqueeze(2), sin.unsqueeze(2), self.rope_dim, self.rope_interleave)
        weights = self.weights_proj(as_input_of(self.weights_proj, hidden_states)).float() * self.n_heads**-0.5
        return queries, weights

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,
        query_latent: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        visible: VisibleKeys,
        top_k: int,
    ) -> TopkSelection:
        """The top `top_k` visible keys [B, S, k] of each query, by index score.

        hidden_states [B, S, hidden] and query_latent [B, S, q_lora_rank] of the new tokens; keys [B, T, *]: every
        cached key as `keys()` made them (FP8-packed keys are scored by queries rounded the same way). The selection is
        an integer choice: nothing here is differentiated (training scores the indexer itself, see `mla_dsa`)."""
        queries, weights = self.queries(hidden_states, query_latent, *position_embeddings)
        if keys.dtype == torch.uint8:
            queries = fp8_round_trip(queries, self.fp8_block, self.scale_fmt)
            keys = unpack_fp8_rows(keys, self.head_dim, self.fp8_block)
        batch_size, seq_len, n_heads = weights.shape
        k = min(top_k, keys.shape[1])
        block = query_block(batch_size, n_heads, keys.shape[1], keys.device.type != "cpu")
        score = registered_or_own(INDEX_SCORES, index_scores)
        parts = []
        for start in range(0, seq_len, block):
            end = min(seq_len, start + block)
            num_keys = visible.causal_prefix(end, k)  # keys later than the block's last query are never scored
            scores = score(queries[:, start:end], weights[:, start:end], keys[:, :num_keys], self.softmax_scale)
            parts.append(select_topk(scores, visible.mask(start, end)[..., :num_keys].expand(batch_size, -1, -1), k))
        if len(parts) == 1:
            return TopkSelection(*parts[0])
        return TopkSelection(*(torch.cat(column, dim=1) for column in zip(*parts, strict=True)))


def query_block(batch_size: int, n_heads: int, num_keys: int, gpu: bool = False) -> int:
    """Queries per scoring block: the per-head scores [B, block, H, T] stay within _SCORE_BLOCK_ELEMENTS (on a GPU,
    _GPU_SCORE_ELEMENTS)."""
    elements = _GPU_SCORE_ELEMENTS if gpu else _SCORE_BLOCK_ELEMENTS
    return max(1, elements // max(1, batch_size * n_heads * num_keys))


def index_scores(
    queries: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Index scores [B, s, T] (float32) of a block of queries [B, s, H, D] with head weights [B, s, H] against keys
    [B, T, D] (bf16 or FP8-decoded ones too, scored in float32 as the peer scores them), as the registry calls it
    (`INDEX_SCORES`)."""
    # softmax_scale > 0 commutes with ReLU: folded into the (smaller) query block.
    per_head = torch.einsum("bshd,btd->bsht", queries.float() * softmax_scale, keys.float())  # [B, s, H, T]
    return torch.einsum("bsht,bsh->bst", F.relu(per_head), weights.float())


def select_topk(scores: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys per query among the valid ones.

    Args:
        scores: index scores [B, S, T]; valid: [B, S, T] bool (visible keys).
    Returns:
        indices [B, S, min(k, T)] and whether each selected key is valid: a query with fewer than k valid keys still
        gets k indices from `topk`, and the invalid ones must be masked out of the attention.
    """
    k = min(k, scores.shape[-1])
    masked = scores.masked_fill(~valid, float("-inf"))
    indices = _ranking(masked).topk(k, dim=-1).indices
    return indices, valid.gather(-1, indices)


def _ranking(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys [..., T] ordered as the float32 scores are, ties broken by key position: the later key first.

    Equal index scores are common (a key every head's ReLU zeroes scores exactly 0), and `topk` alone breaks ties by
    wherever a key sits in the tensor, which padding and static-cache slots shift: the same prompt alone and
    left-padded in a batch, or on a static cache, then selected different keys. Keys of one query keep their order in
    every layout, so this tie-break is the same in all of them; without ties it selects what `topk` selects (in the
    same order). The float's bits, read as an integer, are monotone in its value once negatives are flipped; the key
    position fills the low 32 bits. Done in place on one int32 and one int64 tensor: every key of a long prefill is
    ranked, and fresh tensors per step cost 2-5x the arithmetic on a CPU."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, its equal (and a tensor of our own)
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negatives: every bit but the sign flipped
    ranking = bits.to(torch.int64)
    ranking <<= 32
    return ranking.bitwise_or_(torch.arange(scores.shape[-1], device=scores.device))


def _rotate_leading_dims(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int,
                         interleave: bool) -> torch.Tensor:  # fmt: skip
    """RoPE on the first `rope_dim` dims: half-split pairs (DeepSeek-V3.2's indexer) or adjacent pairs (GLM-5's)."""
    rotate = apply_rotary_interleaved if interleave else apply_rotary_half_split
    return torch.cat([rotate(x[..., :rope_dim], cos, sin), x[..., rope_dim:]], dim=-1)


# Largest block of gathered latent rows [B, queries, k, R + dr] the sparse path materialises at once (128 MiB fp32).
_GATHER_BLOCK_ELEMENTS = 1 << 25
_GPU_GATHER_BLOCK_ELEMENTS = 1 << 29  # on a GPU (1 GiB in bf16): few large kernels, not many small ones
# The absorbed attention's name in transformers' attention registry (see the module docstring).
ABSORBED_ATTENTION = "mla_dsa_absorbed"
# MHA attention in half precision up to this many scores [B, H, S, T] is SDPA called as transformers' DeepSeek classes
# call it (values of their own head size: the math kernel, which builds the scores), so bf16 results are theirs bit for
# bit. Beyond it, and in float32 at every size, values are padded to the keys' size for the flash kernel, which never
# builds the scores (training memory linear) and on CPUs runs 2.5-4x faster than the math kernel at every size
# (float32 results then differ from the peers' by float32 rounding, about 1e-7).
_PEER_CALL_SCORE_ELEMENTS = 1 << 24
# A GQA conversion (`linear_latent_norm` in its config) writes its latents scaled into their norms' linear regime
# (mean square far below eps = 1e-6: values near 3e-6), below float16's normal range (6.1e-5), where float16 keeps
# 1-2 significant digits. In a float16 model these down-projections and norms stay float32 (`from_pretrained` keeps
# them so) and run on a float32 copy of their input; the latents leave them in the model's dtype, at an ordinary scale.
LATENT_MODULES = ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")


class MlaDsaAttention(nn.Module):
    """Multi-head Latent Attention with DeepSeek Sparse Attention: projections, the two attention modes, top-k.

    - MHA mode: `kv_b_proj` expands every latent row into per-head keys [nope ; rope] and values, then scaled
      dot-product attention under a boolean mask (causal, padding and, with DSA, the top-k selection). Cheapest for
      short prefills and for training.
    - Absorbed (MQA) mode: W_UK is folded into the query, `q_lat = q_nope W_UK` [B, S, H, R], so every head scores the
      shared latent row `[c_KV ; k_R]` directly; values are the latent `c_KV`, and W_UV is applied after attention.
      With DSA only the k selected latent rows per query are gathered: O(S * k), never an S x T score matrix for the
      main heads. This is the decode path and the long-prefill path; the attention over the latent rows is looked up
      in transformers' attention registry under `ABSORBED_ATTENTION` (a kernel, or the mla_dsa package's CPU-tuned
      one, takes the place of `absorbed_attention_forward`, the plain implementation every checkpoint carries)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.scaling = yarn_softmax_scale(config)
        bias = config.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = MlaDsaRMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = MlaDsaRMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)
        # A "shared" layer (GLM-5's indexer_types) reuses the nearest previous full layer's selection: no indexer here.
        self.indexer = None if config.is_shared_indexer_layer(layer_idx) else MlaDsaIndexer(config, layer_idx)
        self.fp8_latent = config.latent_cache_dtype == "fp8"
        self._absorbed_cache: tuple | None = None

    def project(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        """The new tokens' query latent c_Q [B, S, q_lora_rank] (the indexer's input; the hidden states where there
        is no query latent), queries q_nope [B, S, H, dn] and rotated q_rope [B, S, H, dr], and latent rows
        [B, S, R + dr]: [kv_a_layernorm(c_KV) ; rotated k_R], what the cache holds."""
        cos, sin = position_embeddings
        query_latent, q_nope, q_rope = self._project_queries(hidden_states)
        kv = self.kv_a_proj_with_mqa(as_input_of(self.kv_a_proj_with_mqa, hidden_states))  # see LATENT_MODULES
        c_kv, k_rope = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_layernorm(c_kv).to(hidden_states.dtype), k_rope.to(hidden_states.dtype)
        q_rope, k_rope = self._rotate(q_rope, cos.unsqueeze(2), sin.unsqueeze(2)), self._rotate(k_rope, cos, sin)
        return query_latent, q_nope, q_rope, torch.cat([c_kv, k_rope], dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        settings: DsaSettings,
        key_padding_mask: torch.Tensor | None = None,
        cache=None,
        output_attentions: bool = False,
        segment_ids: torch.Tensor | None = None,
        past_len: int | torch.Tensor = 0,
        selections: dict[int, TopkSelection | None] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, S, hidden]; key_padding_mask [B, T] bool (True = real token) or None; segment_ids [B, T]
        for a packed batch (attention and the indexer stay inside each sequence) or None; past_len: tokens cached
        before this call (a device scalar for a static cache, whose rows past the current length the causal mask hides);
        selections: this forward's top-k selection of every full layer so far, by layer index: this layer's is added,
        and a shared layer (GLM-5's indexer_types) attends with its source layer's.

        Returns the attention output [B, S, hidden] and, with `output_attentions`, the attention probabilities
        [B, H, S, T] (0 at keys the indexer did not select), computed on the explicit (eager) MHA path whatever the
        attention mode."""
        batch_size, seq_len, _ = hidden_states.shape
        query_latent, q_nope, q_rope, latent = self.project(hidden_states, position_embeddings)
        dsa_layer = self.layer_idx not in (self.config.dense_attention_layers or ())
        shared = self.indexer is None  # GLM-5's shared layers: the source layer's selection, no indexer keys cached
        num_keys = seq_len if cache is None else None  # known once the cache is updated
        selects = settings.use_sparse_attention and dsa_layer
        index_keys = None
        if shared:
            index_keys = latent.new_empty(batch_size, seq_len, 0)
        elif cache is not None or (selects and settings.index_topk < num_keys):
            with torch.no_grad():  # a selection is an integer choice: the indexer is trained by its own loss (mla_dsa)
                index_keys = self.indexer.keys(hidden_states, *position_embeddings, fp8=self.indexer.fp8)
        # FP8 rows are what the cache holds, and they carry no gradient: a forward without a cache that autograd
        # differentiates (training) attends over its full-precision rows.
        if self.fp8_latent and (cache is not None or not latent.requires_grad):
            latent = pack_latent_rows(latent, self.kv_lora_rank)  # [B, S, 656] uint8 for V3.2's shapes (FlashMLA's)
        if cache is not None:
            latent, index_keys = cache.update(latent, index_keys, self.layer_idx)  # [B, T, ...]

        num_keys = latent.shape[1]
        past_len = past_len if cache is not None else 0  # without a cache, this call's tokens are all the keys
        visible = VisibleKeys(past_len, num_keys, key_padding_mask, hidden_states.device, segment_ids)
        sparse = selects and settings.index_topk < num_keys
        selections = {} if selections is None else selections
        if shared:
            selection = selections.get(self.config.indexer_source_layer(self.layer_idx)) if sparse else None
        else:
            selection = self.indexer(hidden_states, query_latent, position_embeddings, index_keys, visible,
                                     settings.index_topk) if sparse else None  # fmt: skip
            selections[self.layer_idx] = selection
        attn_output, attn_weights = self._attend(q_nope, q_rope, latent, visible, selection, settings,
                                                 output_attentions)  # fmt: skip
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1))  # [B, S, H * dv]
        return attn_output, attn_weights

    def _attend(
        self, q_nope, q_rope, latent, visible: VisibleKeys, selection: TopkSelection | None, settings: DsaSettings,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """[B, S, H, dv] and, with `output_attentions`, the probabilities [B, H, S, T].

        attn_implementation="eager" (transformers' switch, which every model reads here) is the explicit softmax
        path; "sdpa" is the default: SDPA in MHA mode, the absorbed path for decoding and long sparse prefills."""
        seq_len, num_keys = q_nope.shape[1], latent.shape[1]
        eager = output_attentions or getattr(self.config, "_attn_implementation", None) == "eager"
        absorbed = not eager and self._use_absorbed_mode(settings.attention_mode, seq_len, num_keys,
                                                         selection is not None)  # fmt: skip
        if latent.dtype == torch.uint8 and not (absorbed and selection is not None):
            latent = unpack_latent_rows(latent, self.kv_lora_rank, q_nope.dtype)  # every row is read anyway
        if eager:
            attn_output, attn_weights = self._mha_attention(q_nope, q_rope, latent, visible, selection, True)
            return attn_output, attn_weights if output_attentions else None
        if absorbed:
            return self._absorbed_attention(q_nope, q_rope, latent, visible, selection), None
        return self._mha_attention(q_nope, q_rope, latent, visible, selection), None

    def _project_queries(self, hidden_states: torch.Tensor):
        batch_size, seq_len, _ = hidden_states.shape
        if self.q_lora_rank is None:
            query_latent = hidden_states
            q = self.q_proj(hidden_states)
        else:
            latent = self.q_a_proj(as_input_of(self.q_a_proj, hidden_states))  # see LATENT_MODULES
            query_latent = self.q_a_layernorm(latent).to(hidden_states.dtype)  # c_Q, also the indexer's input
            q = self.q_b_proj(query_latent)
        # -1: the heads this process holds (all of them, or its share under tensor parallelism)
        q = q.view(batch_size, seq_len, -1, self.qk_head_dim)
        q_nope, q_rope = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return query_latent, q_nope, q_rope

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.config.rope_interleave:
            return apply_rotary_interleaved(x, cos, sin)
        return apply_rotary_half_split(x, cos, sin)

    def _use_absorbed_mode(self, mode: str, seq_len: int, num_keys: int, sparse: bool) -> bool:
        if mode != "auto":
            return mode == "absorbed"
        # Expanding T latents costs T*R*H*(dn+dv); absorbed scoring costs S*T*H*(2R+dr): absorbed wins for few queries.
        few_queries = 2 * seq_len <= self.qk_nope_head_dim + self.v_head_dim
        return few_queries or (sparse and num_keys > self.config.mha_max_length)

    # ----------------------------------------------------------------------------------------------- MHA mode
    def _mha_attention(self, q_nope, q_rope, latent, visible: VisibleKeys, selection: TopkSelection | None,
                       return_weights: bool = False):  # fmt: skip
        """[B, S, H, dv] (and, with `return_weights`, the probabilities [B, H, S, T] from an explicit softmax)."""
        batch_size, seq_len, num_heads, _ = q_nope.shape
        c_kv, k_rope = torch.split(latent, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(batch_size, -1, num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [B, T, H, *]
        key = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, num_heads, -1)], dim=-1)
        query = torch.cat([q_nope, q_rope], dim=-1)

        value_dim, key_dim = value.shape[-1], query.shape[-1]
        large = batch_size * num_heads * seq_len * visible.num_keys > _PEER_CALL_SCORE_ELEMENTS
        pad_values = (large or query.dtype.itemsize >= 4) and value_dim < key_dim  # see _PEER_CALL_SCORE_ELEMENTS
        if selection is None and not return_weights and visible.causal_only(seq_len) and value_dim <= key_dim:
            # Causal attention with no mask tensor: SDPA's flash kernels (CPU and GPU) never build the [H, S, T]
            # scores, for training too. They want one head size: values are zero-padded to the keys' and cut after
            # (bf16 rounds differently from the peer's call, which small half-precision inputs keep).
            if pad_values:
                value = F.pad(value, (0, key_dim - value_dim))
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                dropout_p=self.config.attention_dropout if self.training else 0.0, is_causal=True, scale=self.scaling,
            )  # fmt: skip
            return out.transpose(1, 2)[..., :value_dim]  # [B, S, H, dv]
        if return_weights:
            mask, has_key = self._mha_mask(visible, selection, 0, seq_len, visible.num_keys)
            scores = torch.einsum("bshd,bthd->bhst", query, key) * self.scaling
            probs = masked_softmax(scores, mask.unsqueeze(1)) * has_key.unsqueeze(1)  # [B, H, S, T]
            dropped = F.dropout(probs, self.config.attention_dropout, self.training)
            return torch.einsum("bhst,bthv->bshv", dropped, value), probs
        # Large inputs run a block of queries at a time against the keys any of them may see (half the work of one call
        # for a causal prefill); padded values take the flash kernel, which takes the mask and never builds the
        # [H, s, T] scores. Small half-precision ones are one call as the peers make it (see _PEER_CALL_SCORE_ELEMENTS).
        chunk = self.config.query_chunk_size if large else seq_len
        value = F.pad(value, (0, key_dim - value_dim)) if pad_values else value
        outputs = []
        for start in range(0, seq_len, chunk):
            end = min(seq_len, start + chunk)
            num_keys = visible.causal_prefix(end, 1) if large else visible.num_keys
            mask, has_key = self._mha_mask(visible, selection, start, end, num_keys)
            out = F.scaled_dot_product_attention(
                query[:, start:end].transpose(1, 2),
                key[:, :num_keys].transpose(1, 2),
                value[:, :num_keys].transpose(1, 2),
                attn_mask=mask.unsqueeze(1),
                dropout_p=self.config.attention_dropout if self.training else 0.0,
                scale=self.scaling,
            )  # [B, H, s, dv]
            outputs.append(out.transpose(1, 2)[..., :value_dim] * has_key.unsqueeze(-1))  # [B, s, H, dv]
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def _mha_mask(visible: VisibleKeys, selection: TopkSelection | None, start: int, end: int, num_keys: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Which of the first `num_keys` keys queries start..end-1 attend to [B or 1, s, num_keys] (causal, padding,
        packing and the top-k selection), and whether a query has any [B or 1, s, 1]: a padded query has none, so it
        attends anywhere and its output is zeroed after."""
        mask = visible.mask(start, end)[..., :num_keys]
        if selection is not None:
            mask = mask & selected_keys_mask(selection.indices[:, start:end], visible.num_keys)[..., :num_keys]
        has_key = mask.any(dim=-1, keepdim=True)
        return mask | ~has_key, has_key

    # ------------------------------------------------------------------------------------------ absorbed mode
    def absorbed_weights(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, R] and W_UV [H, dv, R] from `kv_b_proj`, viewed as [H, dn + dv, R].

        A plain Linear gives views of its weight (free, and differentiable; also while torch.export or torch.compile
        traces it), or its dequantized weight where the weight's class dequantizes its own (torchao's quantized
        tensors, `TorchAoConfig`). A wrapped one (LoRA) is evaluated on the identity, so its effective weight is used.
        Outside autograd (and outside torch.compile's and torch.export's traces, which cannot follow a comparison of
        values) that result is reused while the module still maps a fixed probe row to the same output:
        whatever changes what the module computes - a weight update, a merge, PEFT's disable_adapter() or
        set_adapter(), a new scale, another dtype or device - changes the probe's output too, where parameter versions
        alone miss adapter switches. The probe costs one row.

        An offloaded module (`device_map` with "cpu" or "disk" offload: its weights are on the meta device until its
        own forward loads them) is evaluated on the identity on `device` (the queries'), at every call: kept, the
        weight would stay loaded, against what the offload is for."""
        module = self.kv_b_proj
        offloaded = next(module.parameters()).device.type == "meta"
        plain_linear = type(module) is nn.Linear and not offloaded
        if plain_linear and type(module.weight).dequantize is not torch.Tensor.dequantize:
            weight = module.weight.dequantize()  # torchao's quantized weights: a pass over them, and it compiles
        elif plain_linear:
            weight = _local(module.weight)  # under tensor parallelism, this process's heads
        elif torch.is_grad_enabled() or offloaded or torch.compiler.is_compiling():  # a trace: no probe to compare
            weight = _effective_weight(module, self.kv_lora_rank, device)
        else:
            probe = module(_probe_row(module, self.kv_lora_rank))
            cached = self._absorbed_cache
            if cached is None or cached[0].shape != probe.shape or cached[0].dtype != probe.dtype \
                    or cached[0].device != probe.device or not torch.equal(cached[0], probe):  # fmt: skip
                self._absorbed_cache = cached = (probe, _effective_weight(module, self.kv_lora_rank))
            weight = cached[1]
        weight = weight.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)  # this process's heads
        return weight[:, : self.qk_nope_head_dim], weight[:, self.qk_nope_head_dim :]

    def absorbed_query(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """[B, S, H, R + dr]: W_UK folded into the query, so it scores the latent row [c_KV ; k_R] directly."""
        w_uk, _ = self.absorbed_weights(q_nope.device)
        return torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk.to(q_nope.dtype)), q_rope], dim=-1)

    def _absorbed_attention(self, q_nope, q_rope, latent, visible: VisibleKeys, selection: TopkSelection | None
                            ) -> torch.Tensor:  # fmt: skip
        """[B, S, H, dv], one query chunk at a time: the absorbed query [s, H, R + dr] and the latent output
        [s, H, R] exist only per chunk, so long prefills stay O(chunk) in memory. Under autograd each chunk runs
        checkpointed (recomputed in backward), so training keeps no chunk's scores or gathered rows either: memory
        grows with S, not with S x k or S x T."""
        batch_size, seq_len, num_heads, _ = q_nope.shape
        w_uk, w_uv = (weight.to(q_nope.dtype) for weight in self.absorbed_weights(q_nope.device))
        if selection is None:
            per_query = batch_size * num_heads * latent.shape[1]  # scores against every key
        else:
            per_query = batch_size * selection.indices.shape[-1] * latent.shape[-1]  # gathered rows
        elements = _GATHER_BLOCK_ELEMENTS if latent.device.type == "cpu" else _GPU_GATHER_BLOCK_ELEMENTS
        chunk = max(1, min(self.config.query_chunk_size, elements // per_query))
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q_nope, q_rope, latent, w_uk))
        outputs = []
        for start in range(0, seq_len, chunk):
            end = min(seq_len, start + chunk)
            args = (q_nope[:, start:end], q_rope[:, start:end], latent, w_uk, w_uv, visible, selection, start, end)
            outputs.append(checkpoint(self._absorbed_chunk, *args, use_reentrant=False) if training
                           else self._absorbed_chunk(*args))  # fmt: skip
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def _absorbed_chunk(self, q_nope, q_rope, latent, w_uk, w_uv, visible: VisibleKeys,
                        selection: TopkSelection | None, start: int, end: int) -> torch.Tensor:  # fmt: skip
        """Queries start..end-1 of one forward -> [B, s, H, dv]: W_UK folded into the query, the registered absorbed
        attention over the latent rows (every visible one, or the selected ones), W_UV after attention."""
        query = torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk), q_rope], dim=-1)  # [B, s, H, R + dr]
        rows = latent.unsqueeze(1)  # [B, 1, T, R + dr]: one key head, shared by every query head
        if selection is None:
            mask, indices = visible.mask(start, end).unsqueeze(1), None  # [B or 1, 1, s, T]
        else:
            mask = None
            indices = torch.where(selection.valid[:, start:end], selection.indices[:, start:end], -1)  # [B, s, k]
        attention = registered_or_own(ABSORBED_ATTENTION, absorbed_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        latent_out, _ = attention(self, query.transpose(1, 2), rows, rows, mask, self.scaling, dropout, indices=indices)
        # W_UV as stored ([H, dv, R]) times the outputs [H, R, B*s]: einsum would copy W_UV transposed at every call
        # in bfloat16 on CPUs (a quarter of a bf16 decode step at small sizes)
        batch_size, seq_len, num_heads, rank = latent_out.shape
        rows_out = latent_out.permute(2, 3, 0, 1).reshape(num_heads, rank, batch_size * seq_len)
        out = torch.bmm(w_uv, rows_out).view(num_heads, -1, batch_size, seq_len)  # [H, dv, B, s]
        return out.permute(2, 3, 0, 1)  # [B, s, H, dv]


def absorbed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    indices: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """MLA's absorbed attention for a block of queries, as the registry calls it (`ABSORBED_ATTENTION`).

    query [B, H, s, R + dr]: W_UK folded into it. key: the latent rows [B, 1, T, R + dr] ([c_KV ; k_R], one head for
    every query head), or DeepSeek-V3.2's FP8-packed rows (uint8 [B, 1, T, 656], FlashMLA's layout). value: the same
    rows (MLA's values are their first `module.kv_lora_rank` columns). indices [B, s, k]: the rows each query attends
    to, -1 where there is none (FlashMLA's convention); or None, and every row where attention_mask [B or 1, 1, s, T]
    (bool, True = visible) is True. Returns the latent output [B, s, H, R] (W_UV is applied after) and no
    probabilities."""
    query = query.transpose(1, 2)  # [B, s, H, R + dr]
    rows, rank = key[:, 0], module.kv_lora_rank  # [B, T, R + dr]
    if indices is None:
        if rows.dtype == torch.uint8:
            rows = unpack_latent_rows(rows, rank, query.dtype)
        scores = torch.einsum("bshc,btc->bsht", query * scaling, rows)  # [B, s, H, T]; see attend_to_rows
        probs = masked_softmax(scores, attention_mask[:, 0].unsqueeze(2))
        probs = F.dropout(probs, dropout) if dropout else probs
        return torch.einsum("bsht,btr->bshr", probs, rows[..., :rank]), None
    rows = gather_rows(rows, indices.clamp(min=0))  # [B, s, k, R + dr]: only the selected rows are read
    return attend_to_rows(query, rows, indices >= 0, scaling, rank, dropout), None


def attend_to_rows(query: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, scaling: float, kv_lora_rank: int,
                   dropout: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Each query [B, s, H, R + dr] over its own gathered rows [B, s, k, R + dr] (or FP8-packed ones, decoded here,
    after the gather), where valid [B, s, k] -> the latent output [B, s, H, R]; `dropout` on the probabilities."""
    if rows.dtype == torch.uint8:
        rows = unpack_latent_rows(rows, kv_lora_rank, query.dtype)
    # scaled before the product, as SDPA does: an unscaled float16 score overflows 65504 first (an inf row would
    # softmax to NaN, which masked_softmax zeroes), and the query is the smaller operand
    scores = torch.einsum("bshc,bskc->bshk", query * scaling, rows)
    probs = masked_softmax(scores, valid.unsqueeze(2))
    probs = F.dropout(probs, dropout) if dropout else probs
    return torch.einsum("bshk,bskr->bshr", probs, rows[..., :kv_lora_rank])


def registered_or_own(name: str, own):
    """What transformers' attention registry holds under `name` (`ABSORBED_ATTENTION`, `INDEX_SCORES`): a kernel, or
    the mla_dsa package's CPU-tuned function; else `own`, this file's plain one. A plain one is never taken from the
    registry: every checkpoint's copy of this file defines them (releases up to 0.7.8 registered theirs when the name
    was free), so the first checkpoint loaded in a process would otherwise run its code, however old, for every later
    one. This file registers nothing."""
    if name not in ALL_ATTENTION_FUNCTIONS:
        return own
    registered = ALL_ATTENTION_FUNCTIONS.get_interface(name, own)
    return own if (registered.__module__ or "").rpartition(".")[2] == _THIS_FILE else registered


_THIS_FILE = "modeling_mla_dsa"  # this file's module name, in every checkpoint (its copy) and in the package


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds: a DTensor's local shard (tensor parallelism), else the tensor."""
    to_local = getattr(tensor, "to_local", None)  # only DTensors have it; plain tensors are whole
    return to_local() if to_local is not None else tensor


def as_input_of(linear: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`hidden_states` in the dtype of `linear`'s weight (a float32 one in a float16 model: see LATENT_MODULES); as they
    are where the weight is stored as integers the layer dequantizes itself (bitsandbytes' 4-bit and 8-bit layers,
    which take any floating input: cast to their storage type, the activations would be garbage)."""
    weight = linear.weight
    return hidden_states.to(weight.dtype) if weight.is_floating_point() else hidden_states


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype to evaluate a (possibly wrapped) linear module in: its first floating-point parameter's; float32 where
    every one is stored as integers (bitsandbytes' layers, which dequantize their weights themselves)."""
    return next((param.dtype for param in module.parameters() if param.is_floating_point()), torch.float32)


def _probe_row(module: nn.Module, in_features: int) -> torch.Tensor:
    """[1, in_features]: a fixed row with no structure a weight change could leave unseen (seeded, not the RNG's)."""
    device = next(module.parameters()).device
    row = torch.arange(1, in_features + 1, dtype=torch.float64, device=device)
    return torch.sin(row * 12.9898).mul(43758.5453).frac().sub(0.5).to(_compute_dtype(module)).unsqueeze(0)


def _effective_weight(module: nn.Module, in_features: int, device: torch.device | None = None) -> torch.Tensor:
    """The weight [out, in] a (possibly wrapped) linear module applies, bias excluded; run on `device` where the
    module's weights are offloaded (on the meta device), else on theirs."""
    param, dtype = next(module.parameters()), _compute_dtype(module)
    device = device if param.device.type == "meta" else param.device
    eye = torch.eye(in_features, dtype=dtype, device=device)
    zero = torch.zeros(1, in_features, dtype=dtype, device=device)
    return (module(eye) - module(zero)).T


class MlaDsaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MlaDsaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MlaDsaAttention(config, layer_idx)
        self.mlp = MlaDsaMoE(config) if config.is_moe_layer(layer_idx) else MlaDsaMLP(config)
        self.input_layernorm = MlaDsaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MlaDsaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        settings: DsaSettings,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """The layer's output [B, S, hidden] (its attention probabilities are recorded from the attention's output)."""
        # The cache comes by keyword, under the running transformers' name (CACHE_NAME): GradientCheckpointingLayer
        # looks for it there to drop it (with one warning) when a checkpointed training step asks for a cache.
        cache = kwargs.pop(CACHE_NAME, None)
        residual = hidden_states
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, settings, key_padding_mask, cache,
            output_attentions=output_attentions, **kwargs,
        )  # fmt: skip
        hidden_states = residual + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class MlaDsaPreTrainedModel(PreTrainedModel):
    config_class = MlaDsaConfig
    config: MlaDsaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MlaDsaDecoderLayer"]
    _skip_keys_device_placement = CACHE_NAMES
    _supports_sdpa = True
    # Kept in float32 as transformers keeps them for DeepseekV2/V3/V32 and GlmMoeDsa: the router's weight and bias in
    # bf16 and fp16 models (a bf16 router picks other experts than transformers' float32 one), the indexer's head
    # weights in fp16 models.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    _keep_in_fp32_modules = ["indexer.weights_proj"]
    # What transformers' output capture records (`output_hidden_states`, `output_attentions`, `output_router_logits`):
    # each layer's output, its attention probabilities (computed only when asked for), each router's logits.
    _can_record_outputs = {
        "hidden_states": MlaDsaDecoderLayer,
        "attentions": OutputRecorder(MlaDsaAttention, index=1),
        "router_logits": OutputRecorder(MlaDsaRouter, index=0),
    }

    def __init__(self, config: MlaDsaConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "linear_latent_norm", False):  # a GQA conversion's: see LATENT_MODULES
            self._keep_in_fp32_modules = [*type(self)._keep_in_fp32_modules, *LATENT_MODULES]
        config.layer_types = [OWN_LAYER_TYPE] * config.num_hidden_layers  # DynamicCache(config): this file's layers
        register_expert_layout()  # before transformers loads or saves weights: per-expert names <-> fused experts

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MlaDsaExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, MlaDsaRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if hasattr(module, "e_score_correction_bias"):
                init.zeros_(module.e_score_correction_bias)


def packed_segment_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, S] index of the packed sequence each position belongs to, where position ids restart within a row (a
    DataCollatorWithFlattening batch, TRL's padding_free)."""
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # [B, S - 1]
    # All zeros for an ordinary row (the same mask as none): asking whether any row restarts would make the host wait.
    return torch.nn.functional.pad(restarts.long(), (1, 0)).cumsum(-1)


def refuse_training_arguments(kwargs: dict) -> None:
    """`indexer_stage=` (and its name before 0.4.0, `indexer_loss=`): the model no longer computes training losses."""
    for name in ("indexer_stage", "indexer_loss"):
        if name in kwargs:
            raise ValueError(f"{name}= is no longer a model argument: {TRAINING_MOVED}")


def output_flags(config, hidden_states: bool | None, attentions: bool | None) -> tuple[bool, bool]:
    """A forward's output flags: each one passed wins, else the config's (transformers' rule)."""
    return (
        config.output_hidden_states if hidden_states is None else hidden_states,
        config.output_attentions if attentions is None else attentions,
    )


def kept_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of hidden_states [B, S, hidden] whose logits are wanted, as transformers' models read
    `logits_to_keep`: an int keeps the last n (0: all); a 1D tensor, these positions of every row; a 2D integer tensor
    [B, n], n positions per row; a 2D bool mask [B, S], its True positions, flattened to [count, hidden]."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
    return hidden_states[:, logits_to_keep]


def check_input_ids(input_ids: torch.Tensor) -> None:
    """Shape and dtype only: reading the values would make the host wait for the device at every step. Out-of-range
    ids are reported by `out_of_range_ids` once the embedding lookup has failed."""
    if input_ids.dim() != 2:
        raise ValueError(f"MlaDsaModel: input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"MlaDsaModel: input_ids must be an integer tensor, got {input_ids.dtype}")


def out_of_range_ids(input_ids: torch.Tensor, vocab_size: int) -> ValueError:
    """The error for token ids outside the vocabulary (raised after the lookup failed, so it may read them)."""
    return ValueError(
        f"MlaDsaModel: token ids must lie in [0, vocab_size={vocab_size}), got "
        f"[{int(input_ids.min())}, {int(input_ids.max())}]"
    )


def key_padding_mask_of(attention_mask: torch.Tensor | None, batch_size: int, num_keys: int, static: bool = False,
                        num_queries: int | None = None) -> torch.Tensor | None:  # fmt: skip
    """What the attention and the indexer mask by: None without a mask; [B, T] bool, True at real tokens, for a 2D
    mask; [B or 1, S, T] bool, True where a query may see a key, for a custom 4D mask [B or 1, 1, S, T] (transformers'
    own models take one as it is, boolean or additive with 0 where a key is seen): it then replaces causality,
    padding and packing. An all-ones mask is kept as it is: finding that out would make the host wait for the device.
    With a static cache (T its fixed size) a 2D mask of the tokens so far is padded to T: the slots past them are
    later than every query, which the causal mask hides anyway."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        expected = (num_queries, num_keys)
        if attention_mask.shape[1] != 1 or tuple(attention_mask.shape[2:]) != expected or \
                attention_mask.shape[0] not in (1, batch_size):  # fmt: skip
            raise ValueError(
                f"MlaDsaModel: a 4D attention_mask must be [batch or 1, 1, new tokens, past + new tokens] = "
                f"({batch_size}, 1, {num_queries}, {num_keys}), got shape {tuple(attention_mask.shape)}"
            )
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return visible[:, 0]
    if static and attention_mask.dim() == 2 and attention_mask.shape[0] == batch_size:
        attention_mask = padded_to_keys(attention_mask, num_keys)
    if attention_mask.dim() != 2 or attention_mask.shape != (batch_size, num_keys):
        raise ValueError(
            f"MlaDsaModel: attention_mask must be 2D [batch, past + new tokens] = ({batch_size}, {num_keys}) or a "
            f"custom 4D mask, got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def padded_to_keys(attention_mask: torch.Tensor, num_keys: int) -> torch.Tensor:
    """A 2D mask [B, t] of the tokens so far, as [B, num_keys] (a static cache's size); the added slots are False.
    A mask of that size already (what generate() passes with a static cache) is returned as it is."""
    missing = num_keys - attention_mask.shape[1]
    return torch.nn.functional.pad(attention_mask, (0, missing)) if missing > 0 else attention_mask


# Keywords transformers passes to `loss_function` (ForCausalLMLoss): Trainer's token count, pre-shifted labels of
# context/sequence parallelism, the ignored label id.
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


class MlaDsaModel(MlaDsaPreTrainedModel):
    _auto_class = "AutoModel"  # save_pretrained copies the payload files beside the weights

    def __init__(self, config: MlaDsaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MlaDsaDecoderLayer(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = MlaDsaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MlaDsaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        """`cache`: an `MlaDsaCache` (or `DynamicCache(config=model.config)`); `past_key_values` is its older name.
        Output flags left unset take the config's values, as in transformers' own models; hidden states, attentions
        and router logits are recorded by transformers' output capture (`_can_record_outputs`), `return_dict` too.
        `use_sparse_attention`, `index_topk`, `attention_mode`: this call's DSA choices (see `DsaSettings`), the
        config's where unset."""
        cache = take_cache(cache, kwargs, "MlaDsaModel.forward")
        refuse_training_arguments(kwargs)
        settings = DsaSettings.resolve(self.config, use_sparse_attention, index_topk, attention_mode)
        _, output_attentions = output_flags(self.config, output_hidden_states, output_attentions)
        if getattr(self.config, "linear_latent_norm", False) and \
                self.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype == torch.float16:  # fmt: skip
            logger.warning_once("MlaDsaModel: this GQA conversion's latent projections are float16 (`.half()`?), which "
                                "cannot hold their latents (see LATENT_MODULES): load it with from_pretrained(..., "
                                "dtype=torch.float16), which keeps them float32, or use bfloat16")  # fmt: skip
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        use_cache = self._wants_cache(use_cache)
        if cache is not None:
            check_cache(cache, self.config.num_hidden_layers, "MlaDsaModel")
        if use_cache and cache is None:
            cache = MlaDsaCache(self.config)
        batch_size, seq_len = inputs_embeds.shape[:2]
        # A static cache's length is a device scalar and its key count fixed: no host-side length, one shape per step.
        past_len, num_keys = cache_lengths(cache, seq_len)
        static = isinstance(past_len, torch.Tensor)
        key_padding_mask = key_padding_mask_of(attention_mask, batch_size, num_keys, static, seq_len)
        segment_ids = None
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_len).unsqueeze(0)
        elif not static and past_len == 0:
            segment_ids = packed_segment_ids(position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        selections = {}  # each full layer's top-k, which the shared layers after it reuse (GLM-5's indexer_types)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, position_embeddings, settings, key_padding_mask, output_attentions=output_attentions,
                segment_ids=segment_ids, past_len=past_len, selections=selections,
                **{CACHE_NAME: cache if use_cache else None}, **kwargs,
            )  # fmt: skip
        return MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache if use_cache else None}
        )

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B, S, hidden] from exactly one of input_ids (checked) and inputs_embeds."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MlaDsaModel: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids)
            try:
                inputs_embeds = self.embed_tokens(input_ids)
            except IndexError:  # an id outside the vocabulary (CPU; on GPUs the lookup asserts on the device)
                raise out_of_range_ids(input_ids, self.config.vocab_size) from None
        if inputs_embeds.shape[1] == 0:
            raise ValueError("MlaDsaModel: got an empty sequence (0 new tokens)")
        return inputs_embeds

    def _wants_cache(self, use_cache: bool | None) -> bool:
        """The forward's `use_cache`, else the config's outside training; never under gradient checkpointing."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # As transformers' own models: a checkpointed layer replayed in backward would write the cache twice.
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing: setting use_cache=False")
            use_cache = False
        return use_cache


class MlaDsaForCausalLM(MlaDsaPreTrainedModel, GenerationMixin):
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the payload files beside the weights
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as DeepseekV32's: vocabulary split, logits gathered

    def __init__(self, config: MlaDsaConfig):
        super().__init__(config)
        # DeepSeek-V3 checkpoints carry multi-token-prediction layers after the last decoder layer: not ours.
        first_mtp = config.num_hidden_layers
        self._keys_to_ignore_on_load_unexpected = [
            rf"model\.layers\.{idx}\." for idx in range(first_mtp, first_mtp + 4)
        ]
        self.model = MlaDsaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        """Causal LM forward. `use_sparse_attention`, `index_topk` and `attention_mode` override the config's
        defaults for this call (see `DsaSettings`); `generate()` passes them on to every step. The indexer's training
        losses are not the model's: the `mla_dsa` package computes them (`mla_dsa.IndexerLoss`). `cache`: an
        `MlaDsaCache` (or `DynamicCache(config=model.config)`);
        `past_key_values` is its older name."""
        cache = take_cache(cache, kwargs, "MlaDsaForCausalLM.forward")
        kwargs.pop("cache_position", None)
        # transformers' loss keywords (Trainer's num_items_in_batch, context parallelism's pre-shifted labels, ...)
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        output_hidden_states, output_attentions = output_flags(self.config, output_hidden_states, output_attentions)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_router_logits=output_router_logits,
            return_dict=True,
            use_sparse_attention=use_sparse_attention,
            index_topk=index_topk,
            attention_mode=attention_mode,
            **kwargs,
        )
        logits = self.lm_head(kept_positions(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None or loss_kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def generate(self, *args, **kwargs):
        """transformers' `generate()`, on a cache of our layers: `DynamicCache(config)` builds MlaDsaCacheLayer for
        this config, `cache_implementation="static"` (and "offloaded_static") MlaDsaStaticCacheLayer, preallocated
        for a compiled decode step. Quantized caches hold per-head keys and values, which this model does not make."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
        if implementation not in (None, "dynamic", "dynamic_full", "static", "offloaded_static"):
            raise ValueError(
                f"MlaDsaForCausalLM.generate: cache_implementation={implementation!r} is not supported; the model "
                'caches latent + indexer keys in its own layers (leave it unset, or "static" for a fixed-size cache)'
            )
        return super().generate(*args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching (`generate_batch`, `transformers serve --continuous-batching`) runs a
        model on its paged cache of per-head keys and values, which has no place for the latent rows and indexer keys
        (transformers' DeepseekV32 cannot run it either): refused in one line rather than failing inside it."""
        raise NotImplementedError(
            "MlaDsaForCausalLM cannot generate with continuous batching (generate_batch): transformers' paged cache "
            "holds per-head keys and values, not the latent rows and indexer keys; call generate() on a batch"
        )

    def create_masks_for_generate(self, *args, attention_mask: torch.Tensor | None = None, **kwargs):
        """What `generate()` passes as the attention mask with a static cache (transformers' hook for models that
        mask their own way): our 2D key padding mask, padded to the cache's fixed size, so every compiled decode
        step sees one shape (the slots past the tokens so far are later than every query: causality hides them)."""
        cache = kwargs.get(CACHE_NAME, kwargs.get("past_key_values"))
        size = static_cache_size(cache)
        if attention_mask is None or attention_mask.dim() != 2 or size is None:
            return attention_mask
        return padded_to_keys(attention_mask.bool(), size)


class MlaDsaForSequenceClassification(GenericForSequenceClassification, MlaDsaPreTrainedModel):
    """transformers' generic sequence classifier (as DeepseekV3's): a linear score on the last non-pad token, the loss
    by `config.problem_type`. Reward models and classifiers on an MLA+DSA backbone."""

    _auto_class = "AutoModelForSequenceClassification"

    def __init__(self, config: MlaDsaConfig):
        # transformers' own __init__ builds the backbone through AutoModel, which remote code does not register
        MlaDsaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = MlaDsaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


class MlaDsaForTokenClassification(GenericForTokenClassification, MlaDsaPreTrainedModel):
    """transformers' generic token classifier (as DeepseekV3's): a linear score on every token after dropout."""

    _auto_class = "AutoModelForTokenClassification"

    def __init__(self, config: MlaDsaConfig):
        MlaDsaPreTrainedModel.__init__(self, config)  # as above
        self.num_labels = config.num_labels
        self.model = MlaDsaModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.post_init()


__all__ = [
    "MlaDsaForCausalLM",
    "MlaDsaForSequenceClassification",
    "MlaDsaForTokenClassification",
    "MlaDsaModel",
    "MlaDsaPreTrainedModel",
]
