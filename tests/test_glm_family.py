"""GLM-5 (`glm_moe_dsa`): MLA + DSA whose indexer rotates adjacent RoPE pairs and whose "shared" layers
(`indexer_types`) reuse the previous full layer's top-k with no indexer of their own. Checkpoints written by
transformers' GlmMoeDsaForCausalLM, with and without shared layers, load into ours and give its logits and tokens;
where GLM's conventions differ from DeepSeek's, the peer decides (the other RoPE layout gives other logits)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

import mla_dsa
from mla_dsa import MlaDsaCache, MlaDsaConfig, MlaDsaForCausalLM

from checkpoints import read_checkpoint
from peers import (
    _COMMON,
    _V3_MOE,
    INDEXER,
    VOCAB,
    glm_config,
    left_padded_batch,
    peer_cache_kwarg,
    perturb_,
    positions_from_mask,
)

TOPK = 5
SHARED = ["full", "shared", "full"]


@pytest.fixture(scope="module", params=[None, SHARED], ids=["every-layer-full", "full-shared-full"])
def models(request, tmp_path_factory):
    torch.manual_seed(0)
    peer = perturb_(GlmMoeDsaForCausalLM(glm_config(indexer_types=request.param)), seed=1).eval()
    directory = tmp_path_factory.mktemp("glm")
    peer.save_pretrained(directory)
    return peer, MlaDsaForCausalLM.from_pretrained(directory).eval(), directory


def _ids(batch: int = 2, seq_len: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.compat
def test_config_reads_glms_fields(models):
    peer, ours, _ = models
    assert ours.config.indexer_rope_interleave is True
    expected = None if all(kind == "full" for kind in peer.config.indexer_types) else peer.config.indexer_types
    assert ours.config.indexer_types == expected
    shared = [i for i, kind in enumerate(peer.config.indexer_types) if kind == "shared"]
    assert [i for i, layer in enumerate(ours.model.layers) if layer.self_attn.indexer is None] == shared


@pytest.mark.compat
@pytest.mark.parametrize("mode", ["absorbed", "mha"])
def test_full_forward_equals_glm_with_topk_below_the_length(models, mode):
    peer, ours, _ = models
    input_ids = _ids()
    with torch.no_grad():
        expected = peer(input_ids).logits
        torch.testing.assert_close(ours(input_ids, attention_mode=mode).logits, expected, rtol=0, atol=1e-4)
        assert (ours(input_ids, use_sparse_attention=False).logits - expected).abs().max() > 1e-3  # top-k mattered


def test_the_indexer_rope_layout_is_the_peers(models):
    """GLM's indexer rotates adjacent pairs, DeepSeek-V3.2's half-split pairs: with DeepSeek's layout the same weights
    select other keys, and the logits move."""
    peer, _, directory = models
    deepseek_layout = MlaDsaForCausalLM.from_pretrained(directory, indexer_rope_interleave=False).eval()
    with torch.no_grad():
        assert (deepseek_layout(_ids()).logits - peer(_ids()).logits).abs().max() > 1e-3


@pytest.mark.compat
def test_cached_decode_past_topk_equals_glm(models):
    peer, ours, _ = models
    input_ids = _ids(seq_len=16)
    theirs_cache, our_cache = DynamicCache(config=peer.config), MlaDsaCache(ours.config)
    with torch.no_grad():
        peer(input_ids[:, :8], use_cache=True, **peer_cache_kwarg(theirs_cache))
        ours(input_ids[:, :8], cache=our_cache, use_cache=True)
        for step in range(8, 16):  # 9..16 keys, top-5: every step past index_topk
            token = input_ids[:, step : step + 1]
            expected = peer(token, use_cache=True, **peer_cache_kwarg(theirs_cache)).logits
            actual = ours(token, cache=our_cache, use_cache=True).logits
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def test_left_padded_batch_and_greedy_generate_equal_glm(models):
    peer, ours, _ = models
    input_ids, mask = left_padded_batch(seq_len=14)
    with torch.no_grad():
        expected = peer(input_ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        actual = ours(input_ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    rows = mask.bool()
    torch.testing.assert_close(actual[rows], expected[rows], rtol=0, atol=1e-4)
    prompt = _ids(batch=1, seq_len=8, seed=3)
    settings = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(prompt, **settings), peer.generate(prompt, **settings))


def test_shared_layers_cache_no_indexer_keys(models):
    peer, ours, _ = models
    cache = MlaDsaCache(ours.config)
    with torch.no_grad():
        ours(_ids(seq_len=9), cache=cache, use_cache=True)
    latent, index_key = (32 + 8) * 4, 32 * 4
    expected = [latent if kind == "shared" else latent + index_key for kind in peer.config.indexer_types]
    assert cache.bytes_per_token_by_layer() == expected
    if "shared" in peer.config.indexer_types:
        with pytest.raises(ValueError, match="bytes_per_token_by_layer"):
            cache.bytes_per_token_per_layer()


@pytest.mark.parametrize("cache_dtype", ["auto", "fp8"])
def test_shared_layers_decode_as_they_prefill(cache_dtype):
    """Shared selection on every path: cached decode (absorbed, FP8 indexer keys too) equals a full recomputation."""
    torch.manual_seed(0)
    sharing = {"indexer_types": ["full", "shared", "shared"], "indexer_cache_dtype": cache_dtype}
    config = MlaDsaConfig(**{**_COMMON, **_V3_MOE, "q_lora_rank": 48, **INDEXER, "index_topk": TOPK, **sharing})
    model = perturb_(MlaDsaForCausalLM(config)).eval()
    input_ids = _ids(seq_len=14)
    with torch.no_grad():
        cache = MlaDsaCache(config)
        model(input_ids[:, :-1], cache=cache, use_cache=True)
        step = model(input_ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, model(input_ids).logits[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [{"index_topk_freq": 2, "index_skip_topk_offset": 1}, {"index_topk_pattern": "FSF"}, {"index_topk_freq": 3}],
)
def test_glms_other_sharing_fields_give_its_indexer_types(fields):
    """GLM configs may say which layers share through a frequency and offset or a pattern instead of indexer_types:
    ours derives the same list as transformers' GlmMoeDsaConfig."""
    glm_dict = {**glm_config().to_dict(), **fields}
    glm_dict.pop("indexer_types")
    expected = GlmMoeDsaConfig.from_dict(glm_dict).indexer_types
    ours = MlaDsaConfig.from_dict(glm_dict).indexer_types
    assert (ours or ["full"] * len(expected)) == expected


