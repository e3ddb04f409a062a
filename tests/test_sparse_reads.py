"""DSA is real sparse compute: absorbed attention reads only the latent rows the indexer selects.

Proof by corruption: every cached latent row the indexer does not select for the next step is overwritten with NaN;
the absorbed sparse path must give the very same logits, while MHA mode and dense absorbed attention (which read every
row) must turn NaN: the same check, able to fail. Proof by shapes: the tensors the sparse path builds (gathered rows,
scores) have k = index_topk where a dense path has the context length T, and do not change when T does.
"""

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mla_dsa
from mla_dsa import MlaDsaCache
from mla_dsa import attention as cpu_attention
from mla_dsa.modeling import modeling_mla_dsa

from peers import VOCAB

TOPK = 4
CONTEXT = 24


@pytest.fixture(scope="module")
def checkpoint(v32_topk4):
    return v32_topk4  # index_topk = TOPK


@pytest.fixture(scope="module")
def models(checkpoint):
    load = mla_dsa.MlaDsaForCausalLM.from_pretrained
    return {
        "absorbed": load(checkpoint, attention_mode="absorbed").eval(),
        # "auto" picks absorbed attention for short steps, and for sparse prefills longer than mha_max_length.
        "auto": load(checkpoint, mha_max_length=16).eval(),
        "mha": load(checkpoint, attention_mode="mha").eval(),
        "absorbed_dense": load(checkpoint, attention_mode="absorbed", use_sparse_attention=False).eval(),
    }


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _prefill(model, input_ids: torch.Tensor) -> MlaDsaCache:
    cache = MlaDsaCache(model.config)
    with torch.no_grad():
        model(input_ids, cache=cache, use_cache=True)
    return cache


def _decode(model, input_ids: torch.Tensor, cache: MlaDsaCache) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, cache=cache, use_cache=True).logits


def _record_selections(monkeypatch) -> list[torch.Tensor]:
    """Every top-k the indexer makes, in call order (one per layer for a short step)."""
    selections = []
    original = modeling_mla_dsa.select_topk

    def recording(scores, valid, k):
        indices, selected_valid = original(scores, valid, k)
        selections.append(indices.clone())
        return indices, selected_valid

    monkeypatch.setattr(modeling_mla_dsa, "select_topk", recording)
    return selections


def _corrupt_unselected(cache: MlaDsaCache, selections: list[torch.Tensor]) -> int:
    """NaN into every cached latent row no query of the step selected; returns the fewest rows corrupted per
    (layer, batch row). Indexer keys stay intact: the indexer scores every key by design."""
    fewest = None
    for layer, indices in zip(cache.layers, selections, strict=True):
        cached = layer.length
        for row in range(indices.shape[0]):
            keep = torch.zeros(cached, dtype=torch.bool)
            selected = indices[row].flatten()
            keep[selected[selected < cached]] = True
            layer.latent[row, :cached][~keep] = float("nan")
            corrupted = int((~keep).sum())
            fewest = corrupted if fewest is None else min(fewest, corrupted)
    return fewest


@pytest.mark.parametrize("mode", ["absorbed", "auto"])
@pytest.mark.parametrize("step", [1, 3])
def test_absorbed_sparse_reads_only_selected_rows(models, monkeypatch, step, mode):
    absorbed = models[mode]
    prompt, new_tokens = _tokens(2, CONTEXT, seed=1), _tokens(2, step, seed=2)
    cache = _prefill(absorbed, prompt)
    corrupted = copy.deepcopy(cache)

    selections = _record_selections(monkeypatch)
    clean = _decode(absorbed, new_tokens, cache)
    monkeypatch.undo()
    num_layers = absorbed.config.num_hidden_layers
    assert len(selections) == num_layers
    assert all(indices.shape == (2, step, TOPK) for indices in selections)

    fewest = _corrupt_unselected(corrupted, selections)
    assert fewest >= CONTEXT - step * TOPK  # most of the context is now NaN
    for layer in corrupted.layers:
        assert torch.isnan(layer.latent[:, : layer.length]).any()
        assert not torch.isnan(layer.index_keys[:, : layer.length]).any()

    # The control: MHA mode and dense absorbed attention read every row, so the same corruption reaches the logits.
    for control in ("mha", "absorbed_dense"):
        poisoned = _decode(models[control], new_tokens, copy.deepcopy(corrupted))
        assert torch.isnan(poisoned).all(dim=-1).all(), control

    sparse = _decode(absorbed, new_tokens, corrupted)
    assert torch.isfinite(sparse).all()
    torch.testing.assert_close(sparse, clean, rtol=0, atol=0)


