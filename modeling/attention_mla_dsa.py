"""Multi-head Latent Attention with DeepSeek Sparse Attention: projections, the two attention modes, top-k.

Shapes: B batch, S new tokens (queries), T cached + new tokens (keys), H heads, R `kv_lora_rank`,
dn/dr/dv `qk_nope_head_dim`/`qk_rope_head_dim`/`v_head_dim`, k the number of selected keys per query.

- MHA mode: `kv_b_proj` expands every latent row into per-head keys [nope ; rope] and values, then scaled dot-product
  attention under a boolean mask (causal, padding and, with DSA, the top-k selection). Cheapest for short prefills
  and for training.
- Absorbed (MQA) mode: W_UK is folded into the query, `q_lat = q_nope W_UK` [B, S, H, R], so every head scores the
  shared latent row `[c_KV ; k_R]` directly; values are the latent `c_KV`, and W_UV is applied after attention.
  With DSA only the k selected latent rows per query are gathered: cost O(S * k), never an S x T score matrix for
  the main heads. This is the decode path and the long-prefill path. The attention over the latent rows is looked up
  in transformers' attention registry (`AttentionInterface`) under `ABSORBED_ATTENTION`: a kernel (FlashMLA's sparse
  decode reads the same FP8 rows) or the installed mla_dsa package's CPU-tuned one registered under that name takes
  the place of `absorbed_attention_forward`, the plain implementation every checkpoint carries.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .fp8_mla_dsa import pack_latent_rows, unpack_latent_rows
from .indexer_mla_dsa import MlaDsaIndexer, TopkSelection
from .masks_mla_dsa import VisibleKeys, gather_rows, masked_softmax, selected_keys_mask
from .rope_mla_dsa import apply_rotary_half_split, apply_rotary_interleaved, yarn_softmax_scale
from .settings_mla_dsa import DsaSettings

# Largest block of gathered latent rows [B, queries, k, R + dr] the sparse path materialises at once (128 MiB fp32).
_GATHER_BLOCK_ELEMENTS = 1 << 25
_GPU_GATHER_BLOCK_ELEMENTS = 1 << 29  # on a GPU (1 GiB in bf16): few large kernels, not many small ones
# The absorbed attention's name in transformers' attention registry (see the module docstring).
ABSORBED_ATTENTION = "mla_dsa_absorbed"
# Causal MHA attention up to this many scores [B, H, S, T] is SDPA called as transformers' DeepSeek classes call it
# (values of their own head size: the math kernel, which builds the scores), so bf16 results are theirs bit for bit;
# beyond it, values are padded to the keys' size for the flash kernel, which never builds them (training memory linear).
_PEER_CALL_SCORE_ELEMENTS = 1 << 24


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


class MlaDsaAttention(nn.Module):
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
        kv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv, k_rope = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        q_rope, k_rope = self._rotate(q_rope, cos.unsqueeze(2), sin.unsqueeze(2)), self._rotate(k_rope, cos, sin)
        return query_latent, q_nope, q_rope, torch.cat([self.kv_a_layernorm(c_kv), k_rope], dim=-1)

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
        shared_selection: TopkSelection | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, TopkSelection | None]:
        """hidden_states [B, S, hidden]; key_padding_mask [B, T] bool (True = real token) or None; segment_ids [B, T]
        for a packed batch (attention and the indexer stay inside each sequence) or None; past_len: tokens cached
        before this call (a device scalar for a static cache, whose rows past the current length the causal mask hides).

        Returns the attention output [B, S, hidden]; with `output_attentions`, the attention probabilities
        [B, H, S, T] (0 at keys the indexer did not select), computed on the explicit (eager) MHA path whatever the
        attention mode; and the top-k selection it attended with (a shared layer's is `shared_selection`, its source
        layer's), or None."""
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
        selection = shared_selection if shared else None
        if sparse and not shared:
            selection = self.indexer(hidden_states, query_latent, position_embeddings, index_keys, visible,
                                     settings.index_topk)  # fmt: skip
        attn_output, attn_weights = self._attend(
            q_nope, q_rope, latent, visible, selection if sparse else None, settings, output_attentions
        )
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1))  # [B, S, H * dv]
        return attn_output, attn_weights, selection

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
            query_latent = self.q_a_layernorm(self.q_a_proj(hidden_states))  # c_Q, also the indexer's input
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
        if selection is None and not return_weights and visible.causal_only(seq_len) and value_dim <= key_dim:
            # Causal attention with no mask tensor: SDPA's flash kernels (CPU and GPU) never build the [H, S, T]
            # scores, for training too. They want one head size: values are zero-padded to the keys' and cut after
            # (bf16 rounds differently from the peer's call, which small inputs keep).
            if batch_size * num_heads * seq_len * visible.num_keys > _PEER_CALL_SCORE_ELEMENTS:
                value = F.pad(value, (0, key_dim - value_dim))
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                dropout_p=self.config.attention_dropout if self.training else 0.0, is_causal=True, scale=self.scaling,
            )  # fmt: skip
            return out.transpose(1, 2)[..., :value_dim]  # [B, S, H, dv]
        mask = visible.mask(0, seq_len)  # [B or 1, S, T]
        if selection is not None:
            mask = mask & selected_keys_mask(selection.indices, visible.num_keys)
        has_key = mask.any(dim=-1, keepdim=True)  # padded queries have none: let them attend anywhere, zero them after
        mask = mask | ~has_key
        if return_weights:
            scores = torch.einsum("bshd,bthd->bhst", query, key) * self.scaling
            probs = masked_softmax(scores, mask.unsqueeze(1)) * has_key.unsqueeze(1)  # [B, H, S, T]
            dropped = F.dropout(probs, self.config.attention_dropout, self.training)
            return torch.einsum("bhst,bthv->bshv", dropped, value), probs
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=mask.unsqueeze(1),
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            scale=self.scaling,
        )  # [B, H, S, dv]
        return out.transpose(1, 2) * has_key.unsqueeze(-1)  # [B, S, H, dv]

    # ------------------------------------------------------------------------------------------ absorbed mode
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, R] and W_UV [H, dv, R] from `kv_b_proj`, viewed as [H, dn + dv, R].

        A plain Linear gives views of its weight (free, and differentiable). A wrapped one (LoRA, quantized) is
        evaluated on the identity, so its effective weight is used. Outside autograd that result is reused while the
        module still maps a fixed probe row to the same output: whatever changes what the module computes - a weight
        update, a merge, PEFT's disable_adapter() or set_adapter(), a new scale, another dtype or device - changes
        the probe's output too, where parameter versions alone miss adapter switches. The probe costs one row."""
        module = self.kv_b_proj
        if type(module) is nn.Linear:
            weight = _local(module.weight)  # under tensor parallelism, this process's heads
        elif torch.is_grad_enabled():
            weight = _effective_weight(module, self.kv_lora_rank)
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
        w_uk, _ = self.absorbed_weights()
        return torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk.to(q_nope.dtype)), q_rope], dim=-1)

    def _absorbed_attention(self, q_nope, q_rope, latent, visible: VisibleKeys, selection: TopkSelection | None
                            ) -> torch.Tensor:  # fmt: skip
        """[B, S, H, dv], one query chunk at a time: the absorbed query [s, H, R + dr] and the latent output
        [s, H, R] exist only per chunk, so long prefills stay O(chunk) in memory. Under autograd each chunk runs
        checkpointed (recomputed in backward), so training keeps no chunk's scores or gathered rows either: memory
        grows with S, not with S x k or S x T."""
        batch_size, seq_len, num_heads, _ = q_nope.shape
        w_uk, w_uv = (weight.to(q_nope.dtype) for weight in self.absorbed_weights())
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
        attention = ALL_ATTENTION_FUNCTIONS[ABSORBED_ATTENTION]
        latent_out, _ = attention(self, query.transpose(1, 2), rows, rows, mask, self.scaling, indices=indices)
        return torch.einsum("bshr,hvr->bshv", latent_out, w_uv)


