"""The indexer's training loss (DeepSeek-V3.2, §2.1): KL from the main attention to the index scores.

    dense stage:  KL(p_t || softmax(I_t))            over all visible keys,
    sparse stage: KL(p_t[S_t] || softmax(I_t[S_t]))  over the selected keys S_t only,

p_t = main attention probabilities (absorbed queries [B, S, H, R + dr] against latent rows [B, T, R + dr], under
`scaling`) summed over heads and L1-normalised, detached: the indexer learns from the attention, never the reverse.
Both are means over the queries that have a visible key.
"""

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from .indexer_mla_dsa import IndexScorer, TopkSelection, select_topk
from .masks_mla_dsa import VisibleKeys, gather_rows, masked_softmax

# Largest block of gathered latent rows [B, queries, k, R + dr] the sparse-stage target materialises (128 MiB fp32).
_GATHER_BLOCK_ELEMENTS = 1 << 25
_GPU_GATHER_BLOCK_ELEMENTS = 1 << 29  # on a GPU (1 GiB in bf16): few large kernels, not many small ones


class IndexerStats(NamedTuple):
    """One layer's indexer training signal: mean KL over queries (differentiable in the indexer only), the
    attention-mass recall of its top-k (NaN when no query has more than k keys, or in the sparse stage), and the mean
    KL of a uniform choice over the visible keys, log(n_t) - H(p_t), the scale `kl` is judged against (NaN in the
    sparse stage)."""

    kl: torch.Tensor
    recall: torch.Tensor
    kl_uniform: torch.Tensor


def dense_stage_loss(
    scorer: IndexScorer, visible: VisibleKeys, main_query: torch.Tensor, latent: torch.Tensor, scaling: float,
    top_k: int, chunk_size: int,
) -> IndexerStats:  # fmt: skip
    """KL over every visible key, and the recall of the top `top_k` by index score. Query chunks run under
    activation checkpointing (each chunk's index scores are computed once forward, once in backward), so no
    [heads, S, T] tensor is ever alive: peak extra memory is O(chunk * T * max(H, index heads))."""
    seq_len = main_query.shape[1]
    # kl sum, queries, recall sum, queries with > k keys, uniform-choice kl sum
    totals = main_query.new_zeros(5, dtype=torch.float32)
    for start in range(0, seq_len, chunk_size):
        end = min(seq_len, start + chunk_size)
        # The chunk's mask is made inside it: kept as a checkpoint input for every chunk, the masks would add up to
        # an S x T tensor.
        chunk = checkpoint(
            _dense_chunk, scorer.queries[:, start:end], scorer.weights[:, start:end], scorer.keys,
            main_query[:, start:end], latent, visible, start, end, scorer.softmax_scale, scaling, top_k,
            use_reentrant=False,
        )  # fmt: skip
        totals = totals + chunk
    kl = totals[0] / totals[1].clamp(min=1)
    recall = totals[2] / totals[3] if totals[3] > 0 else torch.full_like(totals[2], float("nan"))
    return IndexerStats(kl, recall.detach(), (totals[4] / totals[1].clamp(min=1)).detach())


def _dense_chunk(index_q, index_w, index_k, main_query, latent, visible_keys: VisibleKeys, start: int, end: int,
                 softmax_scale, scaling, top_k):  # fmt: skip
    """[kl sum, queries, recall sum, recall queries, uniform kl sum] of queries start..end-1; only the kl sum carries
    gradients."""
    visible = visible_keys.mask(start, end).expand(main_query.shape[0], -1, -1)  # [B, s, T]
    with torch.no_grad():
        scores = torch.einsum("bshc,btc->bsht", main_query, latent) * scaling  # [B, s, H, T]
        target = masked_softmax(scores.float(), visible.unsqueeze(2)).mean(dim=2)  # heads summed, L1-normalised
        del scores
    index = IndexScorer(index_q, index_w, index_k, softmax_scale).scores(0, index_q.shape[1])  # [B, s, T]
    kl_sum, count = kl_to_target(target, index, visible)
    with torch.no_grad():
        long_rows = visible.sum(-1) > top_k  # recall is only informative where top-k must leave keys out
        indices, _ = select_topk(index, visible, top_k)
        recall = target.gather(-1, indices).sum(-1)
        recall_sum, recall_count = (recall * long_rows).sum(), long_rows.sum()
        keys = visible.sum(-1)  # [B, s]
        uniform = (keys.clamp(min=1).float().log() + torch.xlogy(target, target).sum(-1)) * (keys > 0)
    return torch.stack([kl_sum, count.float(), recall_sum, recall_count.float(), uniform.sum()])


def sparse_stage_loss(
    selection: TopkSelection, main_query: torch.Tensor, latent: torch.Tensor, scaling: float
) -> IndexerStats:
    """KL over the selected keys, from the selection the attention used (its `scores` carry the gradient): no key
    is scored again. The target reads only the k gathered latent rows per query, a bounded block at a time."""
    batch_size, seq_len = main_query.shape[:2]
    k = selection.indices.shape[-1]
    elements = _GATHER_BLOCK_ELEMENTS if latent.device.type == "cpu" else _GPU_GATHER_BLOCK_ELEMENTS
    chunk = max(1, elements // (batch_size * k * latent.shape[-1]))
    targets = []
    with torch.no_grad():
        for start in range(0, seq_len, chunk):
            end = min(seq_len, start + chunk)
            rows = gather_rows(latent, selection.indices[:, start:end])  # [B, s, k, R + dr]
            scores = torch.einsum("bshc,bskc->bshk", main_query[:, start:end], rows) * scaling
            targets.append(masked_softmax(scores.float(), selection.valid[:, start:end].unsqueeze(2)).mean(dim=2))
    target = torch.cat(targets, dim=1) if len(targets) > 1 else targets[0]  # [B, S, k]
    kl_sum, count = kl_to_target(target, selection.scores, selection.valid)
    unmeasured = torch.full_like(kl_sum, float("nan")).detach()
    return IndexerStats(kl_sum / count.clamp(min=1), unmeasured, unmeasured)


def kl_to_target(target: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of KL(target || softmax(logits)) restricted to `valid`, and the number of rows with a valid key."""
    log_probs = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    log_probs = torch.where(valid, log_probs, torch.zeros_like(log_probs))
    per_row = (torch.xlogy(target, target) - target * log_probs).sum(-1)
    has_key = valid.any(-1)
    return (per_row * has_key).sum(), has_key.sum()


__all__ = ["IndexerStats", "dense_stage_loss", "kl_to_target", "sparse_stage_loss"]
