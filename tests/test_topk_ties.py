"""Top-k among tied index scores is decided by the keys' positions alone (the later key first), so it is the same in
every layout: a prompt alone or left-padded in a batch, a growing or a static cache, a full forward or cached decoding.
With one indexer head, every key whose ReLU is zero scores exactly 0.0, and such ties sit at the top-k boundary;
`topk` alone broke them by where a key sat in the tensor, which padding and static slots shift."""

import torch

from mla_dsa import MlaDsaConfig, MlaDsaForCausalLM
from mla_dsa.modeling.modeling_mla_dsa import _ranking, index_scores, select_topk

from peers import VOCAB

CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              first_k_dense_replace=2, index_n_heads=1, index_head_dim=16, index_topk=4,
              max_position_embeddings=512, pad_token_id=0)  # fmt: skip


def _model() -> MlaDsaForCausalLM:
    torch.manual_seed(0)
    return MlaDsaForCausalLM(MlaDsaConfig(**CONFIG)).eval()


def test_tied_scores_select_the_latest_keys_in_any_layout():
    scores = torch.tensor([[0.0, 2.0, 0.0, 0.0, -1.0, 0.0]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    indices, _ = select_topk(scores[None], valid[None], 3)
    assert indices.tolist() == [[[1, 5, 3]]]  # 2.0, then the two latest zeros
    padded = torch.cat([torch.full((1, 3), 7.0), scores], dim=-1)  # three padding slots in front, scoring high
    padded_valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), valid], dim=-1)
    indices, _ = select_topk(padded[None], padded_valid[None], 3)
    assert (indices - 3).tolist() == [[[1, 5, 3]]]


def test_the_ranking_orders_by_score_then_by_position():
    """`_ranking`'s integers sort as (score, position) pairs do, over every kind of float32: both zeros as equals,
    infinities, the smallest subnormals, the largest finite values; on a 2-D block each row on its own."""
    special = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38, 0.5, -0.5]
    torch.manual_seed(0)
    scores = torch.tensor(special * 3)[torch.randperm(3 * len(special))].view(3, -1)  # ties of every kind
    original = scores.clone()
    ranking = _ranking(scores)
    for row, ranks in zip(scores.tolist(), ranking.tolist(), strict=True):
        by_pairs = sorted(range(len(row)), key=lambda key: (row[key], key))
        assert sorted(range(len(row)), key=lambda key: ranks[key]) == by_pairs
    assert torch.equal(scores.view(torch.int32), original.view(torch.int32))  # the scores are left as they were


def _ties_at_the_boundary(model, input_ids) -> int:
    """Queries of the prompt whose k-th and (k+1)-th best index scores are equal, in any layer: what the tie-break
    decides (so the tests below can fail)."""
    captured = []
    indexers = [layer.self_attn.indexer for layer in model.model.layers]
    hooks = [ix.register_forward_hook(lambda m, args, out: captured.append((m, args))) for ix in indexers]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    ties = 0
    k = model.config.index_topk
    for indexer, (hidden, query_latent, (cos, sin), keys, _, _) in captured:
        with torch.no_grad():
            queries, weights = indexer.queries(hidden, query_latent, cos, sin)
            scores = index_scores(queries, weights, keys.float(), indexer.softmax_scale)[0]  # [S, T]
        for t in range(k + 1, scores.shape[0]):
            top = scores[t, : t + 1].topk(k + 1).values
            ties += int(top[k - 1] == top[k])
    return ties


def test_padded_batch_and_static_cache_equal_the_prompt_alone_under_ties():
    model = _model()
    prompt = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    assert _ties_at_the_boundary(model, prompt) > 0
    settings = dict(max_new_tokens=12, do_sample=False)
    alone = model.generate(prompt, **settings)[:, prompt.shape[1] :]
    other = torch.randint(3, VOCAB, (1, 18), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt], dim=1), other])
    mask = (batch != 0).long()
    mask[1] = 1
    padded = model.generate(batch, attention_mask=mask, **settings)[:1, batch.shape[1] :]
    static = model.generate(prompt, cache_implementation="static", **settings)[:, prompt.shape[1] :]
    assert torch.equal(padded, alone) and torch.equal(static, alone)


def test_cached_decoding_equals_the_full_forward_under_ties():
    model = _model()
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    assert _ties_at_the_boundary(model, ids) > 0
    with torch.no_grad():
        full = model(ids).logits[:, -6:]
        out = model(ids[:, :14], use_cache=True)
        steps = []
        for t in range(14, 20):
            out = model(ids[:, t : t + 1], cache=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
