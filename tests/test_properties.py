"""Property-based tests (hypothesis): random cache operation sequences and random padding layouts.

After every operation on an `MlaDsaCache`, the cached model's next-token logits equal a no-cache recomputation on the
equivalent token history. Batched, left-padded inputs of any layout (even a row that is all padding) give no NaN and
the same logits as each row run alone.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mla_dsa

from peers import VOCAB, save_peer

ATOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32")
    save_peer("deepseek_v32", path, index_topk=4, num_hidden_layers=2)
    return mla_dsa.MlaDsaForCausalLM.from_pretrained(path).eval()


def no_cache_last_logits(model, histories: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(histories), use_cache=False).logits[:, -1]


operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 4)),
    st.tuples(st.just("crop"), st.integers(-4, 6)),
    st.tuples(st.just("reorder"), st.randoms(use_true_random=False)),
    st.tuples(st.just("select"), st.randoms(use_true_random=False)),
    st.tuples(st.just("repeat"), st.integers(1, 2)),
    st.tuples(st.just("reset"), st.integers(1, 3)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(operation, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_cache_operations_match_recomputation(model, operations, seed):
    generator = torch.Generator().manual_seed(seed)

    def tokens(rows: int, count: int) -> list[list[int]]:
        return torch.randint(3, VOCAB, (rows, count), generator=generator).tolist()

    cache = mla_dsa.MlaDsaCache(model.config)
    histories = tokens(2, 3)
    with torch.no_grad():
        model(torch.tensor(histories), cache=cache, use_cache=True)
    for name, arg in operations:
        if name == "append":
            new = tokens(len(histories), arg)
            histories = [h + n for h, n in zip(histories, new, strict=True)]
            with torch.no_grad():
                model(torch.tensor(new), cache=cache, use_cache=True)
        elif name == "crop":
            length = len(histories[0])
            keep = length + arg if arg < 0 else arg
            keep = max(0, min(length, keep))
            if keep == 0:
                continue  # an empty history has no next token to compare
            cache.crop(arg)
            histories = [h[:keep] for h in histories]
        elif name in ("reorder", "select"):
            rows = len(histories)
            if name == "reorder":
                order = list(range(rows))
                arg.shuffle(order)
                cache.reorder_cache(torch.tensor(order))
            else:
                order = sorted(arg.sample(range(rows), arg.randint(1, rows)))
                cache.batch_select_indices(torch.tensor(order))
            histories = [histories[i] for i in order]
        elif name == "repeat":
            cache.batch_repeat_interleave(arg)
            histories = [h for h in histories for _ in range(arg)]
        elif name == "reset":
            cache.reset()
            histories = tokens(arg, 2)
            with torch.no_grad():
                model(torch.tensor(histories), cache=cache, use_cache=True)
        assert cache.get_seq_length() == len(histories[0])
        step = tokens(len(histories), 1)
        with torch.no_grad():
            cached = model(torch.tensor(step), cache=cache, use_cache=True).logits[:, -1]
        histories = [h + s for h, s in zip(histories, step, strict=True)]
        expected = no_cache_last_logits(model, histories)
        torch.testing.assert_close(cached, expected, atol=ATOL, rtol=0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.integers(1, 4).flatmap(
        lambda rows: st.integers(3, 14).flatmap(
            lambda length: st.tuples(st.just(length), st.lists(st.integers(0, length), min_size=rows, max_size=rows))
        )
    ),
    mode=st.sampled_from(["mha", "absorbed"]),
    seed=st.integers(0, 2**16),
)
def test_padding_layouts_match_unbatched_rows(model, layout, mode, seed):
    length, pads = layout
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (len(pads), length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate(pads):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    model.config.attention_mode = mode
    try:
        with torch.no_grad():
            batched = model(input_ids, attention_mask=attention_mask, position_ids=positions).logits
            assert torch.isfinite(batched).all()
            for row, pad in enumerate(pads):
                if pad == length:
                    continue  # all padding: nothing to compare, only no NaN
                alone = model(input_ids[row : row + 1, pad:]).logits[0]
                torch.testing.assert_close(batched[row, pad:], alone, atol=ATOL, rtol=0)
    finally:
        model.config.attention_mode = "auto"


def test_padding_is_never_selected(model):
    """Every selected key a query may attend to is a real, non-future token."""
    from mla_dsa.modeling import modeling_mla_dsa

    recorded = []
    original = modeling_mla_dsa.select_topk

    def recording(scores, valid, k):
        indices, selected_valid = original(scores, valid, k)
        recorded.append((indices, selected_valid, valid))
        return indices, selected_valid

    input_ids = torch.randint(3, VOCAB, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0
    attention_mask[2, :9] = 0
    modeling_mla_dsa.select_topk = recording
    try:
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask)
    finally:
        modeling_mla_dsa.select_topk = original
    assert recorded
    for indices, selected_valid, valid in recorded:
        is_real = attention_mask.bool()[:, None, :].expand_as(valid).gather(-1, indices)
        assert not (selected_valid & ~is_real).any()  # nothing usable points at padding
        torch.testing.assert_close(selected_valid, valid.gather(-1, indices))
