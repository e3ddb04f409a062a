"""The absorbed MLA attention and the index scoring, tuned for CPUs: what `import mla_dsa` puts in the checkpoints'
place.

Every checkpoint's code looks both up in transformers' attention registry (under `ABSORBED_ATTENTION` and
`INDEX_SCORES`) and carries plain implementations of its own (`absorbed_attention_forward`, `index_scores`). These
compute the same numbers faster on a CPU, and are registered over them when the package is imported, so the tuning
lives here, where a release can change it, not in the code frozen into checkpoints:

- a long prefill's block of queries reads the union of their selections once, when that pays (`_union_pays`): the
  queries of a block select mostly the same keys, and one [s*H, C] @ [C, U] product with each query's other rows
  masked out runs faster than s gathers of k rows and s small products while the union is a small multiple of k
  (SmolLM2's exact conversion at 8K, k = 1,024: 2-4x k);
- otherwise it gathers every query chunk's selected latent rows into one reused buffer (a fresh large allocation
  per chunk costs more than the gather itself on CPU);
- on AVX2 CPUs a decode step (one query per sequence) puts the rows on the long side of the scores, [k, C] @ [C, H]:
  the same numbers as the [H, C] @ [C, k] form, which MKL runs there at 0.6x the speed (an output of only H rows; a
  16K-context step 29.8 -> 28.1 ms with the output matmul [R, k] @ [k, H] too). AVX-512 CPUs run the output heads-major
  (`_HEADS_MAJOR_OUTPUT`), and the scores too for a head count that is not a multiple of 16 (`_HEADS_MAJOR_SCORES`);
  a step torch.compile traces runs the output heads-major on every CPU: inductor makes the W_UV product after it a
  loop of its own, which read the keys-major output with a stride, unvectorized (bench model, 4K, float32, AVX2, 1
  thread: W_UV 0.94 -> 0.23 ms a layer, a compiled step 13.1 -> 11.6 ms; 2 threads 11.1 -> 10.5; 16K 21.0 -> 19.7 and
  15.7 -> 15.6);
- index scores are made a tile of keys at a time (below), a decode step's in the same form as its attention scores,
  except over float32 cached keys, which come from memory: keys-major on every CPU (`_score_tile`);
- queries with no position-free part (`qk_nope_head_dim` 0: what a GQA conversion that keeps every key head's RoPE,
  the default, writes) are scored by their RoPE columns alone, the latent columns of the absorbed query being zeros
  (`_rope_only_queries`).

On other devices it is the checkpoint's implementation. Shapes as there: B batch, s queries, H heads, T keys, k
selected keys, C = R + dr the latent row, R `kv_lora_rank`.
"""

import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .modeling.cache_mla_dsa import unpack_latent_rows
from .modeling.modeling_mla_dsa import (
    ABSORBED_ATTENTION,
    INDEX_SCORES,
    absorbed_attention_forward,
    attend_to_rows,
    gather_rows,
    index_scores,
    masked_softmax,
)

# The gather buffer of this thread's last prefill, reused while its shape, dtype and device fit (one entry: every
# layer and query chunk of a prefill asks for the same one).
_local = threading.local()


def cpu_absorbed_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                           indices: torch.Tensor | None = None, **kwargs):  # fmt: skip
    """`absorbed_attention_forward`'s contract, faster on a CPU (see the module's docstring)."""
    if indices is None or query.device.type != "cpu" or torch.is_grad_enabled() or dropout:
        return absorbed_attention_forward(module, query, key, value, attention_mask, scaling, dropout, indices)
    rows = key[:, 0]  # [B, T, C]
    scored_from = module.kv_lora_rank if _rope_only_queries(module) else 0  # the query's columns that can be nonzero
    if query.shape[2] > 1:  # a prefill
        if _traced(rows):  # no buffer kept from a trace (fake tensors) or reused by one; no data-dependent shapes
            return absorbed_attention_forward(module, query, key, value, attention_mask, scaling, dropout, indices)
        query = query.transpose(1, 2)  # [B, s, H, C]
        unions = [selected_union(indices[b], rows.shape[1]) for b in range(rows.shape[0])]
        if _union_pays(query, rows, indices, unions, scored_from, module.kv_lora_rank):
            return _attend_to_union(query, rows, unions, scaling, module.kv_lora_rank, scored_from), None
        # the checkpoints' computation, gathering into the reused buffer
        gathered = gather_rows_into(_gather_buffer(rows, indices), rows, indices.clamp(min=0))
        if not scored_from:
            return attend_to_rows(query, gathered, indices >= 0, scaling, module.kv_lora_rank), None
        return _attend_to_rows_by_rope(query, gathered, indices >= 0, scaling, module.kv_lora_rank), None
    gathered = gather_rows(rows, indices.clamp(min=0))  # [B, 1, k, C]
    if gathered.dtype == torch.uint8:
        gathered = unpack_latent_rows(gathered, module.kv_lora_rank, query.dtype)
    return _decode_step(query.transpose(1, 2), gathered, indices >= 0, scaling, module.kv_lora_rank, scored_from), None


