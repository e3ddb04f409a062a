"""MlaDsaCache / MlaDsaCacheLayer: what it holds, how it grows, and every cache operation generate() relies on.

Each operation is checked twice: on the tensors held (against the same operation applied to a plain tensor of
everything appended), and through the model (the next-token logits after the operation equal a no-cache
recomputation of the corresponding token history, with DSA selecting 4 of the keys).
"""

import pytest
import torch

import mla_dsa
from mla_dsa import MlaDsaCache, MlaDsaCacheLayer

from peers import VOCAB, peer_cache_kwarg

LATENT_DIM = 40  # kv_lora_rank 32 + qk_rope_head_dim 8 (peers' geometry)
INDEX_DIM = 32
TOPK = 4
PROMPT_LEN = 12


@pytest.fixture(scope="module")
def checkpoint(v32_topk4):
    return v32_topk4  # index_topk = TOPK


@pytest.fixture(scope="module")
def model(checkpoint):
    return mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, VOCAB, (3, PROMPT_LEN), generator=generator)


def _held(layer: MlaDsaCacheLayer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.latent[:, : layer.length], layer.index_keys[:, : layer.length]


def _rows(batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, tokens, LATENT_DIM, generator=generator),
        torch.randn(batch, tokens, INDEX_DIM, generator=generator),
    )


def _no_cache_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def _step(model, input_ids: torch.Tensor, cache: MlaDsaCache) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, cache=cache, use_cache=True).logits


# ------------------------------------------------------------------------------------------------ bytes per token
@pytest.mark.parametrize(
    ("dtype", "how"),
    [(torch.float32, "load"), (torch.bfloat16, "to"), (torch.bfloat16, "load")],
    ids=["float32", "bfloat16-to", "bfloat16-load"],
)
def test_bytes_per_token_per_layer(checkpoint, prompt, dtype, how):
    if how == "to":
        model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint).eval().to(dtype)
    else:  # loading in bf16 keeps the indexer's head weights in float32; the cache is still all bf16
        model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    config = model.config
    cache = MlaDsaCache(config)
    assert cache.bytes_per_token_per_layer() == 0 and cache.memory_bytes() == 0
    _step(model, prompt, cache)

    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = (config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim) * itemsize
    assert cache.bytes_per_token_per_layer() == expected
    for layer in cache.layers:
        assert layer.latent.dtype == dtype and layer.index_keys.dtype == dtype
        held = layer.latent.shape[-1] * layer.latent.element_size()
        held += layer.index_keys.shape[-1] * layer.index_keys.element_size()
        assert held == expected

    batch, tokens = prompt.shape
    assert cache.memory_bytes() == expected * tokens * batch * config.num_hidden_layers
    _step(model, prompt[:, :1], cache)  # one more token
    assert cache.memory_bytes() == expected * (tokens + 1) * batch * config.num_hidden_layers


