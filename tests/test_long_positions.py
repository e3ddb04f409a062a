"""Positions far out are right: at positions beyond 8K (up to DeepSeek-V3.2's 163,840), with YaRN at V3.2's own
settings (factor 40 over 4,096), ours equals transformers' DeepseekV32 (half-split indexer RoPE) and GlmMoeDsa
(interleaved indexer RoPE) on the same weights with DSA active, and cached decoding there equals a full forward, in
every attention mode and cache dtype. RoPE sees only positions, so a short sequence placed far out (position_ids)
tests what a long context would: mlx-lm's indexer RoPE layout error showed only past 2-3K tokens."""

import pytest
import torch
from transformers import DeepseekV32ForCausalLM, DynamicCache, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

from mla_dsa import MlaDsaCache, MlaDsaForCausalLM

from peers import _COMMON, _V3_MOE, INDEXER, VOCAB, peer_cache_kwarg, perturb_, v32_config

V32_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
LONG = dict(rope_parameters=V32_YARN, max_position_embeddings=163840)
TOPK, PROMPT, NEW = 6, 20, 6
STARTS = [9_000, 70_000, 163_800]  # positions of the first token: past 8K, mid-way, at V3.2's limit


def _peer(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "glm_moe_dsa":
        config = GlmMoeDsaConfig(**{**_COMMON, **_V3_MOE, "q_lora_rank": 48, **INDEXER, "index_topk": TOPK, **LONG})
        return perturb_(GlmMoeDsaForCausalLM(config), seed=1).eval()
    return perturb_(DeepseekV32ForCausalLM(v32_config(index_topk=TOPK, **LONG)), seed=1).eval()


@pytest.fixture(scope="module", params=["deepseek_v32", "glm_moe_dsa"])
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    peer = _peer(request.param)
    peer.save_pretrained(directory)
    return peer, directory


def _inputs(start: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(start))
    return ids, torch.arange(start, start + PROMPT + NEW)[None]


@pytest.mark.parametrize("start", STARTS)
def test_far_positions_equal_the_peer(pair, start):
    peer, directory = pair
    ours = MlaDsaForCausalLM.from_pretrained(directory).eval()
    ids, positions = _inputs(start)
    with torch.no_grad():
        expected = peer(ids, position_ids=positions).logits
        actual = ours(ids, position_ids=positions).logits
        dense = ours(ids, position_ids=positions, use_sparse_attention=False).logits
    assert (dense - actual).abs().max() > 1e-3  # the top-k decided something
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def _cached(model, ids, positions) -> torch.Tensor:
    """Logits of a prefill of PROMPT tokens, then NEW one-token steps on the cache (ours, or the peer's own)."""
    ours = isinstance(model, MlaDsaForCausalLM)
    cache = MlaDsaCache(model.config) if ours else DynamicCache(config=model.config)
    cache_kwarg = {"cache": cache} if ours else peer_cache_kwarg(cache)
    with torch.no_grad():
        logits = [model(ids[:, :PROMPT], position_ids=positions[:, :PROMPT], use_cache=True, **cache_kwarg).logits]
        for t in range(PROMPT, PROMPT + NEW):
            step = model(ids[:, t : t + 1], position_ids=positions[:, t : t + 1], use_cache=True, **cache_kwarg)
            logits.append(step.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("start", STARTS[:2])
@pytest.mark.parametrize("variant", [{"attention_mode": "mha"}, {"attention_mode": "absorbed"},
                                     {"latent_cache_dtype": "fp8", "indexer_cache_dtype": "fp8"}],
                         ids=["mha", "absorbed", "fp8-caches"])  # fmt: skip
def test_cached_decoding_far_out_equals_the_full_forward(pair, start, variant):
    peer, directory = pair
    ours = MlaDsaForCausalLM.from_pretrained(directory, **variant).eval()
    ids, positions = _inputs(start)
    with torch.no_grad():
        full = ours(ids, position_ids=positions).logits
    torch.testing.assert_close(_cached(ours, ids, positions), full, rtol=0, atol=1e-4)
    if not variant.get("latent_cache_dtype"):  # and the peer's own cached decoding there
        torch.testing.assert_close(_cached(peer, ids, positions), full, rtol=0, atol=1e-4)
