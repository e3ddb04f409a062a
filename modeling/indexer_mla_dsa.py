"""The lightning indexer of DeepSeek Sparse Attention: it scores every visible key and selects the top k per query.

Index score of query t for key s (DeepSeek-V3.2, semantics as transformers' `DeepseekV32Indexer`):

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s] * index_head_dim^-0.5),   w = weights_proj(h) * index_n_heads^-0.5

with `q_I = wq_b(c_Q)` (`index_n_heads` heads), `k_I = k_norm(wk(h))` (one head, LayerNorm with bias), and RoPE on the
FIRST `qk_rope_head_dim` dims of each in the half-split (NeoX) layout: the reverse of the main attention's
`[nope | rope]` split and not its interleaved layout. Scores are computed in float32, `weights_proj` runs in its own
(float32) dtype. The indexer's training (its KL losses) lives in the installed `mla_dsa` package, which scores
with the same `queries`, `keys` and `index_scores`.

Shapes: B batch, S new tokens (queries), T cached + new tokens (keys), H `index_n_heads`, D `index_head_dim`, k the
number of selected keys per query.
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8_mla_dsa import FP8_BLOCK, fp8_round_trip, pack_fp8_rows, unpack_fp8_rows
from .masks_mla_dsa import VisibleKeys
from .rope_mla_dsa import apply_rotary_half_split, apply_rotary_interleaved

# Queries per scoring block: their index scores [queries, keys] and, under autograd (training), their per-head scores
# [queries, heads, keys] within this many float32 elements (64 MiB); without autograd only one tile of the per-head
# scores exists at a time (below).
_SCORE_BLOCK_ELEMENTS = 1 << 24
# Per-head scores are made and reduced over the heads one tile of keys at a time, each tile [B, s*H, keys] within
# this many float32 elements (4 MiB, within an 8 MiB L3): the matmul, the in-place ReLU and the head weighting
# then read it from cache. A whole [128 queries x 16 heads, 8K keys] block at once went to memory and back three times
# (64 MiB): tiled, an 8K prefill's index scoring runs 1.3-1.5x faster on CPU, same FLOPs; a decode step's [16, 64K]
# is one tile, as before.
_SCORE_TILE_ELEMENTS = 1 << 20
# At most this many bf16/FP8 keys per tile, whatever the queries: a decode step's cached keys are upcast to float32
# a tile at a time, and on CPU a fresh 32 MB buffer (64K keys of 128 dims) is served by mmap and page-faults on every
# step, 13 ms against 1 ms for the same copy into reused memory; 4 MB tiles come from the heap's reused blocks. A
# prefill, whose per-head scores outweigh the keys, upcasts them once per forward instead (MlaDsaIndexer.forward).
_KEY_CHUNK = 8192
# The sizes above are a CPU's. A GPU has no cache to fit and a launch cost per kernel: there one block and one tile
# hold up to this many float32 elements (1 GiB), and keys are upcast whole. On an H200 the CPU sizes made a 32K
# prefill of DeepSeek-V3.2's attention 7.9x slower (10.4 s against 1.3 s) and a 16-sequence decode at 128K loop over
# 128 tiles per layer (benchmarks/gpu_day.py, 2026-12-04).
_GPU_SCORE_ELEMENTS = 1 << 28


def _on_gpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cpu"


class TopkSelection(NamedTuple):
    """What the indexer chose for one forward. `indices` [B, S, k]: the selected key positions. `valid` [B, S, k]
    bool: whether each is a visible key (a query with fewer than k visible keys still gets k indices, and the rest
    must be masked out)."""

    indices: torch.Tensor
    valid: torch.Tensor


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
        self.rope_interleave = config.indexer_rope_interleave

    def keys(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp8: bool) -> torch.Tensor:
        """The keys of the new tokens as the cache holds them: rotated [B, S, D], or with `fp8` the packed rows
        [B, S, D + 4 * D / 128] (uint8, see `fp8_mla_dsa.py`)."""
        keys = _rotate_leading_dims(self.k_norm(self.wk(hidden_states)), cos, sin, self.rope_dim, self.rope_interleave)
        return pack_fp8_rows(keys, self.fp8_block, self.scale_fmt) if fp8 else keys

    def queries(self, hidden_states: torch.Tensor, query_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The rotated queries [B, S, H, D] and head weights [B, S, H] (float32) of the new tokens."""
        batch_size, seq_len, _ = hidden_states.shape
        queries = self.wq_b(query_latent).view(batch_size, seq_len, self.n_heads, self.head_dim)
        queries = _rotate_leading_dims(queries, cos.unsqueeze(2), sin.unsqueeze(2), self.rope_dim, self.rope_interleave)
        weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
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
        if queries.shape[1] * self.n_heads >= self.head_dim:  # many queries: upcast the keys once (few: per tile)
            keys = keys.float()
        batch_size, seq_len, n_heads = weights.shape
        k = min(top_k, keys.shape[1])
        block = query_block(batch_size, n_heads, keys.shape[1], _on_gpu(keys))
        parts = []
        for start in range(0, seq_len, block):
            end = min(seq_len, start + block)
            num_keys = visible.causal_prefix(end, k)  # keys later than the block's last query are never scored
            scores = index_scores(queries[:, start:end], weights[:, start:end], keys[:, :num_keys],
                                  self.softmax_scale)  # fmt: skip
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
    [B, T, D] (float32, or bf16/FP8-decoded ones, scored in float32 as the peer scores them)."""
    batch_size, rows, n_heads, head_dim = queries.shape
    num_keys = keys.shape[1]
    # softmax_scale > 0 commutes with ReLU: fold it into the (smaller) query block.
    q = (queries.float() * softmax_scale).reshape(batch_size, rows * n_heads, head_dim)
    head_weights = weights.float().reshape(batch_size * rows, 1, n_heads)
    if _on_gpu(keys):
        tile = max(1, _GPU_SCORE_ELEMENTS // (batch_size * rows * n_heads))
    else:
        tile = max(1, _SCORE_TILE_ELEMENTS // (batch_size * rows * n_heads))
        if keys.dtype != torch.float32:
            tile = min(tile, _KEY_CHUNK)  # each tile's keys are upcast on the fly
    if num_keys <= tile:
        return _score_tile(q, head_weights, keys).view(batch_size, rows, num_keys)
    scores = q.new_empty(batch_size, rows, num_keys)
    for start in range(0, num_keys, tile):
        end = min(num_keys, start + tile)
        scores[:, :, start:end] = _score_tile(q, head_weights, keys[:, start:end]).view(batch_size, rows, -1)
    return scores


def _score_tile(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [B, s*H, D] (float32, scaled) and head weights [B*s, 1, H] against keys [B, t, D] -> [B*s, 1, t] (or, for
    one query per sequence, [B, t, 1]: the same numbers).

    Two matmuls and an in-place ReLU, no elementwise pass over [s, H, t] for the head weights: 1.8x faster on CPU
    than weighting with a multiply and a sum. One query per sequence (a decode step) puts the keys on the long side,
    [t, D] @ [D, H]: MKL runs the [H, D] @ [D, t] form, whose output has only H rows, at half the speed on AVX2 CPUs
    (16K keys: 1.4 ms against 3.0 ms) and at the same speed on AVX-512 ones."""
    keys = keys.float()
    one_query_per_sequence = head_weights.shape[0] == q.shape[0]  # B * s == B
    if one_query_per_sequence:
        per_head = F.relu_(torch.bmm(keys, q.transpose(1, 2)))  # [B, t, H]
        return torch.bmm(per_head, head_weights.transpose(1, 2))  # [B, t, 1]
    per_head = F.relu_(torch.bmm(q, keys.transpose(1, 2)))  # [B, s*H, t]
    return torch.bmm(head_weights, per_head.view(head_weights.shape[0], head_weights.shape[2], -1))


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
    position fills the low 32 bits."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0, its equal
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered * (1 << 32) + torch.arange(scores.shape[-1], device=scores.device)


def _rotate_leading_dims(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int,
                         interleave: bool) -> torch.Tensor:  # fmt: skip
    """RoPE on the first `rope_dim` dims: half-split pairs (DeepSeek-V3.2's indexer) or adjacent pairs (GLM-5's)."""
    rotate = apply_rotary_interleaved if interleave else apply_rotary_half_split
    return torch.cat([rotate(x[..., :rope_dim], cos, sin), x[..., rope_dim:]], dim=-1)


__all__ = ["MlaDsaIndexer", "TopkSelection", "index_scores", "query_block", "select_topk"]