def test_mha_and_absorbed_sparse_agree(models):
    """The corruption check's two modes compute the same sparse attention on a clean cache."""
    prompt, new_tokens = _tokens(2, CONTEXT, seed=1), _tokens(2, 3, seed=2)
    absorbed = _decode(models["absorbed"], new_tokens, _prefill(models["absorbed"], prompt))
    mha = _decode(models["mha"], new_tokens, _prefill(models["mha"], prompt))
    torch.testing.assert_close(absorbed, mha, atol=1e-5, rtol=0)
    dense = _decode(models["absorbed_dense"], new_tokens, _prefill(models["absorbed_dense"], prompt))
    assert (dense - absorbed).abs().max() > 1e-3  # top-4 of 24+ keys is not dense attention


def _mha_logits(model, prompt, attention_mask, new_tokens, grad: bool = False):
    """Logits of the prompt, or with `new_tokens` of a multi-token step after the prompt's cache; with `grad`, also
    q_b_proj's gradient of their sum."""
    model.zero_grad()
    with torch.set_grad_enabled(grad):
        if new_tokens is None:
            logits = model(prompt, attention_mask=attention_mask).logits
        else:
            mask = torch.cat([attention_mask, torch.ones_like(new_tokens)], dim=1)
            cache = MlaDsaCache(model.config)
            model(prompt, attention_mask=attention_mask, cache=cache, use_cache=True)
            logits = model(new_tokens, attention_mask=mask, cache=cache, use_cache=True).logits
    if not grad:
        return logits, None
    logits.sum().backward()
    return logits.detach(), model.model.layers[0].self_attn.q_b_proj.weight.grad.clone()


