"""The lightning indexer of DeepSeek Sparse Attention and its top-k token selection.

Index score of query t for key s (DeepSeek-V3.2, semantics as transformers' `DeepseekV32Indexer`):

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s] * index_head_dim^-0.5),   w = weights_proj(h) * index_n_heads^-0.5

with `q_I = wq_b(c_Q)` (`index_n_heads` heads), `k_I = k_norm(wk(h))` (one head, LayerNorm with bias), and RoPE on the
FIRST `qk_rope_head_dim` dims of each in the half-split (NeoX) layout: the reverse of the main attention's
`[nope | rope]` split and not its interleaved layout. Scores are computed in float32, `weights_proj` runs in its own
(float32) dtype. Unlike transformers' indexer, scores stay differentiable so the indexer can be trained.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rope_mla_dsa import apply_rotary_half_split

# Largest [queries, heads, keys] block of float32 per-head index scores materialised at once (64 MiB).
_SCORE_BLOCK_ELEMENTS = 1 << 24


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


def _rotate_leading_dims(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    rotated = apply_rotary_half_split(x[..., :rope_dim], cos, sin)
    return torch.cat([rotated, x[..., rope_dim:]], dim=-1)


def index_scores(
    queries: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Index scores [B, S, T] (float32) of queries [B, S, H, D] with head weights [B, S, H] against keys [B, T, D].

    The per-head scores [B, s, H, T] are built for a block of queries at a time, so memory stays bounded."""
    batch_size, seq_len, n_heads, _ = queries.shape
    num_keys = keys.shape[1]
    keys_t = keys.float().transpose(1, 2)  # [B, D, T]
    block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, batch_size * n_heads * num_keys))
    out = []
    for start in range(0, seq_len, block):
        q = queries[:, start : start + block].float()  # [B, s, H, D]
        per_head = F.relu(torch.matmul(q, keys_t.unsqueeze(1)) * softmax_scale)  # [B, s, H, T]
        out.append(torch.matmul(weights[:, start : start + block].unsqueeze(-2), per_head).squeeze(-2))  # [B, s, T]
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


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


__all__ = ["MlaDsaIndexer", "index_scores", "select_topk"]
