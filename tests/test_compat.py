"""The `compat` subset: what must hold on every transformers release we claim, oldest (CI's second environment)
to newest. Run it alone with `pytest -m compat`.

References are transformers' own DeepseekV3 / DeepseekV32 on the same weights, through their eager path: one
unpadded row at a time, no cache. The older releases' DeepseekV32 gives wrong tokens for batched inputs (5.14: rows
of a left-padded batch, cached or not; 5.16: bool padding masks), which their unbatched, uncached forward does not;
on the newest release the two agree, and the batched comparison lives in test_generate.py.
"""

import warnings

import pytest
import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

import mla_dsa
from mla_dsa.loading import loading_kwargs
from mla_dsa.modeling.modeling_mla_dsa import CACHE_NAME, DEPRECATED_CACHE_NAME

from peers import left_padded_batch, save_peer, save_peers

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

PROMPT_LEN = 12
NEW_TOKENS = 8
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
# deepseek_v32 with index_topk 5 < every context: DSA selects from the prefill on.
PEERS = {"deepseek_v3": {}, "deepseek_v32": {"index_topk": 5}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{model_type: (peer, directory)}."""
    return save_peers(tmp_path_factory, PEERS)


@pytest.fixture(scope="module")
def models(saved):
    """{model_type: (peer, ours)}."""
    load = mla_dsa.MlaDsaForCausalLM.from_pretrained
    return {name: (peer, load(path).eval()) for name, (peer, path) in saved.items()}


@pytest.fixture(scope="module")
def prompt():
    return left_padded_batch(batch_size=3, seq_len=PROMPT_LEN)


def rows(input_ids, attention_mask):
    """Each row without its left padding, [1, real tokens]."""
    return [ids[mask.bool()].unsqueeze(0) for ids, mask in zip(input_ids, attention_mask, strict=True)]


def peer_eager(peer, row, **kwargs) -> torch.Tensor:
    """The peer's own generate on one unpadded row without a cache: the new tokens."""
    with torch.no_grad():
        return peer.generate(row, use_cache=False, **kwargs)[:, row.shape[1] :]


def ours_new_tokens(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, **kwargs)[:, input_ids.shape[1] :]


@pytest.fixture(scope="module")
def peer_greedy(models, prompt):
    """{model_type: [new tokens of each row]} from the peer's eager path."""
    return {name: [peer_eager(peer, row, **GREEDY) for row in rows(*prompt)] for name, (peer, _) in models.items()}


# ------------------------------------------------------------------------------------------ forward, cache


@pytest.mark.parametrize("model_type", list(PEERS))
def test_forward_equals_peer(models, prompt, model_type):
    peer, ours = models[model_type]
    input_ids, attention_mask = prompt
    with torch.no_grad():
        batched = ours(input_ids, attention_mask=attention_mask).logits
        for index, row in enumerate(rows(input_ids, attention_mask)):
            expected = peer(row).logits[0]
            torch.testing.assert_close(batched[index, -row.shape[1] :], expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours(row).logits[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", list(PEERS))
def test_cached_decode_equals_full_forward(models, prompt, model_type):
    _, ours = models[model_type]
    input_ids, attention_mask = prompt
    full_ids = torch.cat([input_ids, torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(2))], 1)
    full_mask = torch.cat([attention_mask, torch.ones(3, 5, dtype=attention_mask.dtype)], 1)
    cache = mla_dsa.MlaDsaCache(ours.config)
    with torch.no_grad():
        full = ours(full_ids, attention_mask=full_mask).logits
        steps = [ours(input_ids, attention_mask=attention_mask, cache=cache).logits[:, -1]]
        for step in range(PROMPT_LEN, full_ids.shape[1] - 1):
            out = ours(full_ids[:, step : step + 1], attention_mask=full_mask[:, : step + 1], cache=cache)
            steps.append(out.logits[:, -1])
    real = full_mask[:, PROMPT_LEN - 1 : -1].bool()
    torch.testing.assert_close(torch.stack(steps, 1)[real], full[:, PROMPT_LEN - 1 : -1][real], atol=1e-4, rtol=0)
    assert cache.get_seq_length() == full_ids.shape[1] - 1


def test_forward_takes_the_cache_under_both_names(models, prompt):
    """`cache` on every release; `past_key_values` too, with a FutureWarning where transformers deprecated it
    (5.24+), as its own models do. The output carries the cache where that release reads it."""
    _, ours = models["deepseek_v32"]
    input_ids, attention_mask = prompt
    new, old = mla_dsa.MlaDsaCache(ours.config), mla_dsa.MlaDsaCache(ours.config)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_new = ours(input_ids, attention_mask=attention_mask, cache=new)
        assert not [w for w in caught if "past_key_values" in str(w.message)]
        by_old = ours(input_ids, attention_mask=attention_mask, past_key_values=old)
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    assert len(deprecations) == (1 if DEPRECATED_CACHE_NAME else 0), [str(w.message) for w in caught]
    torch.testing.assert_close(by_new.logits, by_old.logits, atol=0, rtol=0)
    assert getattr(by_new, CACHE_NAME) is new and getattr(by_old, CACHE_NAME) is old
    assert by_new.past_key_values is new  # the field before 5.24, transformers' alias of `cache` from 5.24
    assert new.get_seq_length() == old.get_seq_length() == PROMPT_LEN
    with pytest.raises(ValueError, match="both"):
        ours(input_ids, cache=new, past_key_values=old)


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("model_type", list(PEERS))
def test_greedy_left_padded_batch_equals_peer(models, prompt, peer_greedy, model_type, use_cache):
    _, ours = models[model_type]
    tokens = ours_new_tokens(ours, *prompt, use_cache=use_cache, **GREEDY)
    for index, expected in enumerate(peer_greedy[model_type]):
        assert torch.equal(tokens[index : index + 1], expected), (index, tokens[index].tolist(), expected.tolist())


@pytest.mark.parametrize("model_type", list(PEERS))
def test_seeded_sampling_equals_peer(models, prompt, model_type):
    peer, ours = models[model_type]
    row = rows(*prompt)[1]
    sample = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20, temperature=1.3)
    torch.manual_seed(7)
    expected = peer_eager(peer, row, **sample)
    results = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        results.append(ours_new_tokens(ours, row, use_cache=use_cache, **sample))
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected), (results, expected)
    assert not torch.equal(expected, peer_eager(peer, row, **GREEDY))  # it really samples


