"""Correctness is proven against peers: transformers' own DeepseekV2/V3/V32ForCausalLM with the same weights.

A peer writes its checkpoint with `save_pretrained`; `MlaDsaForCausalLM.from_pretrained` reads it. With left-padded
batches the logits must agree within 1e-4 (fp32) at every real position, in one full forward, in a chunked prefill on
our cache, and at every step of cached token-by-token decoding, in each attention mode. Our logits must be finite
everywhere, padded positions included. The DSA part is checked on its own too: padding and future keys are never
selected, the selection changes the output, and `index_topk` >= the context is exactly dense MLA.
"""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM, DynamicCache

import mla_dsa
from mla_dsa.modeling import modeling_mla_dsa
from mla_dsa.modeling.modeling_mla_dsa import VisibleKeys, select_topk

from peers import VOCAB, build_peer, left_padded_batch, peer_cache_kwarg, positions_from_mask, save_peer, v3_config

ATOL = 1e-4
PROMPT_LEN = 20  # > (qk_nope_head_dim + v_head_dim) / 2 = 16, so "auto" prefills with MHA and decodes absorbed
DECODE_STEPS = 6
MODES = ("mha", "absorbed", "auto")
DSA_TOPK = 5

YARN = dict(
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    rope_theta=10000.0,
)