def test_sharing_patterns_that_cannot_run_are_refused():
    base = {**_COMMON, "index_n_heads": 8, "index_head_dim": 32, "n_routed_experts": None}
    with pytest.raises(ValueError, match="indexer_types must be"):
        MlaDsaConfig(**base, indexer_types=["shared", "full", "full"])
    with pytest.raises(ValueError, match="indexer_types must be"):
        MlaDsaConfig(**base, indexer_types=["full", "full"])
    with pytest.raises(ValueError, match="layer 1 shares the selection of layer 0, which is in dense_attention_layers"):
        MlaDsaConfig(**base, indexer_types=["full", "shared", "full"], dense_attention_layers=[0])


def test_converted_glm_checkpoint_loads_with_trust_remote_code(models, tmp_path):
    peer, _, directory = models
    converted = mla_dsa.convert_checkpoint(directory, tmp_path / "converted", verify=True, progress=False)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "mla_dsa" and config["indexer_rope_interleave"] is True
    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, peer(_ids()).logits, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ sharing as a conversion option
@pytest.mark.parametrize(
    "option, expected",
    [
        (["--index-share", "2"], ["full", "full", "shared", "full"]),
        (["--indexer-types", "FSSF"], ["full", "shared", "shared", "full"]),
    ],
)
def test_convert_to_a_sharing_pattern_drops_the_shared_layers_indexers(tmp_path, option, expected):
    """A DeepSeek-V3.2 checkpoint (an indexer in every layer) converted with a sharing pattern keeps the full layers'
    indexers bit for bit and drops the shared layers'; --verify (every token selected) still passes, and the result
    equals the source run with the same pattern (shared layers then ignore their own indexers)."""
    from mla_dsa.cli import main

    from checkpoints import read_checkpoint
    from peers import save_peer

    save_peer("deepseek_v32", tmp_path / "v32", num_hidden_layers=4, index_topk=TOPK)
    status = main(["convert", str(tmp_path / "v32"), str(tmp_path / "shared"), *option, "--verify", "--no-progress"])
    assert status == 0
    source, converted = read_checkpoint(tmp_path / "v32"), read_checkpoint(tmp_path / "shared")
    for layer, kind in enumerate(expected):
        names = [name for name in source if name.startswith(f"model.layers.{layer}.self_attn.indexer.")]
        assert names and all((name in converted) == (kind == "full") for name in names)
        assert all(torch.equal(converted[name], source[name]) for name in names if kind == "full")
    model = MlaDsaForCausalLM.from_pretrained(tmp_path / "shared").eval()
    assert model.config.indexer_types == expected
    reference = MlaDsaForCausalLM.from_pretrained(tmp_path / "v32", indexer_types=expected).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, reference(_ids()).logits, rtol=0, atol=1e-5)
        every_layer = MlaDsaForCausalLM.from_pretrained(tmp_path / "v32").eval()
        assert (every_layer(_ids()).logits - model(_ids()).logits).abs().max() > 1e-4  # the sharing is real


