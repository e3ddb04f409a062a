"""The indexer's training loss (DeepSeek-V3.2, §2.1): KL from the main attention to the index scores, computed beside
the model, never inside it (the model only selects keys).

    dense stage:  KL(p_t || softmax(I_t))            over all visible keys,
    sparse stage: KL(p_t[S_t] || softmax(I_t[S_t]))  over the selected keys S_t only,

p_t = main attention probabilities (absorbed queries [B, S, H, R + dr] against latent rows [B, T, R + dr], under the
attention's scaling) summed over heads and L1-normalised, detached: the indexer learns from the attention, never the
reverse. Both are means over the queries that have a visible key.

    with IndexerLoss(model, "dense") as indexer_loss:
        out = model(ids, use_sparse_attention=False)
        indexer_loss.kl.backward()

`IndexerLoss` hooks every attention layer of an mla_dsa model (also inside a PEFT or DDP wrapper): each forward it
sees re-projects the layer's input (no gradient into the main model: its queries and latent rows are the target),
scores it with the layer's indexer and keeps one `IndexerStats` per DSA layer. The loss is made inside the layer's
forward, so FSDP's gathered weights and activation checkpointing's replay (which recomputes it in backward) see it
there; keep the hooks installed until backward is done (`reset()` between steps, as `IndexerTrainer` does).

Shapes: B batch, S tokens, T keys (= S: the loss scores whole sequences), H main heads, R `kv_lora_rank`,
dr `qk_rope_head_dim`, h index heads, D `index_head_dim`, k selected keys per query.
"""

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .modeling.modeling_mla_dsa import VisibleKeys, gather_rows, masked_softmax, query_block, select_topk

STAGES = ("dense", "sparse")
# Largest block of gathered rows [B, queries, k, C] (latent rows for the sparse-stage target, index keys for its
# scores) made at once: 128 MiB in float32 on a CPU, 1 GiB on a GPU (few large kernels, not many small ones).
_GATHER_BLOCK_ELEMENTS = 1 << 25
_GPU_GATHER_BLOCK_ELEMENTS = 1 << 28
# Activation checkpointing of the loss's query chunks keeps a step's memory linear in the sequence length at the price
# of computing every chunk twice. Where what the chunks would keep for backward instead (the dense stage's per-head
# index scores [B, S, h, T] and its target, log-probabilities and mask [B, S, T]; the sparse stage's gathered index
# keys [B, S, k, D] and per-head scores [B, S, h, k]) is at most this many float32 elements over all DSA layers of a
# step, they are kept: a bounded amount, and a quarter less time per dense warm-up step of the demo's model at 4 x 512
# tokens.
KEPT_ELEMENTS_PER_STEP = 1 << 27  # 512 MiB


class IndexerStats(NamedTuple):
    """One layer's indexer training signal: mean KL over queries (differentiable in the indexer only), the
    attention-mass recall of its top-k (NaN when no query has more than k keys, or in the sparse stage), and the mean
    KL of a uniform choice over the visible keys, log(n_t) - H(p_t), the scale `kl` is judged against (NaN in the
    sparse stage)."""

    kl: torch.Tensor
    recall: torch.Tensor
    kl_uniform: torch.Tensor


class IndexScorer(NamedTuple):
    """One layer's index queries [B, S, h, D], head weights [B, S, h] and keys [B, T, D] (float32), differentiable in
    the indexer."""

    queries: torch.Tensor
    weights: torch.Tensor
    keys: torch.Tensor
    softmax_scale: float

    def scores(self, start: int, end: int, num_keys: int | None = None) -> torch.Tensor:
        """Index scores [B, end - start, num_keys] of queries start..end-1 against the first `num_keys` keys (None:
        all T), a bounded block at a time."""
        batch_size, _, n_heads = self.weights.shape
        keys = self.keys[:, :num_keys]
        block = query_block(batch_size, n_heads, keys.shape[1], keys.device.type != "cpu")
        parts = [
            differentiable_index_scores(self.queries[:, s : min(end, s + block)],
                                        self.weights[:, s : min(end, s + block)], keys, self.softmax_scale)
            for s in range(start, end, block)
        ]  # fmt: skip
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def differentiable_index_scores(queries: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                                softmax_scale: float) -> torch.Tensor:  # fmt: skip
    """`index_scores` (queries [B, s, h, D], head weights [B, s, h], keys [B, T, D] -> [B, s, T] float32), as two
    batched products whose backward keeps one layout: the head-weighted sum as [h] @ [h, T] per query, so the gradient
    of the per-head scores comes out [B, s, h, T] like the scores themselves. `index_scores`' einsum sums over the
    heads keys-major, and its backward then handed ReLU's backward a transposed gradient: 4x the time of the same pass
    over matching layouts, a fifth of a calibration fit step (SmolLM2's shapes, 2 CPU cores)."""
    batch_size, seq_len, n_heads, head_dim = queries.shape
    # softmax_scale > 0 commutes with ReLU: folded into the (smaller) query block, as index_scores does.
    scaled = (queries.float() * softmax_scale).reshape(batch_size, seq_len * n_heads, head_dim)
    per_head = F.relu(torch.bmm(scaled, keys.float().transpose(1, 2)))  # [B, s * h, T]
    per_head = per_head.view(batch_size * seq_len, n_heads, -1)
    head_weights = weights.float().reshape(batch_size * seq_len, 1, n_heads)
    return torch.bmm(head_weights, per_head).view(batch_size, seq_len, -1)