@pytest.mark.parametrize("model_type", list(PEERS))
def test_beam_search_equals_peer(models, prompt, model_type):
    peer, ours = models[model_type]
    row = rows(*prompt)[0]
    beam = dict(num_beams=3, num_return_sequences=2, **GREEDY)
    expected = peer_eager(peer, row, **beam)
    tokens = ours_new_tokens(ours, row, **beam)
    assert tokens.shape[0] == 2
    assert torch.equal(tokens, expected), (tokens.tolist(), expected.tolist())


@pytest.fixture(scope="module")
def other_assistant(tmp_path_factory):
    """Other weights, same geometry: many drafts are rejected and cropped off the main model's cache."""
    directory = tmp_path_factory.mktemp("assistant")
    save_peer("deepseek_v32", directory, seed=5, index_topk=5)
    return mla_dsa.MlaDsaForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("row_index", [0, 2])
def test_assisted_and_prompt_lookup_decoding_equal_peer(models, prompt, peer_greedy, other_assistant, row_index):
    """Both verify several drafted tokens per forward on our cache and crop the rejected ones (batch 1)."""
    _, ours = models["deepseek_v32"]
    row = rows(*prompt)[row_index]
    expected = peer_greedy["deepseek_v32"][row_index]
    assisted = ours_new_tokens(ours, row, assistant_model=other_assistant, **GREEDY)
    lookup = ours_new_tokens(ours, row, prompt_lookup_num_tokens=3, **GREEDY)
    assert torch.equal(assisted, expected), (assisted.tolist(), expected.tolist())
    assert torch.equal(lookup, expected), (lookup.tolist(), expected.tolist())


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1))

    def end(self):
        self.ended = True


def test_streamer_gets_every_token(models, prompt, peer_greedy):
    _, ours = models["deepseek_v32"]
    row = rows(*prompt)[0]
    streamer = _Collect()
    tokens = ours_new_tokens(ours, row, streamer=streamer, **GREEDY)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks), torch.cat([row[0], tokens[0]]))
    assert torch.equal(tokens, peer_greedy["deepseek_v32"][0])