@pytest.mark.parametrize("case", ["prefill", "left-padded", "after-a-cache", "training"])
def test_mha_sparse_attention_in_query_blocks_equals_one_call(models, monkeypatch, case):
    """Large MHA-mode inputs attend a block of queries at a time, each to the keys it may see (the causal prefix:
    half the work of a prefill), values padded for SDPA's flash kernel, which takes the mask and never builds the
    scores: the same logits (and gradients) as one call over every key, the path of small inputs, and as absorbed
    mode. Made to take that path here by lowering the size above which it is taken."""
    mha, absorbed = models["mha"], models["absorbed"]
    prompt, new_tokens = _tokens(2, CONTEXT, seed=3), _tokens(2, 7, seed=4) if case == "after-a-cache" else None
    attention_mask = torch.ones_like(prompt)
    if case == "left-padded":
        attention_mask[1, :5] = 0
    grad = case == "training"
    one_call, one_call_grad = _mha_logits(mha, prompt, attention_mask, new_tokens, grad)

    key_lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(query, key, value, **kwargs):
        key_lengths.append((query.shape[-2], key.shape[-2], kwargs["attn_mask"].shape[-1], value.shape[-1]))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(modeling_mla_dsa, "_PEER_CALL_SCORE_ELEMENTS", 0)
    monkeypatch.setattr(mha.config, "query_chunk_size", 5)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    blocks, blocks_grad = _mha_logits(mha, prompt, attention_mask, new_tokens, grad)
    monkeypatch.undo()

    torch.testing.assert_close(blocks, one_call, atol=1e-5, rtol=0)
    if grad:
        torch.testing.assert_close(blocks_grad, one_call_grad, atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(blocks, _mha_logits(absorbed, prompt, attention_mask, new_tokens)[0], atol=1e-5,
                                   rtol=0)  # fmt: skip

    def blocks_of(past: int, queries: int) -> list[tuple[int, int, int]]:  # (queries, keys, mask width) per call
        ends = [min(start + 5, queries) for start in range(0, queries, 5)]
        return [(end - start, past + end, past + end) for start, end in zip(range(0, queries, 5), ends, strict=True)]

    calls = blocks_of(0, CONTEXT) * mha.config.num_hidden_layers  # the prompt, every layer
    if new_tokens is not None:  # then the step after its cache
        calls += blocks_of(CONTEXT, new_tokens.shape[1]) * mha.config.num_hidden_layers
    assert [lengths[:3] for lengths in key_lengths] == calls  # every block sees its causal prefix of the keys, no more
    head_dim = mha.config.qk_nope_head_dim + mha.config.qk_rope_head_dim
    assert {lengths[3] for lengths in key_lengths} == {head_dim}  # values padded to the keys' size: the flash kernel


@pytest.mark.parametrize("sparse", [False, True], ids=["causal", "top-k-mask"])
def test_small_mha_inputs_take_the_flash_kernel_in_float32_and_the_peers_call_in_bfloat16(checkpoint, monkeypatch,
                                                                                           sparse):  # fmt: skip
    """Small MHA-mode inputs (a short prefill, a training window): in float32 values are padded to the keys' head size
    for SDPA's flash kernel, 2.5-4x faster than the math kernel on a CPU at every size (3.2x on a 4 x 512-token window
    of the demo's model); in bfloat16 the call stays the peers' own (values of their head size), whose rounding the
    bf16 peer tests match bit for bit. Both are one call over every key; float32 gives absorbed mode's logits."""
    value_sizes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(query, key, value, **kwargs):
        value_sizes.append((query.shape[-1], value.shape[-1], query.shape[-2]))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    prompt = _tokens(2, CONTEXT, seed=5)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, attention_mode="mha", dtype=dtype,
                                                          use_sparse_attention=sparse).eval()  # fmt: skip
        value_sizes.clear()
        with torch.no_grad():
            logits[dtype] = model(prompt).logits.float()
        config = model.config
        key_dim, value_dim = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
        assert value_dim < key_dim
        expected = key_dim if dtype == torch.float32 else value_dim
        assert value_sizes == [(key_dim, expected, CONTEXT)] * config.num_hidden_layers, (dtype, value_sizes)
    absorbed = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, attention_mode="absorbed",
                                                         use_sparse_attention=sparse).eval()  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(logits[torch.float32], absorbed(prompt).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------ shapes
def _attention_shapes(monkeypatch, model, prompt: torch.Tensor, new_tokens: torch.Tensor) -> list[tuple]:
    """(op, equation, output shape) of every einsum, latent-row gather and attention softmax (its scores' shape) of one
    decode step after `prompt`, in the checkpoints' absorbed attention and the package's CPU one alike."""
    cache = _prefill(model, prompt)
    shapes = []
    from mla_dsa.modeling import modeling_mla_dsa

    original_einsum, original_gather = torch.einsum, modeling_mla_dsa.gather_rows
    original_softmax = modeling_mla_dsa.masked_softmax

    def einsum(equation, *operands):
        out = original_einsum(equation, *operands)
        shapes.append(("einsum", equation, tuple(out.shape)))
        return out

    def gather(*args, **kwargs):
        out = original_gather(*args, **kwargs)
        shapes.append(("gather", "", tuple(out.shape)))
        return out

    def softmax(scores, valid):
        shapes.append(("softmax", "", tuple(scores.shape)))
        return original_softmax(scores, valid)

    monkeypatch.setattr(torch, "einsum", einsum)
    original_gather_into = cpu_attention.gather_rows_into

    def gather_into(*args, **kwargs):  # the package's prefill gathers into a reused buffer
        out = original_gather_into(*args, **kwargs)
        shapes.append(("gather", "", tuple(out.shape)))
        return out

    monkeypatch.setattr(cpu_attention, "gather_rows_into", gather_into)
    for module in (modeling_mla_dsa, cpu_attention):
        monkeypatch.setattr(module, "gather_rows", gather)
        monkeypatch.setattr(module, "masked_softmax", softmax)
    try:
        _decode(model, new_tokens, cache)
    finally:
        monkeypatch.undo()
    return shapes


def test_sparse_decode_builds_k_wide_tensors_independent_of_context(models, monkeypatch):
    model = models["absorbed"]
    num_layers = model.config.num_hidden_layers
    row = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    new_tokens = _tokens(2, 1, seed=5)
    short = _attention_shapes(monkeypatch, model, _tokens(2, CONTEXT, seed=3), new_tokens)
    long = _attention_shapes(monkeypatch, model, _tokens(2, 3 * CONTEXT, seed=4), new_tokens)

    scores = [shape for op, _, shape in short if op == "softmax"]  # [B, H, k]: one query per sequence
    gathered = [shape for op, _, shape in short if op == "gather"]
    assert scores == [(2, model.config.num_attention_heads, TOPK)] * num_layers
    assert gathered == [(2, 1, TOPK, row)] * num_layers
    for _, _, shape in short:
        assert CONTEXT + 1 not in shape, short
    for _, _, shape in long:
        assert 3 * CONTEXT + 1 not in shape, long
    assert short == long  # nothing the sparse attention builds grows with the context


def test_dense_absorbed_shapes_do_grow_with_context(models, monkeypatch):
    """The control for the shape check: dense absorbed attention builds T-wide scores."""
    model = models["absorbed_dense"]
    new_tokens = _tokens(2, 1, seed=5)
    short = _attention_shapes(monkeypatch, model, _tokens(2, CONTEXT, seed=3), new_tokens)
    long = _attention_shapes(monkeypatch, model, _tokens(2, 3 * CONTEXT, seed=4), new_tokens)
    scores = [shape for op, equation, shape in short if op == "einsum" and equation.endswith("->bsht")]
    assert scores and all(shape[-1] == CONTEXT + 1 for shape in scores)
    assert short != long


@pytest.mark.parametrize("mode", ["absorbed", "auto"])
def test_sparse_multi_token_step_scores_are_k_wide(models, monkeypatch, mode):
    """47 queries at once over 48 keys (beyond mha_max_length=16 in auto mode): each query scores k gathered rows,
    never an S x T matrix (the package's CPU attention made to gather each query's rows: its union of a block's
    selections, below)."""
    model = models[mode]
    monkeypatch.setattr(cpu_attention, "_union_pays", lambda *arguments: False)
    prompt = _tokens(1, 2 * CONTEXT, seed=6)
    shapes = _attention_shapes(monkeypatch, model, prompt[:, :1], prompt[:, 1:])
    num_layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    row = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    queries, keys = prompt.shape[1] - 1, prompt.shape[1]
    scores = [shape for op, equation, shape in shapes if op == "einsum" and equation.endswith("->bshk")]
    gathered = [shape for op, _, shape in shapes if op == "gather"]
    assert scores == [(1, queries, heads, TOPK)] * num_layers
    assert gathered == [(1, queries, TOPK, row)] * num_layers
    for _, _, shape in shapes:
        assert keys not in shape, shapes


def test_a_prefill_blocks_union_of_rows_grows_with_k_not_with_the_context(models, monkeypatch):
    """The package's CPU attention reads a query block's union of selected rows once where that is cheaper than
    gathering each query's own, and within the gather's memory: at most min(1 + _GATHERED_ROW_COST / multiply-adds
    per row, row width / heads) x k rows, whatever the context. Random tokens on this tiny model select keys all
    over: 20-query blocks of a 48- and a 384-token prefill read unions within that bound, and the long prefill's
    blocks whose union would exceed it gather each query's rows instead."""
    model = models["absorbed"]
    config = model.config
    row = config.kv_lora_rank + config.qk_rope_head_dim
    per_row = config.num_attention_heads * (row + config.kv_lora_rank)
    bound = min(1 + cpu_attention._GATHERED_ROW_COST / per_row, row / config.num_attention_heads) * TOPK
    unions, gathers = [], []
    original_union, original_gather = cpu_attention._attend_to_union, cpu_attention.gather_rows_into

    def union(query, rows, selections, *args):
        unions.append(max(union.numel() for union, _ in selections))
        return original_union(query, rows, selections, *args)

    def gather(out, rows, indices):
        gathers.append(indices.shape[1])
        return original_gather(out, rows, indices)

    monkeypatch.setattr(cpu_attention, "_attend_to_union", union)
    monkeypatch.setattr(cpu_attention, "gather_rows_into", gather)
    monkeypatch.setattr(config, "query_chunk_size", 20)
    for context in (2 * CONTEXT, 16 * CONTEXT):
        unions.clear(), gathers.clear()
        with torch.no_grad():
            model(_tokens(1, context, seed=7), use_cache=False)
        assert unions and max(unions) <= bound < 2 * CONTEXT, (context, unions)
    assert gathers  # the long prefill's later blocks


def test_prefill_scores_only_the_causal_prefix_of_each_query_block(models, monkeypatch):
    """A long prefill scores its queries in blocks; block [start, end) needs keys [0, end) only (the rest are later
    than all of its queries). Forced into blocks of 4 queries: each block scores max(end, k) keys, and the
    selection, hence the logits, equals one block scoring every key."""
    model = models["absorbed"]
    input_ids = torch.randint(3, VOCAB, (1, CONTEXT), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids).logits
    scored, original = [], ALL_ATTENTION_FUNCTIONS[modeling_mla_dsa.INDEX_SCORES]

    def recording(queries, weights, keys, softmax_scale):
        scored.append((queries.shape[1], keys.shape[1]))
        return original(queries, weights, keys, softmax_scale)

    # registered as transformers registers (an item set on ALL_ATTENTION_FUNCTIONS would stay in its
    # local mapping after the test, over every later registration)
    monkeypatch.setitem(AttentionInterface._global_mapping, modeling_mla_dsa.INDEX_SCORES, recording)
    monkeypatch.setattr(modeling_mla_dsa, "query_block", lambda *shape: 4)
    with torch.no_grad():
        actual = model(input_ids).logits
    per_layer = [max(end, TOPK) for end in range(4, CONTEXT + 1, 4)]
    assert [keys for _, keys in scored] == per_layer * model.config.num_hidden_layers
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def _index_scores_by_definition(queries, weights, keys, softmax_scale):
    """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s] * scale), spelled out: [B, S, H, T] per head, then the sum."""
    per_head = torch.einsum("bshd,btd->bsht", queries.float(), keys.float()) * softmax_scale
    return (weights.float().unsqueeze(-1) * torch.relu(per_head)).sum(2)


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries_per_sequence", [3, 1])  # 1: a decode step
@pytest.mark.parametrize("heads_major", [True, False], ids=["avx512-form", "avx2-form"])  # a decode step's form
def test_index_scores_are_made_a_tile_of_keys_at_a_time_equal_to_the_definition(
    monkeypatch, key_dtype, queries_per_sequence, heads_major
):
    """Index scores are built a tile of keys at a time (the per-head scores of a tile stay in cache between the
    matmul, the ReLU and the head weighting), and bf16 (or FP8) keys, scored in float32 as transformers' DeepseekV32
    scores them, are upcast a tile at a time instead of the whole cache per step (on CPU a fresh buffer of a long
    cache's size page-faults). Forced into tiles of 5 keys (and, for bf16, at most 5 keys per upcast): scores and
    gradients equal the definition, computed at once in float32."""
    monkeypatch.setattr(cpu_attention, "_HEADS_MAJOR_SCORES", heads_major)
    monkeypatch.setattr(cpu_attention, "_SCORE_TILE_ELEMENTS", 2 * queries_per_sequence * 4 * 5)
    monkeypatch.setattr(cpu_attention, "_KEY_CHUNK", 5)  # bounds only the bf16 tiles
    tiles = []
    original_tile = cpu_attention._score_tile
    monkeypatch.setattr(
        cpu_attention, "_score_tile", lambda q, w, k: tiles.append(k.shape[1]) or original_tile(q, w, k)
    )
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, queries_per_sequence, 4, 8, generator=generator, requires_grad=True)
    weights = torch.randn(2, queries_per_sequence, 4, generator=generator, requires_grad=True)
    keys = torch.randn(2, 23, 8, generator=generator).to(key_dtype).requires_grad_()
    tiled = cpu_attention.cpu_index_scores(queries, weights, keys, 0.3)
    assert tiles == [5, 5, 5, 5, 3]
    plain = modeling_mla_dsa.index_scores(queries, weights, keys, 0.3)  # the checkpoints' own, training's
    expected = _index_scores_by_definition(queries, weights, keys, 0.3)
    for scores in (tiled, plain):
        assert scores.dtype == torch.float32 and scores.shape == (2, queries_per_sequence, 23)
        torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(s.square().sum(), (queries, weights, keys)) for s in (tiled, plain, expected)]
    for ours, reference in zip(grads[0] + grads[1], grads[2] + grads[2], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("device", "tiles"), [("cpu", 128), ("meta", 0)])