class MainQueries(NamedTuple):
    """One layer's main-attention queries q_nope [B, S, H, dn] and rotated q_rope [B, S, H, dr] (no gradient), with a
    detached copy of its W_UK [H, dn, R], absorbed a block of queries at a time. The dense stage keeps them for its
    backward (each query chunk's target is recomputed there): the absorbed queries [B, S, H, R + dr] are 3x their
    size at DeepSeek-V3.2's shapes (576 against 192 numbers per head) and were the largest tensor a layer kept."""

    q_nope: torch.Tensor
    q_rope: torch.Tensor
    w_uk: torch.Tensor

    def absorbed(self, start: int, end: int) -> torch.Tensor:
        """[B, end - start, H, R + dr]: W_UK folded into queries start..end-1, so they score latent rows directly."""
        q_nope = self.q_nope[:, start:end]
        return torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, self.w_uk.to(q_nope.dtype)),
                          self.q_rope[:, start:end]], dim=-1)  # fmt: skip


class IndexerLoss:
    """The indexer's KL loss of `stage` ("dense" | "sparse") for every forward of `model` while installed (a context
    manager, or `install()` / `remove()`). `kl`, `recall`, `kl_uniform`: the means over the DSA layers of the forwards
    seen since the last `reset()` (None before any); `layers`: their `IndexerStats`, one per DSA layer and forward.

    The top-k of the recall (dense stage) and of the selection (sparse stage) is the forward's `index_topk` (the
    config's unless passed). In the sparse stage the loss is over the keys the attention selected (GLM-5's shared
    layers: their source layer's selection, scored by the source's indexer, which so learns from every layer it
    selects for); where the forward attended densely (a context no longer than k, `use_sparse_attention=False`), over
    the indexer's own top-k."""

    def __init__(self, model: torch.nn.Module, stage: str):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.attentions = [m for m in model.modules() if hasattr(m, "indexer") and hasattr(m, "absorbed_query")]
        if not self.attentions:
            raise ValueError(
                f"{type(model).__name__} has no mla_dsa attention layers this package can train (a checkpoint's own "
                "older code? load it with mla_dsa's classes, or refresh it with `mla-dsa upgrade-code`)"
            )
        self.config = self.attentions[0].config
        self.model = model
        self.layers: list[IndexerStats] = []
        self._signatures = {id(m): inspect.signature(m.forward) for m in self.attentions}
        self._scorers: dict[int, IndexScorer] = {}  # this forward's, by layer: shared layers read their source's
        self._selections: dict[int, object] = {}
        self._handles: list = []
        self._sharding_checked = False

    # -------------------------------------------------------------------------------------------- lifecycle
    def install(self) -> "IndexerLoss":
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.attentions]
            # before any layer runs: the model may have been sharded since (accelerate prepares it after this)
            self._handles.append(self.model.register_forward_pre_hook(self._before_forward))
            self._sharding_checked = False
        return self

    @property
    def installed(self) -> bool:
        """Whether its hooks are on the model's attention layers."""
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        self.layers.clear()
        self._scorers.clear()
        self._selections.clear()

    def __enter__(self) -> "IndexerLoss":
        self.reset()
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------------------- results
    @property
    def kl(self) -> torch.Tensor | None:
        return torch.stack([s.kl for s in self.layers]).mean() if self.layers else None

    @property
    def recall(self) -> torch.Tensor | None:
        return torch.stack([s.recall for s in self.layers]).nanmean() if self.layers else None

    @property
    def kl_uniform(self) -> torch.Tensor | None:
        return torch.stack([s.kl_uniform for s in self.layers]).mean() if self.layers else None

    # ------------------------------------------------------------------------------------------------- hook
    def _hook(self, attention, args, kwargs, output) -> tuple | None:
        """After one attention layer's forward: its indexer's loss against its attention, from the same inputs."""
        call = self._signatures[id(attention)].bind(*args, **kwargs).arguments
        layer_idx = attention.layer_idx
        if layer_idx in (self.config.dense_attention_layers or ()):  # never selects: nothing to train against
            return
        if call.get("cache") is not None and not _is_zero(call.get("past_len", 0)):
            raise ValueError("the indexer loss scores whole sequences: run the forward with use_cache=False")
        hidden = call["hidden_states"].detach()
        cos, sin = call["position_embeddings"]
        visible = VisibleKeys(0, hidden.shape[1], call.get("key_padding_mask"), hidden.device, call.get("segment_ids"))
        with torch.no_grad():
            query_latent, q_nope, q_rope, latent = attention.project(hidden, (cos, sin))
            if q_nope.shape[2] != attention.num_heads:  # tensor parallelism: this process holds only some heads
                raise ValueError(
                    f"the indexer loss needs all {attention.num_heads} heads' attention, this process holds "
                    f"{q_nope.shape[2]} (tensor parallelism): train the indexer data-parallel or sharded (accelerate, "
                    "FSDP) instead"
                )
            w_uk = attention.absorbed_weights(hidden.device)[0].detach()
            if self.stage == "dense":  # kept for the backward of its checkpointed chunks (sparse: used here only)
                # q_nope copied: a view would keep the whole projection [B, S, H, dn + dr] alive (q_rope is rotated
                # into a tensor of its own); W_UK copied: sharded training (FSDP) frees the gathered weight after the
                # layer's forward, before backward
                q_nope, w_uk = q_nope.clone(memory_format=torch.contiguous_format), w_uk.clone()
            main_queries = MainQueries(q_nope, q_rope, w_uk)
        top_k = call["settings"].index_topk
        selection = (call.get("selections") or {}).get(layer_idx)  # what the layer attended with, if it selected
        if attention.indexer is not None:
            indexer = attention.indexer
            queries, weights = indexer.queries(hidden, query_latent, cos, sin)
            keys = indexer.keys(hidden, cos, sin, fp8=False).float()
            self._scorers[layer_idx] = IndexScorer(queries, weights, keys, indexer.softmax_scale)
            if self.stage == "sparse" and selection is None:  # attended densely: the indexer's own top-k
                selection = indexer(hidden, query_latent, (cos, sin), keys, visible, top_k)
            self._selections[layer_idx] = selection
            source = layer_idx
        else:
            # the nearest full layer before it (GLM-5's indexer_types); none where that one never selects
            source = max(i for i in range(layer_idx) if not self.config.is_shared_indexer_layer(i))
            if source not in self._scorers:
                return
            selection = self._selections[source]
        scorer = self._scorers[source]
        batch_size, seq_len, index_heads, index_dim = scorer.queries.shape
        if self.stage == "sparse":
            kept = batch_size * seq_len * selection.indices.shape[-1] * (index_dim + index_heads)
            checkpointed = kept * len(self.attentions) > KEPT_ELEMENTS_PER_STEP
            stats = sparse_stage_loss(scorer, selection, main_queries, latent, attention.scaling, checkpointed)
        else:
            kept = batch_size * seq_len * scorer.keys.shape[1] * (index_heads + 3)
            checkpointed = kept * len(self.attentions) > KEPT_ELEMENTS_PER_STEP
            stats = dense_stage_loss(scorer, visible, main_queries, latent, attention.scaling, top_k,
                                     self.config.query_chunk_size, checkpointed)  # fmt: skip
        self.layers.append(stats)
        if self.stage == "sparse" and isinstance(output, tuple) and output[0].requires_grad:
            # DDP with find_unused_parameters (the Trainer's default for transformers models) learns which parameters
            # a forward used by walking back from its outputs, which the indexer's loss is not part of: it took the
            # indexer's parameters for unused and failed when backward reached them ("marked as ready twice"). The
            # layer's output carries the loss at zero weight (the same numbers), so the walk finds them.
            return (output[0] + 0.0 * stats.kl.to(output[0].dtype), *output[1:])
        return None

    def _before_forward(self, model, args) -> None:
        if not self._sharding_checked:
            self._prepare_sharded_indexers()  # raises until the model can train (checked again at the next forward)
            self._sharding_checked = True

    def _prepare_sharded_indexers(self) -> None:
        """Under FSDP2 (`fully_shard`, as `accelerate launch` with an FSDP config applies it), an indexer sharded as a
        unit of its own gets `queries` and `keys` (which the loss and the attention call besides `forward`) registered
        as FSDP forward methods: FSDP then gathers its weights for them and again for their backward, and reduces
        their gradients. The dense stage needs such units: inside its decoder layer's unit, backward would find the
        indexer's weights freed (the frozen layer's output carries no gradient, so FSDP never gathers the layer
        again, nor reduces what the indexer learnt). The sparse stage runs either way."""
        try:
            from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
        except ImportError:  # a torch without FSDP2
            return
        if not any(isinstance(module, FSDPModule) for module in self.model.modules()):
            return
        for attention in self.attentions:
            indexer = attention.indexer
            if indexer is None:
                continue
            if not isinstance(indexer, FSDPModule):
                if self.stage == "dense":
                    raise ValueError(
                        "the dense stage under FSDP needs each indexer sharded as a unit of its own: wrap "
                        "MlaDsaIndexer as well as MlaDsaDecoderLayer (accelerate: fsdp_transformer_layer_cls_to_wrap: "
                        "MlaDsaDecoderLayer,MlaDsaIndexer, as examples/accelerate_fsdp.yaml does)"
                    )
                continue
            for method in ("queries", "keys"):
                if method not in vars(indexer):  # not registered yet (registering twice would gather twice)
                    register_fsdp_forward_method(indexer, method)
        # transformers' gradient checkpointing, or torch's checkpoint wrapper (accelerate's
        # fsdp_activation_checkpointing; FSDP2 subclasses it)
        checkpointed = any(getattr(module, "gradient_checkpointing", False)
                           or any(cls.__name__ == "CheckpointWrapper" for cls in type(module).__mro__)
                           for module in self.model.modules())  # fmt: skip
        if self.stage == "dense" and checkpointed:
            raise ValueError(
                "the dense stage under FSDP cannot use activation checkpointing: backward would recompute the "
                "frozen layers, whose weights FSDP gathers only for layers that train. Run it without (no "
                "--gradient-checkpointing or fsdp_activation_checkpointing): the frozen layers keep no activations, "
                "the loss keeps each layer's indexer inputs and attention target"
            )