def _rope_only_queries(module) -> bool:
    """Whether the model's queries have no position-free part (`qk_nope_head_dim` 0, as a GQA conversion that keeps
    every key head's RoPE makes them): the absorbed query's first `kv_lora_rank` columns (q_nope W_UK) are then zeros,
    and only its RoPE columns need scoring against the rows' (half the scores' work for such a conversion of
    SmolLM2, R = 192 and 192 RoPE dims)."""
    return getattr(module, "qk_nope_head_dim", None) == 0


def _attend_to_rows_by_rope(query, rows, valid, scaling: float, kv_lora_rank: int) -> torch.Tensor:
    """`attend_to_rows` for queries whose first `kv_lora_rank` columns are zeros: scores from the RoPE columns."""
    if rows.dtype == torch.uint8:
        rows = unpack_latent_rows(rows, kv_lora_rank, query.dtype)
    scores = torch.einsum("bshc,bskc->bshk", query[..., kv_lora_rank:] * scaling, rows[..., kv_lora_rank:])
    probs = masked_softmax(scores, valid.unsqueeze(2))
    return torch.einsum("bshk,bskr->bshr", probs, rows[..., :kv_lora_rank])


def selected_union(indices: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's selections [s, k] (-1: none) among `num_keys` keys -> the keys any of its queries selected [U]
    (ascending) and which of them each query selected [s, U] (bool)."""
    spare = num_keys  # where -1 points: a key of no one's, dropped below
    spots = torch.where(indices >= 0, indices, spare)
    chosen = torch.zeros(num_keys + 1, dtype=torch.bool, device=indices.device)
    chosen[spots.reshape(-1)] = True
    chosen[spare] = False
    union = chosen.nonzero().squeeze(1)  # [U]
    column = chosen.cumsum(0) - 1  # a chosen key's place in the union
    column[spare] = union.numel()  # a spare column, dropped below
    selected = torch.zeros(indices.shape[0], union.numel() + 1, dtype=torch.bool, device=indices.device)
    return union, selected.scatter_(1, column[spots], True)[:, :-1]


# When a block of queries reads the union of its selections instead of each query its own rows (`_union_pays`): per
# query and row, the union's one [s*H, C] @ [C, U] product and masked softmax cost about what a gathered row's small
# product and softmax do, and the gather and the small products' overhead add about _GATHERED_ROW_COST multiply-adds a
# row. Fitted where the two forms cross on this project's 2-core AVX-512 CPU (float32, random rows, the prefill's
# query blocks, k = 256 to 2,048; the union as a multiple of k there: 3.3 at 9 heads scoring 384 numbers a row, as
# SmolLM2's exact conversion; 2.1 at 16 heads of 1,088 (the bench model); 1.35 at 64; 1.05 at 128, DeepSeek-V3.2's),
# on the safe side: it takes the union up to 3.3, 1.46, 1.11 and 1.06 x k there. In bfloat16 (AVX512-BF16) the union
# pays further (5.5-8x k at 9 heads, 6x at 16, 1.4x at 128 with k = 1,024); the rule stays float32's.
_GATHERED_ROW_COST = 8000


def _union_pays(query, rows, indices, unions, scored_from: int, kv_lora_rank: int) -> bool:
    """Whether reading the union of the block's selections once beats gathering each query's rows: by the cost model
    above, and within the gather buffer's memory ([s, H, U] scores against [s, k, C] rows)."""
    n_heads, k = query.shape[2], indices.shape[-1]
    per_row = n_heads * (query.shape[-1] - scored_from + kv_lora_rank)  # multiply-adds of a query and one row
    union = max(union.numel() for union, _ in unions)
    return union * per_row <= k * (per_row + _GATHERED_ROW_COST) and n_heads * union <= k * rows.shape[-1]


def _attend_to_union(query, rows, unions, scaling: float, kv_lora_rank: int, scored_from: int) -> torch.Tensor:
    """query [B, s, H, C] over the rows [B, T, C] its block selected (`selected_union`: per sequence the union [U]
    and each query's share [s, U]) -> [B, s, H, R]: the block's products against the union at once, each query's
    unselected rows masked out of its softmax. The same numbers as over each query's gathered rows (top-k selects a
    key once); the scores from columns `scored_from` on (`_rope_only_queries`)."""
    batch_size, num_queries, n_heads, _ = query.shape
    out = query.new_empty(batch_size, num_queries, n_heads, kv_lora_rank)
    for b, (union, selected) in enumerate(unions):
        keys = rows[b].index_select(0, union)  # [U, C]: each row read once
        if keys.dtype == torch.uint8:
            keys = unpack_latent_rows(keys, kv_lora_rank, query.dtype)
        q = (query[b, ..., scored_from:] * scaling).flatten(0, 1)  # [s*H, C - scored_from]: scaled first, as there
        scores = (q @ keys[:, scored_from:].T).view(num_queries, n_heads, -1)  # [s, H, U]
        probs = masked_softmax(scores, selected.unsqueeze(1)).flatten(0, 1)
        out[b] = (probs @ keys[:, :kv_lora_rank]).view(num_queries, n_heads, kv_lora_rank)
    return out


def _traced(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is not real data but a tracer's (torch.compile's, torch.export's fake tensors): a buffer made
    from it holds no memory, and one kept for later eager calls would turn their outputs into fake tensors too."""
    return torch.compiler.is_compiling() or type(tensor) is not torch.Tensor


def gather_rows_into(out: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`gather_rows` (rows [B, T, C] by indices [B, s, k] -> [B, s, k, C]) written into `out` (contiguous
    [B, >= s, k, C]), so a prefill's loop over layers and query chunks reuses one buffer: on a CPU a fresh large
    allocation per chunk costs more than the gather."""
    out = out[:, : indices.shape[1]]
    for b in range(rows.shape[0]):
        torch.index_select(rows[b], 0, indices[b].reshape(-1), out=out[b].view(-1, rows.shape[-1]))
    return out


def _gather_buffer(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A contiguous [B, >= s, k, C] buffer for `gather_rows_into` to write into."""
    batch_size, queries, k = indices.shape
    buffer = getattr(_local, "rows", None)
    fits = buffer is not None and buffer.dtype == rows.dtype and buffer.device == rows.device
    if not (fits and buffer.shape[0] == batch_size and buffer.shape[1] >= queries
            and buffer.shape[2:] == (k, rows.shape[-1])):  # fmt: skip
        buffer = _local.rows = rows.new_empty(batch_size, queries, k, rows.shape[-1])
    return buffer


def _decode_step(query, rows, valid, scaling: float, kv_lora_rank: int, scored_from: int = 0) -> torch.Tensor:
    """query [B, 1, H, C] against its gathered rows [B, 1, k, C] -> [B, 1, H, R]; the scores from columns
    `scored_from` on (the others are zeros in the query: `_rope_only_queries`)."""
    rows = rows.flatten(0, 1)  # [B, k, C]
    query = query.flatten(0, 1)[..., scored_from:] * scaling  # [B, H, C - scored_from]: scaled first, as there
    keys = rows[..., scored_from:]
    if _heads_major_scores(query.shape[1]):
        scores = torch.bmm(query, keys.transpose(1, 2))  # [B, H, k]
    else:
        scores = torch.bmm(keys, query.transpose(1, 2)).transpose(1, 2)  # [B, H, k], keys-major
    probs = masked_softmax(scores, valid)  # valid [B, 1, k]
    values = rows[..., :kv_lora_rank]  # [B, k, R]
    if _HEADS_MAJOR_OUTPUT or torch.compiler.is_compiling():  # compiled: see the module's docstring
        return torch.bmm(probs, values).unsqueeze(1)  # [B, 1, H, R], contiguous for W_UV after it
    latent_out = torch.bmm(values.transpose(1, 2), probs.transpose(1, 2))  # [B, R, H], rows on the long side
    return latent_out.transpose(1, 2).unsqueeze(1)  # [B, 1, H, R]


# The decode step's output as [H, k] @ [k, R] (heads-major) on AVX-512 CPUs, as [R, k] @ [k, H] (rows on the long side,
# as the scores) on the others. MKL on one AVX-512 core with bf16 (torch 2.13), k = 2048, R = 512, H = 16: heads-major
# 0.43 against 0.51 ms in float32, 0.28 against 1.03 ms in bf16; and its [H, R] output is contiguous for the W_UV
# product after it, which inductor makes a C++ loop for one token per sequence (a compiled step's W_UV 0.88 -> 0.13 ms
# per layer at 4K). AVX2 CPUs keep the form measured on them (see the module's docstring).
_HEADS_MAJOR_OUTPUT = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# A decode step's scores (the attention's over its k rows, the indexer's over cached keys just upcast from bf16/FP8)
# heads-major, [H, C] @ [C, keys], on AVX-512 CPUs when H is not a multiple of 16 (presumably because a keys-major
# output row of H floats then leaves part of a vector empty). Measured with the keys in cache: SmolLM2's 9 heads, 1
# core, float32: [4096, 128] @ [128, 9] 0.35 ms against 0.18 ms heads-major (from memory, as float32 cached keys come,
# keys-major wins instead: `_score_tile`), [256, 384] @ [384, 9] 0.059 against 0.034 ms; its conversion's bf16
# decode at 4K 61.8 -> 58.2 ms compiled, 121 -> 114 ms eager. With 16 heads keys-major stays: the bench model's
# compiled bf16 step at 4K took 9.4 ms heads-major against 7.9.
_HEADS_MAJOR_SCORES = _HEADS_MAJOR_OUTPUT


def _heads_major_scores(n_heads: int) -> bool:
    return _HEADS_MAJOR_SCORES and n_heads % 16 != 0


# Per-head index scores are made and reduced over the heads one tile of keys at a time, each tile [B, s*H, keys] within
# this many float32 elements (4 MiB, within an 8 MiB L3): the matmul, the in-place ReLU and the head weighting then
# read it from cache. A whole [128 queries x 16 heads, 8K keys] block at once went to memory and back three times
# (64 MiB): tiled, an 8K prefill's index scoring runs 1.3-1.5x faster on CPU, same FLOPs; a decode step's [16, 64K]
# is one tile.
_SCORE_TILE_ELEMENTS = 1 << 20
# At most this many bf16/FP8 keys per tile, whatever the queries: a decode step's cached keys are upcast to float32
# a tile at a time, and on CPU a fresh 32 MB buffer (64K keys of 128 dims) is served by mmap and page-faults on every
# step, 13 ms against 1 ms for the same copy into reused memory; 4 MB tiles come from the heap's reused blocks. A
# block of many queries, whose per-head scores outweigh the keys, upcasts them at once instead.
_KEY_CHUNK = 8192


def cpu_index_scores(queries, weights, keys, softmax_scale: float) -> torch.Tensor:
    """`index_scores`' contract (queries [B, s, H, D], head weights [B, s, H], keys [B, T, D] -> [B, s, T] float32),
    a tile of keys at a time on a CPU; elsewhere the checkpoint's implementation."""
    if keys.device.type != "cpu":
        return index_scores(queries, weights, keys, softmax_scale)
    batch_size, rows, n_heads, head_dim = queries.shape
    num_keys = keys.shape[1]
    if rows * n_heads >= head_dim:  # many queries: upcast the keys once (few: a tile at a time)
        keys = keys.float()
    # softmax_scale > 0 commutes with ReLU: fold it into the (smaller) query block.
    q = (queries.float() * softmax_scale).reshape(batch_size, rows * n_heads, head_dim)
    head_weights = weights.float().reshape(batch_size * rows, 1, n_heads)
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
    [t, D] @ [D, H] on AVX2 CPUs: MKL runs the [H, D] @ [D, t] form, whose output has only H rows, at half the speed
    there (16K keys: 1.4 ms against 3.0 ms); AVX-512 CPUs run [H, D] @ [D, t] when H is not a multiple of 16
    (`_HEADS_MAJOR_SCORES`), but only on keys just upcast from bf16/FP8, which are in cache: float32 keys come from
    memory, where the keys-major form streams them faster on 1 and 2 threads (AVX-512, [8K, 192] @ [192, 4], 30
    layers' caches in turn: 0.53 / 0.29 ms against 0.97 / 0.97 heads-major; [8K, 128] @ [128, 9] 0.71 / 0.36
    against 0.83 / 0.56)."""
    upcast = keys.dtype != torch.float32
    keys = keys.float()
    heads_major = upcast and _heads_major_scores(head_weights.shape[2])
    if head_weights.shape[0] == q.shape[0] and not heads_major:  # one query each
        per_head = F.relu_(torch.bmm(keys, q.transpose(1, 2)))  # [B, t, H]
        return torch.bmm(per_head, head_weights.transpose(1, 2))  # [B, t, 1]
    per_head = F.relu_(torch.bmm(q, keys.transpose(1, 2)))  # [B, s*H, t]
    return torch.bmm(head_weights, per_head.view(head_weights.shape[0], head_weights.shape[2], -1))


def register() -> None:
    """Puts the CPU implementations in the registry under `ABSORBED_ATTENTION` and `INDEX_SCORES` (over the
    checkpoints' own)."""
    AttentionInterface.register(ABSORBED_ATTENTION, cpu_absorbed_attention)
    AttentionInterface.register(INDEX_SCORES, cpu_index_scores)


__all__ = ["cpu_absorbed_attention", "cpu_index_scores", "register"]