def absorbed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    indices: torch.Tensor | None = None,
    gather_out: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """MLA's absorbed attention for a block of queries, as the registry calls it (`ABSORBED_ATTENTION`).

    query [B, H, s, R + dr]: W_UK folded into it. key: the latent rows [B, 1, T, R + dr] ([c_KV ; k_R], one head for
    every query head), or DeepSeek-V3.2's FP8-packed rows (uint8 [B, 1, T, 656], FlashMLA's layout). value: the same
    rows (MLA's values are their first `module.kv_lora_rank` columns). indices [B, s, k]: the rows each query attends
    to, -1 where there is none (FlashMLA's convention); or None, and every row where attention_mask [B or 1, 1, s, T]
    (bool, True = visible) is True. gather_out: where to gather the selected rows (see `gather_rows`), or None.
    Returns the latent output [B, s, H, R] (W_UV is applied after) and no probabilities."""
    query = query.transpose(1, 2)  # [B, s, H, R + dr]
    rows, rank = key[:, 0], module.kv_lora_rank  # [B, T, R + dr]
    if indices is None:
        if rows.dtype == torch.uint8:
            rows = unpack_latent_rows(rows, rank, query.dtype)
        scores = torch.einsum("bshc,btc->bsht", query, rows)  # [B, s, H, T]
        probs = masked_softmax(scores * scaling, attention_mask[:, 0].unsqueeze(2))
        return torch.einsum("bsht,btr->bshr", probs, rows[..., :rank]), None
    rows = gather_rows(rows, indices.clamp(min=0), gather_out)  # [B, s, k, R + dr]: only the selected rows are read
    if rows.dtype == torch.uint8:
        rows = unpack_latent_rows(rows, rank, query.dtype)  # decoded after the gather
    scores = torch.einsum("bshc,bskc->bshk", query, rows)
    probs = masked_softmax(scores * scaling, (indices >= 0).unsqueeze(2))
    return torch.einsum("bshk,bskr->bshr", probs, rows[..., :rank]), None