def _is_zero(past_len) -> bool:
    return not isinstance(past_len, torch.Tensor) and past_len == 0


def dense_stage_loss(
    scorer: IndexScorer, visible: VisibleKeys, main_queries: MainQueries, latent: torch.Tensor, scaling: float,
    top_k: int, chunk_size: int, checkpointed: bool = True,
) -> IndexerStats:  # fmt: skip
    """KL over every visible key, and the recall of the top `top_k` by index score, a chunk of queries at a time, so
    no [heads, S, T] tensor is ever alive: peak extra memory is O(chunk * T * max(H, index heads)). `checkpointed`:
    the chunks run under activation checkpointing (each chunk's target and index scores are computed once forward, once
    in backward) and what a layer keeps for backward is its index queries and keys, its main queries (not absorbed) and
    its latent rows; otherwise each chunk keeps its [B, chunk, h, T] index scores and [B, chunk, T] target."""
    seq_len = main_queries.q_rope.shape[1]
    # kl sum, queries, recall sum, queries with > k keys, uniform-choice kl sum
    totals = latent.new_zeros(5, dtype=torch.float32)
    for start in range(0, seq_len, chunk_size):
        end = min(seq_len, start + chunk_size)
        # A chunk scores only the keys its queries may see (the causal prefix: about half the work of every key for a
        # long sequence). Its mask is made inside it: kept as a checkpoint input for every chunk, the masks would add
        # up to an S x T tensor.
        num_keys = visible.causal_prefix(end, 1)
        chunk = _run(
            checkpointed, _dense_chunk, scorer.queries[:, start:end], scorer.weights[:, start:end],
            scorer.keys[:, :num_keys], main_queries.q_nope[:, start:end], main_queries.q_rope[:, start:end],
            main_queries.w_uk, latent[:, :num_keys], visible, start, end, scorer.softmax_scale, scaling, top_k,
        )  # fmt: skip
        totals = totals + chunk
    kl = totals[0] / totals[1].clamp(min=1)
    recall = totals[2] / totals[3] if totals[3] > 0 else torch.full_like(totals[2], float("nan"))
    return IndexerStats(kl, recall.detach(), (totals[4] / totals[1].clamp(min=1)).detach())