def test_sharing_options_are_checked(tmp_path):
    from peers import save_peer

    save_peer("deepseek_v3", tmp_path / "v3")
    with pytest.raises(mla_dsa.ConversionError, match="one F or S per layer"):
        mla_dsa.convert_checkpoint(tmp_path / "v3", tmp_path / "out", indexer_types="FXF", progress=False)
    with pytest.raises(mla_dsa.ConversionError, match="indexer_types must be"):
        mla_dsa.convert_checkpoint(tmp_path / "v3", tmp_path / "out", indexer_types="SFF", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ export to GLM's format
def _load_glm(directory) -> GlmMoeDsaForCausalLM:
    model, info = GlmMoeDsaForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model.eval()


def test_glm_checkpoint_exports_back_to_glms_format(models, tmp_path):
    """A GLM checkpoint read by us and exported to glm_moe_dsa: transformers' own class loads it with no custom code
    and no loading complaint, and it computes what the original computes."""
    peer, _, directory = models
    export = mla_dsa.convert_checkpoint(directory, tmp_path / "export", export="glm_moe_dsa", verify=True,
                                        progress=False)  # fmt: skip
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "glm_moe_dsa" and "auto_map" not in config and not list(export.glob("*.py"))
    assert config["indexer_types"] == peer.config.indexer_types
    # vLLM and SGLang rotate the indexer's pairs by this field (absent: half-split, DeepSeek-V3.2's layout)
    assert config["indexer_rope_interleave"] is True
    assert type(AutoModelForCausalLM.from_pretrained(export)) is GlmMoeDsaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(_load_glm(export)(_ids()).logits, peer(_ids()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("export, native", [("glm_moe_dsa", GlmMoeDsaForCausalLM), ("deepseek_v32", None)])
def test_exporting_to_the_other_indexer_rope_layout_permutes_and_keeps_the_logits(tmp_path, export, native):
    """DeepSeek-V3.2's indexer rotates half-split pairs, GLM's adjacent pairs. A DeepSeek-layout model with shared
    layers (`--index-share 2`) exported to GLM's format, and a GLM model exported to DeepSeek-V3.2's, get their
    indexers' RoPE rows reordered: transformers' own class of the target computes what ours computed."""
    from transformers import DeepseekV32ForCausalLM

    from peers import save_peer

    if export == "glm_moe_dsa":
        save_peer("deepseek_v32", tmp_path / "src", num_hidden_layers=4, index_topk=TOPK)
        ours = mla_dsa.convert_checkpoint(tmp_path / "src", tmp_path / "ours", index_share=2, progress=False)
    else:
        torch.manual_seed(0)
        perturb_(GlmMoeDsaForCausalLM(glm_config()), seed=1).save_pretrained(tmp_path / "src")
        ours = mla_dsa.convert_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)
    exported = mla_dsa.convert_checkpoint(ours, tmp_path / "export", export=export, progress=False)
    native = native or DeepseekV32ForCausalLM
    model, info = native.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values())
    reference = MlaDsaForCausalLM.from_pretrained(ours).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_ids()).logits, reference(_ids()).logits, rtol=0, atol=1e-4)
    moved = read_checkpoint(exported)["model.layers.0.self_attn.indexer.wk.weight"]
    assert not torch.equal(moved, read_checkpoint(ours)["model.layers.0.self_attn.indexer.wk.weight"])
    if export == "glm_moe_dsa":  # vLLM's CUDA loader wants one entry per layer and no indexer tensor on a shared one
        config = json.loads((exported / "config.json").read_text())
        assert len(config["indexer_types"]) == config["num_hidden_layers"] and "shared" in config["indexer_types"]
        names = read_checkpoint(exported)
        for layer, kind in enumerate(config["indexer_types"]):
            has_indexer = any(name.startswith(f"model.layers.{layer}.self_attn.indexer.") for name in names)
            assert has_indexer == (kind == "full")


