"""The lightning indexer of DeepSeek Sparse Attention and its top-k token selection.

Index score of query t for key s (DeepSeek-V3.2, semantics as transformers' `DeepseekV32Indexer`):

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s] * index_head_dim^-0.5),   w = weights_proj(h) * index_n_heads^-0.5

with `q_I = wq_b(c_Q)` (`index_n_heads` heads), `k_I = k_norm(wk(h))` (one head, LayerNorm with bias), and RoPE on the
FIRST `qk_rope_head_dim` dims of each in the half-split (NeoX) layout: the reverse of the main attention's
`[nope | rope]` split and not its interleaved layout. Scores are computed in float32, `weights_proj` runs in its own
(float32) dtype. Unlike transformers' indexer, scores stay differentiable so the indexer can be trained.
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .rope_mla_dsa import apply_rotary_half_split

# Largest [queries, heads, keys] block of float32 per-head index scores materialised at once (64 MiB).
_SCORE_BLOCK_ELEMENTS = 1 << 24
FP8_BLOCK = 128  # values per scale in FP8 indexer keys, as DeepSeek's inference code
FP8_MAX = 448.0


class MlaDsaIndexer(nn.Module):
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

    def project_queries(
        self, hidden_states: torch.Tensor, query_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns rotated queries [B, S, n_heads, head_dim] and float32 head weights [B, S, n_heads]."""
        batch_size, seq_len, _ = hidden_states.shape
        queries = self.wq_b(query_latent).view(batch_size, seq_len, self.n_heads, self.head_dim)
        queries = _rotate_leading_dims(queries, cos.unsqueeze(2), sin.unsqueeze(2), self.rope_dim)
        weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float()
        return queries, weights * self.n_heads**-0.5

    def project_keys(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Returns rotated keys [B, S, head_dim]."""
        keys = self.k_norm(self.wk(hidden_states))
        return _rotate_leading_dims(keys, cos, sin, self.rope_dim)

    # ------------------------------------------------------------------------------------------- FP8 key cache
    # DeepSeek's inference rotates indexer queries and keys with a Hadamard transform (orthogonal: q.k unchanged,
    # outliers spread over all dims) and stores keys as e4m3 with one float32 scale per 128 values. Keys are packed
    # per token as [head_dim e4m3 bytes | 4 bytes per scale] in one uint8 row, so a key and its scale never part.
    def pack_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Rotated, FP8-quantized keys [B, S, head_dim + 4 * blocks] (uint8) from keys [B, S, head_dim]."""
        quantized, scales = quantize_fp8_blocks(hadamard_rotate(keys.float()), self.fp8_block, self.scale_fmt)
        return torch.cat([quantized.view(torch.uint8), scales.contiguous().view(torch.uint8)], dim=-1)

    def unpack_keys(self, packed: torch.Tensor) -> torch.Tensor:
        """Float32 rotated keys [B, T, head_dim] from the packed uint8 rows."""
        quantized = packed[..., : self.head_dim].contiguous().view(torch.float8_e4m3fn)
        scales = packed[..., self.head_dim :].contiguous().view(torch.float32)
        return dequantize_fp8_blocks(quantized, scales, self.fp8_block)

    def fp8_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries rotated and rounded through FP8 as the keys are, float32 [B, S, H, head_dim]."""
        quantized, scales = quantize_fp8_blocks(hadamard_rotate(queries.float()), self.fp8_block, self.scale_fmt)
        return dequantize_fp8_blocks(quantized, scales, self.fp8_block)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last dim (n a power of two): orthogonal, so dot products are unchanged."""
    return x @ _hadamard(x.shape[-1], x.device)


_HADAMARDS: dict = {}


def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    """Sylvester's construction, normalised; cached per size and device."""
    key = (n, str(device))
    if key not in _HADAMARDS:
        if n & (n - 1):
            raise ValueError(f"the Hadamard rotation needs a power-of-two index_head_dim, got {n}")
        matrix = torch.ones(1, 1)
        while matrix.shape[0] < n:
            matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
        _HADAMARDS[key] = (matrix / n**0.5).to(device)
    return _HADAMARDS[key]


def quantize_fp8_blocks(x: torch.Tensor, block: int, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values [..., D] and float32 scales [..., D / block]: scale = amax / 448 per block of the last dim,
    rounded up to a power of two with `scale_fmt="ue8m0"`."""
    blocks = x.float().unflatten(-1, (x.shape[-1] // block, block))
    scales = blocks.abs().amax(dim=-1).clamp(min=1e-10) / FP8_MAX
    if scale_fmt == "ue8m0":
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    quantized = (blocks / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.flatten(-2), scales


def dequantize_fp8_blocks(quantized: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    blocks = quantized.float().unflatten(-1, (quantized.shape[-1] // block, block))
    return (blocks * scales.unsqueeze(-1)).flatten(-2)


def _rotate_leading_dims(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    rotated = apply_rotary_half_split(x[..., :rope_dim], cos, sin)
    return torch.cat([rotated, x[..., rope_dim:]], dim=-1)


def index_scores(
    queries: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Index scores [B, S, T] (float32) of queries [B, S, H, D] with head weights [B, S, H] against keys [B, T, D].

    The per-head scores [B, s, H, T] are built for a block of queries at a time, so memory stays bounded."""
    batch_size, seq_len, n_heads, head_dim = queries.shape
    num_keys = keys.shape[1]
    keys = keys.float()
    block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, batch_size * n_heads * num_keys))
    out = []
    for start in range(0, seq_len, block):
        # softmax_scale > 0 commutes with ReLU: fold it into the (smaller) query block.
        q = queries[:, start : start + block].float() * softmax_scale  # [B, s, H, D]
        rows = q.shape[1]
        # Keys as the long side of the matmul ([T, D] @ [D, s*H]): BLAS is fastest that way round.
        per_head = F.relu(torch.bmm(keys, q.reshape(batch_size, rows * n_heads, head_dim).transpose(1, 2)))
        per_head = per_head.view(batch_size, num_keys, rows, n_heads)  # [B, T, s, H]
        head_weights = weights[:, start : start + block].float().unsqueeze(1)  # [B, 1, s, H]
        out.append((per_head * head_weights).sum(-1).transpose(1, 2))  # [B, s, T]
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def gather_rows(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """rows [B, T, C] picked by indices [B, s, k] -> [B, s, k, C] (index_select per batch row: a copy of just the
    selected rows, never of all T)."""
    picked = [rows[b].index_select(0, indices[b].reshape(-1)) for b in range(rows.shape[0])]
    stacked = picked[0].unsqueeze(0) if len(picked) == 1 else torch.stack(picked)
    return stacked.view(*indices.shape, rows.shape[-1])


def select_topk(scores: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys per query among the valid ones.

    Args:
        scores: index scores [B, S, T]; valid: [B, S, T] bool (causal and not padding).
    Returns:
        indices [B, S, min(k, T)] and whether each selected key is valid: a query with fewer than k valid keys still
        gets k indices from `topk`, and the invalid ones must be masked out of the attention.
    """
    k = min(k, scores.shape[-1])
    masked = scores.masked_fill(~valid, float("-inf"))
    indices = masked.topk(k, dim=-1).indices
    return indices, valid.gather(-1, indices)


class KeyLayout:
    """Which keys each query may see: causal by cache position, not padding, and, in a packed row (several
    sequences one after another, as DataCollatorWithFlattening makes them), only its own sequence's."""

    def __init__(
        self,
        past_len: int,
        num_keys: int,
        key_padding_mask: torch.Tensor | None,
        device: torch.device,
        segment_ids: torch.Tensor | None = None,
    ):
        self.past_len, self.num_keys = past_len, num_keys
        self.key_padding_mask = key_padding_mask  # [B, T] bool or None
        self.segment_ids = segment_ids  # [B, T] int (which packed sequence each position is in) or None
        self.device = device

    def valid(self, start: int, end: int) -> torch.Tensor:
        """[B or 1, end - start, T] bool for queries start..end-1 of this forward."""
        query_pos = torch.arange(self.past_len + start, self.past_len + end, device=self.device)
        valid = (torch.arange(self.num_keys, device=self.device) <= query_pos[:, None]).unsqueeze(0)  # [1, s, T]
        if self.key_padding_mask is not None:
            valid = valid & self.key_padding_mask[:, None, :]
        if self.segment_ids is not None:
            query_segments = self.segment_ids[:, self.past_len + start : self.past_len + end]
            valid = valid & (query_segments[:, :, None] == self.segment_ids[:, None, :])
        return valid


class TopkSelector:
    """The indexer's queries, head weights and keys for one forward; scores and top-k for a range of queries."""

    def __init__(self, queries, weights, keys, layout: KeyLayout, k: int, softmax_scale: float):
        self.queries, self.weights, self.keys = queries, weights, keys  # [B,S,H,D], [B,S,H], [B,T,D]
        self.layout, self.k, self.softmax_scale = layout, k, softmax_scale

    def scores(self, start: int, end: int) -> torch.Tensor:
        """Index scores [B, s, T] (float32, differentiable in the indexer's parameters)."""
        return index_scores(self.queries[:, start:end], self.weights[:, start:end], self.keys, self.softmax_scale)

    def valid(self, start: int, end: int) -> torch.Tensor:
        return self.layout.valid(start, end).expand(self.queries.shape[0], -1, -1)

    @torch.no_grad()
    def topk(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected key indices [B, s, k] and whether each is a valid key [B, s, k]."""
        return select_topk(self.scores(start, end), self.valid(start, end), self.k)

    def selection_mask(self, start: int, end: int) -> torch.Tensor:
        """[B, s, T] bool: True at the selected keys."""
        indices, _ = self.topk(start, end)
        mask = torch.zeros(indices.shape[0], end - start, self.layout.num_keys, dtype=torch.bool, device=indices.device)
        return mask.scatter_(-1, indices, True)


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 over the last dim, cast back; a row with no valid entry gives zeros, not NaN."""
    dtype = scores.dtype
    masked = scores.float().masked_fill(~valid, float("-inf"))
    if hasattr(torch, "_safe_softmax"):  # fused: fully masked rows give 0 (torch >= 2.5)
        return torch._safe_softmax(masked, -1).to(dtype)
    return torch.softmax(masked, dim=-1).nan_to_num(0.0).to(dtype)


class IndexerStats(NamedTuple):
    """One layer's indexer training signal: mean KL over queries (differentiable in the indexer only) and the
    attention-mass recall of its top-k (NaN when no query has more than k keys, or in the sparse stage)."""

    kl: torch.Tensor
    recall: torch.Tensor


def indexer_kl_loss(
    selector: TopkSelector, main_query: torch.Tensor, latent: torch.Tensor, scaling: float, sparse: bool,
    chunk_size: int,
) -> IndexerStats:  # fmt: skip
    """DeepSeek-V3.2's indexer loss, mean over queries that have a valid key:

    dense:  KL(p_t || softmax(I_t))            over all causal keys,
    sparse: KL(p_t[S_t] || softmax(I_t[S_t]))  over the selected keys S_t only,

    p_t = main attention probabilities (absorbed queries [B, S, H, R + dr] against latent rows [B, T, R + dr], under
    `scaling`) summed over heads and L1-normalised, detached. Query chunks run under activation checkpointing, so no
    [heads, S, T] tensor is ever alive and peak extra memory is O(chunk * T * max(H, index heads))."""
    seq_len = main_query.shape[1]
    kl_total = main_query.new_zeros((), dtype=torch.float32)
    recall_total = main_query.new_zeros((), dtype=torch.float32)
    queries = recalled = 0
    for start in range(0, seq_len, chunk_size):
        end = min(seq_len, start + chunk_size)
        args = (selector.queries[:, start:end], selector.weights[:, start:end], selector.keys, main_query[:, start:end])
        chunk_fn = _sparse_chunk if sparse else _dense_chunk
        kl_sum, count, recall_sum, recall_count = checkpoint(
            chunk_fn, *args, latent, selector, start, end, scaling, use_reentrant=False
        )
        kl_total = kl_total + kl_sum
        recall_total = recall_total + recall_sum
        queries += int(count)
        recalled += int(recall_count)
    kl = kl_total / max(1, queries)
    recall = recall_total / recalled if recalled else torch.full_like(recall_total, float("nan"))
    return IndexerStats(kl, recall)


def _dense_chunk(index_q, index_w, index_k, main_query, latent, selector: TopkSelector, start, end, scaling):
    valid = selector.valid(start, end)  # [B, s, T]
    with torch.no_grad():
        scores = torch.einsum("bshc,btc->bsht", main_query, latent) * scaling  # [B, s, H, T]
        target = masked_softmax(scores.float(), valid.unsqueeze(2)).mean(dim=2)  # heads summed, L1-normalised
        del scores
    index = index_scores(index_q, index_w, index_k, selector.softmax_scale)  # [B, s, T]
    kl_sum, count = _kl(target, index, valid)
    with torch.no_grad():
        long_rows = valid.sum(-1) > selector.k  # recall is only informative where top-k must leave keys out
        indices, _ = select_topk(index, valid, selector.k)
        recall = target.gather(-1, indices).sum(-1)
        recall_sum, recall_count = (recall * long_rows).sum(), long_rows.sum()
    return kl_sum, count, recall_sum, recall_count


def _sparse_chunk(index_q, index_w, index_k, main_query, latent, selector: TopkSelector, start, end, scaling):
    indices, selected_valid = selector.topk(start, end)  # [B, s, k]
    with torch.no_grad():
        rows = gather_rows(latent, indices)  # [B, s, k, R + dr]
        scores = torch.einsum("bshc,bskc->bshk", main_query, rows) * scaling
        target = masked_softmax(scores.float(), selected_valid.unsqueeze(2)).mean(dim=2)  # [B, s, k]
        del rows, scores
    index = index_scores(index_q, index_w, index_k, selector.softmax_scale).gather(-1, indices)  # [B, s, k]
    kl_sum, count = _kl(target, index, selected_valid)
    zero = kl_sum.new_zeros(())
    return kl_sum, count, zero, zero


def _kl(target: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of KL(target || softmax(logits)) restricted to `valid`, and the number of rows with a valid key."""
    log_probs = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    log_probs = torch.where(valid, log_probs, torch.zeros_like(log_probs))
    per_row = (torch.xlogy(target, target) - target * log_probs).sum(-1)
    has_key = valid.any(-1)
    return (per_row * has_key).sum(), has_key.sum()


__all__ = [
    "IndexerStats",
    "KeyLayout",
    "MlaDsaIndexer",
    "TopkSelector",
    "gather_rows",
    "index_scores",
    "indexer_kl_loss",
    "masked_softmax",
    "select_topk",
]