def _dense_chunk(index_q, index_w, index_k, q_nope, q_rope, w_uk, latent, visible_keys: VisibleKeys, start: int,
                 end: int, softmax_scale, scaling, top_k):  # fmt: skip
    """[kl sum, queries, recall sum, recall queries, uniform kl sum] of queries start..end-1 (the index and main
    queries given are theirs, the keys and latent rows the first ones, every key they may see); only the kl sum
    carries gradients."""
    visible = visible_keys.mask(start, end)[..., : latent.shape[1]].expand(latent.shape[0], -1, -1)  # [B, s, T']
    with torch.no_grad():
        main_query = MainQueries(q_nope, q_rope, w_uk).absorbed(0, end - start)  # [B, s, H, R + dr]
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
    scorer: IndexScorer, selection, main_queries: MainQueries, latent: torch.Tensor, scaling: float,
    checkpointed: bool = True,
) -> IndexerStats:  # fmt: skip
    """KL over the selected keys `selection.indices` [B, S, k] (masked by `selection.valid`): the target and the
    index scores read only the k gathered rows per query, a bounded block of queries at a time (`checkpointed`: the
    index scores under activation checkpointing, so backward gathers them again instead of keeping them)."""
    batch_size, seq_len = main_queries.q_rope.shape[:2]
    k = selection.indices.shape[-1]
    gpu = latent.device.type != "cpu"
    elements = _GPU_GATHER_BLOCK_ELEMENTS if gpu else _GATHER_BLOCK_ELEMENTS
    chunk = max(1, elements // (batch_size * k * max(latent.shape[-1], scorer.queries.shape[2] * 2)))
    targets, scores = [], []
    for start in range(0, seq_len, chunk):
        end = min(seq_len, start + chunk)
        indices = selection.indices[:, start:end]
        with torch.no_grad():
            rows = gather_rows(latent, indices)  # [B, s, k, R + dr]
            main = torch.einsum("bshc,bskc->bshk", main_queries.absorbed(start, end), rows) * scaling
            targets.append(masked_softmax(main.float(), selection.valid[:, start:end].unsqueeze(2)).mean(dim=2))
            del rows, main
        scores.append(_run(checkpointed, _selected_index_scores, scorer.queries[:, start:end],
                           scorer.weights[:, start:end], scorer.keys, indices, scorer.softmax_scale))  # fmt: skip
    target = torch.cat(targets, dim=1) if len(targets) > 1 else targets[0]  # [B, S, k]
    index = torch.cat(scores, dim=1) if len(scores) > 1 else scores[0]
    kl_sum, count = kl_to_target(target, index, selection.valid)
    unmeasured = torch.full_like(kl_sum, float("nan")).detach()
    return IndexerStats(kl_sum / count.clamp(min=1), unmeasured, unmeasured)


def _selected_index_scores(queries, weights, keys, indices, softmax_scale: float) -> torch.Tensor:
    """Index scores [B, s, k] of queries [B, s, h, D] (head weights [B, s, h]) at their selected keys only."""
    rows = gather_rows(keys, indices)  # [B, s, k, D]
    per_head = F.relu(torch.einsum("bshd,bskd->bshk", queries.float() * softmax_scale, rows))
    return torch.einsum("bsh,bshk->bsk", weights.float(), per_head)


def _run(checkpointed: bool, function, *args):
    return checkpoint(function, *args, use_reentrant=False) if checkpointed else function(*args)


def kl_to_target(target: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of KL(target || softmax(logits)) restricted to `valid`, and the number of rows with a valid key."""
    log_probs = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    log_probs = torch.where(valid, log_probs, torch.zeros_like(log_probs))
    per_row = (torch.xlogy(target, target) - target * log_probs).sum(-1)
    has_key = valid.any(-1)
    return (per_row * has_key).sum(), has_key.sum()


__all__ = [
    "STAGES",
    "IndexScorer",
    "IndexerLoss",
    "IndexerStats",
    "MainQueries",
    "dense_stage_loss",
    "kl_to_target",
    "sparse_stage_loss",
]