# ------------------------------------------------------------------------------------------- training shared indexers
def test_a_full_indexer_learns_from_every_layer_it_selects_for():
    """Dense warm-up with `full, shared, shared`: each shared layer scores its source's indexer against its own
    attention, so layer 0's indexer gets a gradient from all three layers' KL, not from its own alone."""
    torch.manual_seed(0)
    config = MlaDsaConfig(**{**_COMMON, **_V3_MOE, "q_lora_rank": 48, **INDEXER, "index_topk": TOPK,
                             "indexer_types": ["full", "shared", "shared"]})  # fmt: skip
    from mla_dsa.indexer_loss import IndexerLoss

    model = perturb_(MlaDsaForCausalLM(config)).train()
    with IndexerLoss(model, "dense") as indexer_loss:
        model(_ids(seq_len=16), use_sparse_attention=False)
    stats = indexer_loss.layers
    assert len(stats) == 3
    torch.testing.assert_close(indexer_loss.kl, torch.stack([s.kl for s in stats]).mean())
    indexer = model.model.layers[0].self_attn.indexer
    own = torch.autograd.grad(stats[0].kl, indexer.wq_b.weight, retain_graph=True)[0]
    shared = torch.autograd.grad(stats[1].kl + stats[2].kl, indexer.wq_b.weight, retain_graph=True)[0]
    assert own.abs().sum() > 0 and shared.abs().sum() > 0
    assert not torch.allclose(own, shared)


def test_the_mean_of_kls_trains_as_the_kl_of_the_mean_attention():
    """Why each shared layer adds its own KL to its source's indexer: sum_l KL(p_l || q) = n KL(mean p || q) + a
    constant, so the gradient is the one of the mean target (the issue's example), up to the factor n."""
    from mla_dsa.indexer_loss import kl_to_target

    generator = torch.Generator().manual_seed(0)
    targets = torch.softmax(torch.randn(3, 2, 5, 9, generator=generator), dim=-1)  # 3 layers' attention [B, S, T]
    logits = torch.randn(2, 5, 9, generator=generator, requires_grad=True)
    valid = torch.ones(2, 5, 9, dtype=torch.bool)
    each = torch.autograd.grad(sum(kl_to_target(target, logits, valid)[0] for target in targets), logits)[0]
    mean = torch.autograd.grad(3 * kl_to_target(targets.mean(0), logits, valid)[0], logits)[0]
    torch.testing.assert_close(each, mean)