def test_return_dict_and_a_user_cache(models, prompt, peer_greedy):
    """`return_dict_in_generate` hands back the cache (our layers, every token but the last); a cache the user
    passes - MlaDsaCache(config) or DynamicCache(config=config) - is the one filled, and decoding is unchanged."""
    _, ours = models["deepseek_v32"]
    input_ids, attention_mask = prompt
    with torch.no_grad():
        out = ours.generate(input_ids, attention_mask=attention_mask, return_dict_in_generate=True,
                            output_scores=True, **GREEDY)  # fmt: skip
    returned = getattr(out, CACHE_NAME)
    assert all(isinstance(layer, mla_dsa.MlaDsaCacheLayer) for layer in returned.layers)
    assert returned.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1 and len(out.scores) == NEW_TOKENS
    for index, expected in enumerate(peer_greedy["deepseek_v32"]):
        assert torch.equal(out.sequences[index : index + 1, PROMPT_LEN:], expected)
    for cache in (mla_dsa.MlaDsaCache(ours.config), DynamicCache(config=ours.config)):
        tokens = ours_new_tokens(ours, input_ids, attention_mask, **{CACHE_NAME: cache}, **GREEDY)
        assert torch.equal(tokens, out.sequences[:, PROMPT_LEN:])
        assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1


def test_generate_raises_no_deprecation_warning(models, prompt, other_assistant):
    """Our code uses each release's own cache name: no FutureWarning/DeprecationWarning about it from any strategy."""
    _, ours = models["deepseek_v32"]
    input_ids, attention_mask = prompt
    row = rows(input_ids, attention_mask)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours_new_tokens(ours, input_ids, attention_mask, **GREEDY)
        with torch.no_grad():
            ours.generate(input_ids, attention_mask=attention_mask, return_dict_in_generate=True, **GREEDY)
        ours_new_tokens(ours, row, num_beams=2, **GREEDY)
        ours_new_tokens(ours, row, assistant_model=other_assistant, **GREEDY)
        ours_new_tokens(ours, row, prompt_lookup_num_tokens=3, **GREEDY)
        ours_new_tokens(ours, row, **{CACHE_NAME: mla_dsa.MlaDsaCache(ours.config)}, **GREEDY)
    about_cache = [
        str(w.message) for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
        and any(word in str(w.message) for word in ("past_key_values", "cache"))
    ]  # fmt: skip
    assert not about_cache, about_cache


@pytest.mark.parametrize("implementation", ["quantized", "hybrid"])
def test_a_per_head_cache_implementation_is_one_clear_error(models, prompt, implementation):
    _, ours = models["deepseek_v32"]
    with pytest.raises(ValueError, match="cache_implementation"):
        ours.generate(prompt[0], attention_mask=prompt[1], cache_implementation=implementation, **GREEDY)


def test_continuous_batching_is_one_clear_error(models):
    """transformers' `generate_batch` (and `generate(cache_implementation="paged")`) would build its paged cache of
    per-head keys and fail inside it on our layer type."""
    _, ours = models["deepseek_v32"]
    with pytest.raises(NotImplementedError, match="continuous batching"):
        ours.generate_batch(inputs=[[5, 6, 7]], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False))
    with pytest.raises(ValueError, match="cache_implementation"):
        ours.generate(torch.tensor([[5, 6, 7]]), cache_implementation="paged", max_new_tokens=2)


def test_loading_asks_for_hub_kernels_only_where_the_package_is_there():
    assert loading_kwargs({"dtype": torch.float32}, installed=False) == {"dtype": torch.float32,
                                                                                  "use_kernels": False}  # fmt: skip
    assert loading_kwargs({}, installed=True) == {}
    assert loading_kwargs({"use_kernels": True}, installed=False) == {"use_kernels": True}  # the user's own
    assert loading_kwargs({"kernel_config": "x"}, installed=False) == {"kernel_config": "x"}


def test_loads_without_the_kernels_package_or_the_variable(saved, models, prompt, monkeypatch):
    """transformers 5.25 kernelizes by default and, without the `kernels` package, refuses to load any model;
    the package's loading (`mla_dsa.load_checkpoint`, its commands') loads ours as on older releases."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    monkeypatch.setattr(mla_dsa.loading, "kernels_installed", lambda: False)
    model = mla_dsa.load_checkpoint(saved["deepseek_v32"][1]).eval()
    assert not getattr(model, "use_kernels", False)
    input_ids = prompt[0][:, -4:]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, models["deepseek_v32"][1](input_ids).logits)
