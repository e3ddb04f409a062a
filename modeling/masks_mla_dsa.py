"""Which keys a query may see, and the masked softmax and row gathers the attention and the indexer loss share.

Shapes: B batch, S new tokens (queries), T cached + new tokens (keys), k selected keys per query, C row width.
"""

import torch


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


def gather_rows(rows: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows [B, T, C] picked by indices [B, s, k] -> [B, s, k, C] (index_select per batch row: a copy of just the
    selected rows, never of all T). `out` (contiguous [B, >= s, k, C], outside autograd): written in place, so a loop
    over query chunks reuses one buffer (a fresh large allocation per chunk costs more than the gather on CPU)."""
    if out is not None:
        out = out[:, : indices.shape[1]]
        for b in range(rows.shape[0]):
            torch.index_select(rows[b], 0, indices[b].reshape(-1), out=out[b].view(-1, rows.shape[-1]))
        return out
    picked = [rows[b].index_select(0, indices[b].reshape(-1)) for b in range(rows.shape[0])]
    stacked = picked[0].unsqueeze(0) if len(picked) == 1 else torch.stack(picked)
    return stacked.view(*indices.shape, rows.shape[-1])


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 over the last dim, cast back; a row with no valid entry gives zeros, not NaN."""
    dtype = scores.dtype
    masked = scores.float().masked_fill(~valid, float("-inf"))
    return torch.softmax(masked, dim=-1).nan_to_num(0.0).to(dtype)


__all__ = ["VisibleKeys", "gather_rows", "masked_softmax", "selected_keys_mask"]