def test_a_gpu_scores_a_long_decode_step_in_one_tile(monkeypatch, device, tiles):
    """The score tiles are a CPU's cache size; on an accelerator (the meta device stands in: any non-CPU device) a
    16-sequence decode step over 128K bf16 keys is the checkpoints' one product, not 128 tiles (the first H200 run
    looped over 128 per layer: benchmarks/results_gpu_day.json)."""
    sizes = []
    original_tile = cpu_attention._score_tile
    monkeypatch.setattr(
        cpu_attention, "_score_tile", lambda q, w, k: sizes.append(k.shape[1]) or original_tile(q, w, k)
    )
    batch, heads, dim, keys = 16, 64, 128, 1 << 17
    queries = torch.empty(batch, 1, heads, dim, device=device)
    weights = torch.empty(batch, 1, heads, device=device)
    cached = torch.empty(batch, keys, dim, dtype=torch.bfloat16, device=device)
    if device == "cpu":  # on the CPU only the tile sizes are looked at: score none of them
        monkeypatch.setattr(cpu_attention, "_score_tile", lambda q, w, k: sizes.append(k.shape[1])
                            or q.new_empty(batch, k.shape[1], 1))  # fmt: skip
    scores = cpu_attention.cpu_index_scores(queries, weights, cached, dim**-0.5)
    assert scores.shape == (batch, 1, keys) and len(sizes) == tiles and sum(sizes) == (keys if tiles else 0)