def register_absorbed_attention() -> None:
    """Puts `absorbed_attention_forward` in transformers' attention registry under `ABSORBED_ATTENTION` unless
    something already is there (the mla_dsa package's CPU-tuned implementation, a kernel): a checkpoint's code never
    replaces what a user or a kernel package chose. Every model calls it when it is built."""
    if ABSORBED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ABSORBED_ATTENTION, absorbed_attention_forward)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds: a DTensor's local shard (tensor parallelism), else the tensor."""
    to_local = getattr(tensor, "to_local", None)  # only DTensors have it; plain tensors are whole
    return to_local() if to_local is not None else tensor


def _probe_row(module: nn.Module, in_features: int) -> torch.Tensor:
    """[1, in_features]: a fixed row with no structure a weight change could leave unseen (seeded, not the RNG's)."""
    param = next(module.parameters())
    row = torch.arange(1, in_features + 1, dtype=torch.float64, device=param.device)
    return torch.sin(row * 12.9898).mul(43758.5453).frac().sub(0.5).to(param.dtype).unsqueeze(0)


def _effective_weight(module: nn.Module, in_features: int) -> torch.Tensor:
    """The weight [out, in] a (possibly wrapped) linear module applies, bias excluded."""
    param = next(module.parameters())
    eye = torch.eye(in_features, dtype=param.dtype, device=param.device)
    zero = torch.zeros(1, in_features, dtype=param.dtype, device=param.device)
    return (module(eye) - module(zero)).T


__all__ = [
    "ABSORBED_ATTENTION",
    "MlaDsaAttention",
    "MlaDsaRMSNorm",
    "absorbed_attention_forward",
    "register_absorbed_attention",
]