def test_bytes_per_token_with_fp8_indexer_keys(checkpoint, prompt):
    """indexer_cache_dtype="fp8": index_head_dim e4m3 bytes plus one float32 scale per 128 values, per token."""
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, indexer_cache_dtype="fp8").eval()
    config = model.config
    cache = MlaDsaCache(config)
    _step(model, prompt, cache)
    scales = -(-config.index_head_dim // 128)
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * 4 + config.index_head_dim + 4 * scales
    assert cache.bytes_per_token_per_layer() == expected
    for layer in cache.layers:
        held = layer.latent.shape[-1] * layer.latent.element_size()
        held += layer.index_keys.shape[-1] * layer.index_keys.element_size()
        assert held == expected
    batch, tokens = prompt.shape
    assert cache.memory_bytes() == expected * tokens * batch * config.num_hidden_layers


# ------------------------------------------------------------------------------------------------------ growth
def test_growth_is_amortized_and_update_returns_views():
    layer = MlaDsaCacheLayer()
    steps = 300
    latent_all, index_all = _rows(2, steps, seed=3)
    reallocations, pointer = 0, None
    for t in range(steps):
        latent, index_keys = layer.update(latent_all[:, t : t + 1], index_all[:, t : t + 1])
        if pointer is not None and layer.latent.data_ptr() != pointer:
            reallocations += 1
        pointer = layer.latent.data_ptr()
        # Views of the held buffers, not a concatenation of the history.
        assert latent.data_ptr() == layer.latent.data_ptr()
        assert index_keys.data_ptr() == layer.index_keys.data_ptr()
        assert layer.get_seq_length() == t + 1
        torch.testing.assert_close(latent, latent_all[:, : t + 1], rtol=0, atol=0)
        torch.testing.assert_close(index_keys, index_all[:, : t + 1], rtol=0, atol=0)
    assert reallocations <= 8, f"{reallocations} reallocations for {steps} single-token appends"


def test_growth_with_mixed_chunks():
    layer = MlaDsaCacheLayer()
    latent_all, index_all = _rows(1, 500, seed=4)
    start = 0
    for size in (3, 90, 1, 200, 5, 1, 150, 50):
        latent, index_keys = layer.update(latent_all[:, start : start + size], index_all[:, start : start + size])
        start += size
        torch.testing.assert_close(latent, latent_all[:, :start], rtol=0, atol=0)
        torch.testing.assert_close(index_keys, index_all[:, :start], rtol=0, atol=0)
    assert layer.get_seq_length() == 500


# ------------------------------------------------------------------------------------- operations on held tensors
def _filled_cache(batch: int = 3, tokens: int = 10, layers: int = 2):
    cache = MlaDsaCache(num_hidden_layers=layers)
    refs = []
    for idx in range(layers):
        latent, index_keys = _rows(batch, tokens, seed=10 + idx)
        cache.update(latent[:, :4], index_keys[:, :4], idx)  # two appends, so the reference is a real history
        cache.update(latent[:, 4:], index_keys[:, 4:], idx)
        refs.append((latent, index_keys))
    return cache, refs


def _assert_holds(cache: MlaDsaCache, refs) -> None:
    for idx, (latent, index_keys) in enumerate(refs):
        assert cache.get_seq_length(idx) == latent.shape[1]
        held_latent, held_index = _held(cache.layers[idx])
        torch.testing.assert_close(held_latent, latent, rtol=0, atol=0)
        torch.testing.assert_close(held_index, index_keys, rtol=0, atol=0)


def _assert_appends(cache: MlaDsaCache, refs, seed: int) -> None:
    """The next update lands right after the held tokens and returns the whole history."""
    for idx, (latent, index_keys) in enumerate(refs):
        new_latent, new_index = _rows(latent.shape[0], 2, seed=seed + idx)
        got_latent, got_index = cache.update(new_latent, new_index, idx)
        torch.testing.assert_close(got_latent, torch.cat([latent, new_latent], 1), rtol=0, atol=0)
        torch.testing.assert_close(got_index, torch.cat([index_keys, new_index], 1), rtol=0, atol=0)


OPERATIONS = {
    "crop_remove_3": (lambda c: c.crop(-3), lambda t: t[:, :-3]),
    "crop_keep_5": (lambda c: c.crop(5), lambda t: t[:, :5]),
    "crop_zero_removes_nothing": (lambda c: c.crop(0), lambda t: t),  # transformers 5: crop(-n) removes n
    "crop_beyond_length": (lambda c: c.crop(25), lambda t: t),
    "crop_remove_all": (lambda c: c.crop(-25), lambda t: t[:, :0]),
    "reorder_cache": (lambda c: c.reorder_cache(torch.tensor([2, 0, 0])), lambda t: t[[2, 0, 0]]),
    "batch_select_indices": (lambda c: c.batch_select_indices(torch.tensor([2, 0])), lambda t: t[[2, 0]]),
    "batch_repeat_interleave": (lambda c: c.batch_repeat_interleave(2), lambda t: t.repeat_interleave(2, dim=0)),
}


@pytest.mark.parametrize("name", OPERATIONS)
def test_operation_matches_reference(name):
    operation, reference = OPERATIONS[name]
    cache, refs = _filled_cache()
    _assert_holds(cache, refs)
    operation(cache)
    refs = [(reference(latent), reference(index_keys)) for latent, index_keys in refs]
    _assert_holds(cache, refs)
    assert cache.get_seq_length() == refs[0][0].shape[1]
    _assert_appends(cache, refs, seed=50)


def test_reset():
    cache, refs = _filled_cache()
    cache.reset()
    assert cache.get_seq_length() == 0
    assert cache.memory_bytes() == 0 and cache.bytes_per_token_per_layer() == 0
    assert not any(layer.is_initialized for layer in cache.layers)
    # After a reset the cache starts over, with any batch size.
    empty = [(latent[:1, :0], index_keys[:1, :0]) for latent, index_keys in refs]
    _assert_appends(cache, empty, seed=60)
    assert cache.get_seq_length() == 2


def test_update_with_wrong_batch_size_raises():
    cache, _ = _filled_cache(batch=3)
    latent, index_keys = _rows(2, 1, seed=70)
    with pytest.raises(ValueError, match="batch"):
        cache.update(latent, index_keys, 0)


def test_model_with_wrong_batch_size_raises(model, prompt):
    cache = MlaDsaCache(model.config)
    _step(model, prompt, cache)
    with pytest.raises(ValueError, match="batch"):
        _step(model, prompt[:2, :1], cache)


# ------------------------------------------------------------------------------------------- through the model
def test_model_crop_negative_replays_removed_tokens(model, prompt):
    cache = MlaDsaCache(model.config)
    full = _step(model, prompt, cache)
    cache.crop(-3)
    assert cache.get_seq_length() == PROMPT_LEN - 3
    again = _step(model, prompt[:, -3:], cache)
    torch.testing.assert_close(again, full[:, -3:], atol=1e-5, rtol=0)


def test_model_crop_positive_replays_removed_tokens(model, prompt):
    cache = MlaDsaCache(model.config)
    full = _step(model, prompt, cache)
    cache.crop(5)
    assert cache.get_seq_length() == 5
    again = _step(model, prompt[:, 5:], cache)
    torch.testing.assert_close(again, full[:, 5:], atol=1e-5, rtol=0)


def test_model_crop_then_different_tokens(model, prompt):
    """Speculative-decoding rollback: rows past the crop must never be read again."""
    cache = MlaDsaCache(model.config)
    _step(model, prompt, cache)
    cache.crop(-4)
    replacement = (prompt[:, -4:] + 11) % (VOCAB - 3) + 3
    got = _step(model, replacement, cache)
    expected = _no_cache_logits(model, torch.cat([prompt[:, :-4], replacement], dim=1))[:, -4:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


BATCH_OPERATIONS = {
    "batch_select_indices": (lambda c: c.batch_select_indices(torch.tensor([2, 0])), lambda t: t[[2, 0]]),
    "batch_repeat_interleave": (lambda c: c.batch_repeat_interleave(2), lambda t: t.repeat_interleave(2, dim=0)),
    "reorder_cache": (lambda c: c.reorder_cache(torch.tensor([1, 1, 0])), lambda t: t[[1, 1, 0]]),
}


@pytest.mark.parametrize("name", BATCH_OPERATIONS)
def test_model_batch_operation_then_decode(model, prompt, name):
    operation, reference = BATCH_OPERATIONS[name]
    cache = MlaDsaCache(model.config)
    _step(model, prompt, cache)
    operation(cache)
    history = reference(prompt)
    assert cache.batch_size == history.shape[0]
    # A different next token per row, so rows that share a history still decode differently.
    next_tokens = torch.arange(history.shape[0]).unsqueeze(1) * 7 + 5
    for _ in range(2):  # two decode steps: the cache keeps working after the operation
        got = _step(model, next_tokens, cache)[:, -1]
        history = torch.cat([history, next_tokens], dim=1)
        expected = _no_cache_logits(model, history)[:, -1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        next_tokens = got.argmax(-1, keepdim=True)
    assert cache.get_seq_length() == history.shape[1]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_the_cache_holds_what_transformers_deepseek_v32_holds_where_it_holds_it(checkpoint, model, prompt, kind):
    """Our layers are transformers' indexed cache layers; `keys` holds each token's latent row [c_KV ; k_R] (the
    peer's cache splits the same row into its keys and values), `indexer_keys` the indexer keys: equal to what
    transformers' DeepseekV32 caches on the same weights, read through transformers' attribute names."""
    from transformers import DeepseekV32ForCausalLM, DynamicCache, StaticCache
    from transformers.cache_utils import DynamicIndexedLayer, StaticIndexedLayer

    peer = DeepseekV32ForCausalLM.from_pretrained(checkpoint).eval()
    peer_cache = DynamicCache(config=peer.config)
    if kind == "dynamic":
        ours = DynamicCache(config=model.config)
    else:
        ours = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        peer(prompt, **peer_cache_kwarg(peer_cache), use_cache=True)
        model(prompt, cache=ours, use_cache=True)
    rank = model.config.kv_lora_rank
    for mine, theirs in zip(ours.layers, peer_cache.layers, strict=True):
        assert isinstance(mine, DynamicIndexedLayer if kind == "dynamic" else StaticIndexedLayer)
        keys, indexer_keys = mine.keys[:, :, :PROMPT_LEN], mine.indexer_keys[:, :PROMPT_LEN]
        assert keys.shape == (prompt.shape[0], 1, PROMPT_LEN, LATENT_DIM) and mine.values.shape[-1] == 0
        torch.testing.assert_close(keys[..., :rank], theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys[..., rank:], theirs.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(indexer_keys, theirs.indexer_keys, atol=1e-5, rtol=1e-5)
    if kind == "dynamic":  # the views follow the layer through crop and reset
        ours.crop(PROMPT_LEN - 3)
        assert all(layer.keys.shape[2] == layer.indexer_keys.shape[1] == PROMPT_LEN - 3 for layer in ours.layers)
        ours.reset()
        assert all(layer.keys is None and layer.indexer_keys is None for layer in ours.layers)