# Every case is built with the same seed: cases of one model type share their weights (test_case_exercises_its_feature).
CASES = {
    "v3": ("deepseek_v3", {}),  # index_topk defaults to 2048: everything is selected
    "v3_yarn": ("deepseek_v3", YARN),
    "v3_half_split_rope": ("deepseek_v3", {"rope_interleave": False}),
    "v2_greedy": ("deepseek_v2", {}),
    # top-3 experts from the 2 best of 4 groups: with num_experts_per_tok <= topk_group the group limit never bites.
    "v2_group_limited": (
        "deepseek_v2",
        {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    ),
    "v32_dsa": ("deepseek_v32", {"index_topk": DSA_TOPK}),
    "v32_dsa_yarn": ("deepseek_v32", {"index_topk": DSA_TOPK, **YARN}),
    # Dense through the prefill (20 keys <= 22), sparse from the third decoding step on.
    "v32_topk_crossed_while_decoding": ("deepseek_v32", {"index_topk": PROMPT_LEN + 2}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class Checkpoints:
    """Peers written once per module; a fresh `MlaDsaForCausalLM` per request, so config edits never leak."""

    def __init__(self, tmp_path_factory):
        self._factory = tmp_path_factory
        self._saved: dict[str, tuple[torch.nn.Module, object]] = {}

    def peer(self, case: str) -> torch.nn.Module:
        return self._save(case)[0]

    def directory(self, case: str):
        return self._save(case)[1]

    def ours(self, case: str, **config_values) -> mla_dsa.MlaDsaForCausalLM:
        model = mla_dsa.MlaDsaForCausalLM.from_pretrained(self.directory(case)).eval()
        for name, value in config_values.items():
            setattr(model.config, name, value)
        return model

    def _save(self, case: str):
        if case not in self._saved:
            model_type, overrides = CASES[case]
            directory = self._factory.mktemp(case)
            self._saved[case] = (save_peer(model_type, directory, **overrides), directory)
        return self._saved[case]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return Checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch(batch_size=3, seq_len=PROMPT_LEN)


def assert_real_close(actual, expected, mask, atol=ATOL):
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=atol, rtol=0)


def assert_finite(logits):
    assert torch.isfinite(logits).all(), "our logits contain NaN/inf (padded positions included)"


# ------------------------------------------------------------------------------------------------ the cases


@pytest.mark.parametrize(
    "case, baseline_overrides",
    [
        ("v3_yarn", {}),
        ("v3_half_split_rope", {}),
        ("v2_group_limited", {"num_experts_per_tok": 3}),  # plain greedy top-3
        ("v32_dsa_yarn", {"index_topk": DSA_TOPK}),
    ],
)
def test_case_exercises_its_feature(checkpoints, batch, case, baseline_overrides):
    """Same weights, the case's feature turned off: the peers' logits differ, so matching the case means something."""
    peer = checkpoints.peer(case)
    baseline = build_peer(CASES[case][0], **baseline_overrides)
    baseline_state = baseline.state_dict()
    for name, tensor in peer.state_dict().items():
        assert torch.equal(tensor, baseline_state[name]), name
    input_ids, attention_mask = batch
    with torch.no_grad():
        expected = peer(input_ids, attention_mask=attention_mask).logits
        without_feature = baseline(input_ids, attention_mask=attention_mask).logits
    assert (expected - without_feature)[attention_mask.bool()].abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- full forward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_full_forward_matches_peer(checkpoints, batch, case, mode):
    input_ids, attention_mask = batch
    peer, ours = checkpoints.peer(case), checkpoints.ours(case, attention_mode=mode)
    with torch.no_grad():
        expected = peer(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask).logits
    assert_finite(actual)
    assert_real_close(actual, expected, attention_mask)


# -------------------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_matches_peer(checkpoints, batch, case, mode):
    """Prefill on each model's own cache, then DECODE_STEPS tokens one at a time; logits compared at every step."""
    input_ids, attention_mask = batch
    peer, ours = checkpoints.peer(case), checkpoints.ours(case, attention_mode=mode)
    peer_cache, our_cache = DynamicCache(config=peer.config), mla_dsa.MlaDsaCache(ours.config)
    positions = positions_from_mask(attention_mask)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        expected = peer(input_ids, attention_mask=attention_mask, position_ids=positions,
                        **peer_cache_kwarg(peer_cache), use_cache=True).logits  # fmt: skip
        actual = ours(input_ids, attention_mask=attention_mask, position_ids=positions,
                      cache=our_cache, use_cache=True).logits  # fmt: skip
        assert_finite(actual)
        assert_real_close(actual, expected, attention_mask)
        mask, position = attention_mask, positions[:, -1:]
        for step in range(DECODE_STEPS):
            token = torch.randint(3, VOCAB, (input_ids.shape[0], 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            expected = peer(token, attention_mask=mask, position_ids=position,
                            **peer_cache_kwarg(peer_cache), use_cache=True).logits  # fmt: skip
            actual = ours(token, attention_mask=mask, position_ids=position,
                          cache=our_cache, use_cache=True).logits  # fmt: skip
            assert_finite(actual)
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")
    assert our_cache.get_seq_length() == PROMPT_LEN + DECODE_STEPS


# -------------------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("split", [7, 17], ids=["7+13", "17+3"])  # 7: row 2's first chunk is all padding
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["v3", "v2_greedy", "v32_dsa"])
def test_chunked_prefill_matches_full_forward_and_peer(checkpoints, batch, case, mode, split):
    input_ids, attention_mask = batch
    peer, ours = checkpoints.peer(case), checkpoints.ours(case, attention_mode=mode)
    positions = positions_from_mask(attention_mask)
    cache = mla_dsa.MlaDsaCache(ours.config)
    with torch.no_grad():
        first = ours(input_ids[:, :split], attention_mask=attention_mask[:, :split], position_ids=positions[:, :split],
                     cache=cache, use_cache=True).logits  # fmt: skip
        second = ours(input_ids[:, split:], attention_mask=attention_mask, position_ids=positions[:, split:],
                      cache=cache, use_cache=True).logits  # fmt: skip
        chunked = torch.cat([first, second], dim=1)
        full = ours(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
        expected = peer(input_ids, attention_mask=attention_mask, position_ids=positions).logits
    assert cache.get_seq_length() == PROMPT_LEN
    assert_finite(chunked)
    assert_real_close(chunked, full, attention_mask, atol=1e-5)
    assert_real_close(chunked, expected, attention_mask)


# ---------------------------------------------------------------------------- the indexer's top-k selection


def _real_keys(attention_mask: torch.Tensor, past_len: int, start: int, end: int) -> torch.Tensor:
    """[B, end - start, T] bool: key j is a real token at or before the query's cache position (built here, from the
    test's own attention mask, not from the model's layout)."""
    num_keys = attention_mask.shape[1]
    query_pos = torch.arange(past_len + start, past_len + end)
    causal = torch.arange(num_keys)[None, :] <= query_pos[:, None]
    return causal[None] & attention_mask.bool()[:, None, :]


def _check_selection(indices, selected_valid, real, k):
    """`selected_valid` is False exactly at padding / future indices, and no real key lost its place to them."""
    assert indices.shape[-1] == min(k, real.shape[-1])
    expected_valid = real.gather(-1, indices.long())
    assert torch.equal(selected_valid, expected_valid), "selected_valid disagrees with padding/causality"
    assert torch.equal(selected_valid.sum(-1), real.sum(-1).clamp(max=k)), "a real key lost its place to padding"


def test_select_topk_never_selects_padding_or_future():
    """Padding and future keys get the highest scores; none may be selected as valid, and every query keeps
    exactly its top-min(k, #real) real keys."""
    generator = torch.Generator().manual_seed(3)
    _, attention_mask = left_padded_batch(batch_size=3, seq_len=PROMPT_LEN)
    past_len, num_queries, k = 4, PROMPT_LEN - 4, DSA_TOPK
    real = _real_keys(attention_mask, past_len, 0, num_queries)
    scores = torch.randn(3, num_queries, PROMPT_LEN, generator=generator)
    scores = torch.where(real, scores, 100.0 + scores)  # distinct scores, invalid ones always the largest
    visible = VisibleKeys(past_len, PROMPT_LEN, attention_mask.bool(), torch.device("cpu"))
    valid = visible.mask(0, num_queries).expand(3, -1, -1)
    assert torch.equal(valid, real)
    indices, selected_valid = select_topk(scores, valid, k)
    _check_selection(indices, selected_valid, real, k)
    reference = scores.masked_fill(~real, float("-inf"))
    for b in range(3):
        for q in range(num_queries):
            n_real = int(real[b, q].sum())
            chosen = set(indices[b, q][selected_valid[b, q]].tolist())
            assert chosen == set(reference[b, q].topk(min(k, n_real)).indices.tolist()), (b, q)


@pytest.mark.parametrize("mode", ["mha", "absorbed"])
def test_model_never_selects_padding(checkpoints, batch, monkeypatch, mode):
    """Every top-k the model computes (prefill and decoding, left-padded batch) is checked against the test's mask."""
    input_ids, attention_mask = batch
    ours = checkpoints.ours("v32_dsa", attention_mode=mode)
    calls = []
    original_forward = modeling_mla_dsa.MlaDsaIndexer.forward

    def recording_forward(self, hidden_states, *args, **kwargs):
        selection = original_forward(self, hidden_states, *args, **kwargs)
        calls.append((0, hidden_states.shape[1], selection.indices, selection.valid))
        return selection

    monkeypatch.setattr(modeling_mla_dsa.MlaDsaIndexer, "forward", recording_forward)
    cache = mla_dsa.MlaDsaCache(ours.config)
    positions = positions_from_mask(attention_mask)
    mask, past_len, new_ids, new_positions = attention_mask, 0, input_ids, positions
    checked = 0
    with torch.no_grad():
        for _ in range(4):  # the prefill, then three decoding steps
            calls.clear()
            logits = ours(new_ids, attention_mask=mask, position_ids=new_positions, cache=cache).logits
            assert_finite(logits)
            covered = sum(end - start for start, end, _, _ in calls)
            assert covered >= ours.config.num_hidden_layers * new_ids.shape[1], "a layer's selection went unobserved"
            for start, end, indices, selected_valid in calls:
                _check_selection(indices, selected_valid, _real_keys(mask, past_len, start, end), DSA_TOPK)
                checked += indices.numel()
            past_len += new_ids.shape[1]
            new_ids = torch.full((3, 1), 5)
            new_positions = new_positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert checked > 0


@pytest.mark.parametrize("mode", MODES)
def test_padding_content_is_irrelevant(checkpoints, batch, mode):
    """Changing the token ids under padding changes nothing at real positions: padding is never selected nor
    attended to (the indexer's scores of those keys change, so selecting one would show)."""
    input_ids, attention_mask = batch
    ours = checkpoints.ours("v32_dsa", attention_mode=mode)
    noisy = torch.where(attention_mask.bool(), input_ids, torch.randint(3, VOCAB, input_ids.shape))
    assert not torch.equal(noisy, input_ids)
    with torch.no_grad():
        clean_logits = ours(input_ids, attention_mask=attention_mask).logits
        noisy_logits = ours(noisy, attention_mask=attention_mask).logits
    assert_finite(noisy_logits)
    assert_real_close(noisy_logits, clean_logits, attention_mask, atol=1e-5)


# --------------------------------------------------------------------------------- DSA against dense MLA


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["v32_dsa", "v32_dsa_yarn"])
def test_dsa_selection_matters_and_dense_equals_deepseek_v3(checkpoints, batch, case, mode):
    """With index_topk < the context, turning DSA off changes the logits; DSA off is transformers' dense V3."""
    input_ids, attention_mask = batch
    sparse = checkpoints.ours(case, attention_mode=mode)
    dense = checkpoints.ours(case, attention_mode=mode, use_sparse_attention=False)
    assert sparse.config.index_topk < PROMPT_LEN
    overrides = {k: v for k, v in CASES[case][1].items() if k != "index_topk"}
    deepseek_v3, info = DeepseekV3ForCausalLM.from_pretrained(
        checkpoints.directory(case), config=v3_config(**overrides), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(".indexer." in key for key in info["unexpected_keys"])
    with torch.no_grad():
        sparse_logits = sparse(input_ids, attention_mask=attention_mask).logits
        dense_logits = dense(input_ids, attention_mask=attention_mask).logits
        v3_logits = deepseek_v3.eval()(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (sparse_logits[real] - dense_logits[real]).abs().max() > 1e-3
    assert_finite(dense_logits)
    assert_real_close(dense_logits, v3_logits, attention_mask)


@pytest.mark.parametrize("mode", MODES)
def test_index_topk_at_least_the_context_is_exactly_dense(checkpoints, batch, mode):
    input_ids, attention_mask = batch
    with torch.no_grad():
        dense = checkpoints.ours("v32_dsa", attention_mode=mode, use_sparse_attention=False)
        expected = dense(input_ids, attention_mask=attention_mask).logits
        for index_topk in (PROMPT_LEN, 2048):
            ours = checkpoints.ours("v32_dsa", attention_mode=mode, index_topk=index_topk)
            assert torch.equal(ours(input_ids, attention_mask=attention_mask).logits, expected), index_topk


@pytest.mark.parametrize("mode", MODES)
def test_sparse_path_selecting_every_real_key_is_dense(checkpoints, batch, mode):
    """The padded rows only (15 and 10 real tokens of 20): index_topk=15 takes the sparse path (15 < 20 keys), but
    every query then selects all its real keys plus padding/future indices, which must be masked out: dense
    logits. index_topk=14 drops a real key of the longest row, and the output must change."""
    input_ids, attention_mask = (t[1:] for t in batch)
    longest = int(attention_mask.sum(-1).max())
    assert longest < PROMPT_LEN
    with torch.no_grad():
        dense = checkpoints.ours("v32_dsa", attention_mode=mode, use_sparse_attention=False)
        expected = dense(input_ids, attention_mask=attention_mask).logits
        all_real = checkpoints.ours("v32_dsa", attention_mode=mode, index_topk=longest)
        actual = all_real(input_ids, attention_mask=attention_mask).logits
        one_short = checkpoints.ours("v32_dsa", attention_mode=mode, index_topk=longest - 1)
        dropped = one_short(input_ids, attention_mask=attention_mask).logits
    assert_finite(actual)
    real = attention_mask.bool()
    # Same keys, same weights: only float summation order may differ (absorbed mode gathers the selected rows).
    torch.testing.assert_close(actual[real], expected[real], atol=1e-6, rtol=1e-6)
    assert (dropped[real] - expected[real]).abs().max() > 1e-3
