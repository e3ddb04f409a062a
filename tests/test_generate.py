"""`generate()` on our MlaDsaCache: every decoding strategy gives the peer's tokens, or those of a recomputation without
a cache; the cache comes back to the caller with the right length; a cache of other layers is refused.

Prompts are left-padded batches of 12 tokens; the DeepSeek-V3.2 checkpoint selects index_topk=5 keys, so DSA is
active from the prefill on.
"""

import pytest
import torch
from transformers import DynamicCache

import mla_dsa
from mla_dsa.modeling.modeling_mla_dsa import CACHE_NAME

from peers import left_padded_batch, save_peer, save_peers

PROMPT_LEN = 12
NEW_TOKENS = 8
DSA_TOPK = 5
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
PEERS = {"deepseek_v3": {}, "deepseek_v32": {"index_topk": DSA_TOPK}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{model_type: (peer, directory)}, written once."""
    return save_peers(tmp_path_factory, PEERS)


def load_ours(saved, model_type="deepseek_v32", **config_values) -> mla_dsa.MlaDsaForCausalLM:
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved[model_type][1]).eval()
    for name, value in config_values.items():
        setattr(model.config, name, value)
    return model


@pytest.fixture(scope="module")
def ours(saved):
    return load_ours(saved)


@pytest.fixture(scope="module")
def prompt():
    return left_padded_batch(batch_size=3, seq_len=PROMPT_LEN)


@pytest.fixture(scope="module")
def peer_greedy(saved, prompt):
    input_ids, attention_mask = prompt
    return {
        name: peer.generate(input_ids, attention_mask=attention_mask, **GREEDY) for name, (peer, _) in saved.items()
    }


@pytest.fixture(scope="module")
def ours_greedy(ours, prompt):
    input_ids, attention_mask = prompt
    return ours.generate(input_ids, attention_mask=attention_mask, **GREEDY)


@pytest.mark.parametrize("mode", ["mha", "absorbed", "auto"])
@pytest.mark.parametrize("model_type", list(PEERS))
def test_greedy_matches_peer(saved, prompt, peer_greedy, model_type, mode):
    input_ids, attention_mask = prompt
    model = load_ours(saved, model_type, attention_mode=mode)
    tokens = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    expected = peer_greedy[model_type]
    assert tokens.shape[1] > PROMPT_LEN
    assert torch.equal(tokens, expected), (
        f"ours {tokens[:, PROMPT_LEN:].tolist()} peer {expected[:, PROMPT_LEN:].tolist()}"
    )


@pytest.mark.parametrize("mode", ["absorbed", "auto"])
def test_greedy_with_layers_offloaded_to_disk_matches_peer(saved, prompt, peer_greedy, mode, tmp_path):
    """`device_map` offload (accelerate's hooks: an offloaded module's weights stay on the meta device until its own
    forward loads them) - the absorbed attention reads W_UK/W_UV of `kv_b_proj` without calling it, so it must load
    them through the module: reading the weight crashed on the meta device."""
    input_ids, attention_mask = prompt
    directory = saved["deepseek_v32"][1]
    layers = mla_dsa.MlaDsaConfig.from_pretrained(directory).num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
    device_map |= {f"model.layers.{layer}": "disk" if layer % 2 == 0 else "cpu" for layer in range(layers)}
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, device_map=device_map, offload_folder=tmp_path,
                                                      attention_mode=mode).eval()  # fmt: skip
    assert model.model.layers[0].self_attn.kv_b_proj.weight.device.type == "meta"  # offloaded, loaded per forward
    tokens = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    assert torch.equal(tokens, peer_greedy["deepseek_v32"])


def assert_quantized_like_the_peer(model, peer, prompt) -> None:
    """Ours and the peer, quantized alike: the same logits (to float rounding) and greedy tokens."""
    input_ids, attention_mask = prompt
    with torch.no_grad():
        ours_logits = model(input_ids, attention_mask=attention_mask).logits
        peer_logits = peer(input_ids, attention_mask=attention_mask).logits
    assert (ours_logits - peer_logits).abs().max() < 1e-4 * peer_logits.abs().max()
    tokens = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    assert torch.equal(tokens, peer.generate(input_ids, attention_mask=attention_mask, **GREEDY))


@pytest.mark.parametrize("mode", ["absorbed", "auto"])
def test_greedy_with_torchao_quantized_weights_matches_the_quantized_peer(saved, prompt, mode):
    """transformers' `TorchAoConfig` (int8 weight-only: every Linear keeps its class, its weight becomes a torchao
    tensor subclass) - the absorbed attention reads `kv_b_proj`'s weight as W_UK/W_UV, and a view of the quantized
    tensor raised NotImplementedError; it now reads the weight the module applies. Ours equals transformers'
    DeepseekV32 quantized the same way."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import DeepseekV32ForCausalLM, TorchAoConfig

    directory = saved["deepseek_v32"][1]
    quantized = dict(quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32)
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, attention_mode=mode, **quantized).eval()
    assert type(model.model.layers[0].self_attn.kv_b_proj.weight).__module__.startswith("torchao")  # quantized
    peer = DeepseekV32ForCausalLM.from_pretrained(directory, **quantized).eval()
    assert_quantized_like_the_peer(model, peer, prompt)


def _bitsandbytes_model(directory, bits: int, model_class=mla_dsa.MlaDsaForCausalLM, **settings):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    model = model_class.from_pretrained(directory, quantization_config=config, dtype=torch.float32, **settings).eval()
    for module in model.modules():
        # bitsandbytes 0.50's AVX512-BF16 4-bit kernel needs sizes in multiples of 64, which the tiny model's are not
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    assert not model.model.layers[0].self_attn.kv_b_proj.weight.is_floating_point()  # stored as integers
    return model


@pytest.mark.parametrize("mode", ["absorbed", "mha"])
def test_bitsandbytes_4bit_weights_give_the_quantized_peers_logits_and_tokens(saved, prompt, mode):
    """transformers' `BitsAndBytesConfig` (bitsandbytes' CPU backend): its layers store integer weights and dequantize
    them themselves. The latent projections' inputs were cast to the weight's dtype (uint8) and W_UK/W_UV were read by
    evaluating `kv_b_proj` on an identity of that dtype: the logits were garbage, with no error. Ours equals
    transformers' DeepseekV32 quantized the same way, in both attention modes, and its greedy tokens with the cache."""
    pytest.importorskip("bitsandbytes")
    from transformers import DeepseekV32ForCausalLM

    directory = saved["deepseek_v32"][1]
    model = _bitsandbytes_model(directory, 4, attention_mode=mode)
    peer = _bitsandbytes_model(directory, 4, DeepseekV32ForCausalLM)
    assert_quantized_like_the_peer(model, peer, prompt)


@pytest.mark.parametrize("mode", ["absorbed", "mha"])
def test_bitsandbytes_8bit_weights_keep_the_models_predictions(saved, prompt, mode):
    """bitsandbytes' 8-bit layers (LLM.int8: int8 weights, and activations quantized per row in float16): the peer
    cannot run them on CPU (its kv_b_proj input is 4-D, which bitsandbytes 0.50's CPU int8 path refuses), so ours is
    held to the float model: its next-token choices stay those of the float model on nearly every position (0.96 on
    this tiny random model; 0.07 when the activations were cast to int8), and the cache decodes what a recomputation
    gives."""
    pytest.importorskip("bitsandbytes")
    input_ids, attention_mask = prompt
    directory = saved["deepseek_v32"][1]
    model = _bitsandbytes_model(directory, 8, attention_mode=mode)
    float_model = mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, attention_mode=mode).eval()
    with torch.no_grad():
        quantized = model(input_ids, attention_mask=attention_mask).logits
        reference = float_model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (quantized.argmax(-1) == reference.argmax(-1))[real].float().mean() >= 0.9
    tokens = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    assert torch.equal(tokens, model.generate(input_ids, attention_mask=attention_mask, use_cache=False, **GREEDY))


def test_greedy_with_cache_equals_recomputation(ours, prompt, ours_greedy):
    input_ids, attention_mask = prompt
    recomputed = ours.generate(input_ids, attention_mask=attention_mask, use_cache=False, **GREEDY)
    assert torch.equal(ours_greedy, recomputed)


def test_beam_search_with_cache_equals_recomputation_and_peer(saved, ours, prompt, ours_greedy):
    """Beam search reorders the cache (reorder_cache / batch_select_indices) at every step."""
    input_ids, attention_mask = prompt
    beam = dict(num_beams=3, num_return_sequences=2, **GREEDY)
    cached = ours.generate(input_ids, attention_mask=attention_mask, **beam)
    recomputed = ours.generate(input_ids, attention_mask=attention_mask, use_cache=False, **beam)
    peer_tokens = saved["deepseek_v32"][0].generate(input_ids, attention_mask=attention_mask, **beam)
    assert cached.shape[0] == 2 * input_ids.shape[0]
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, peer_tokens)
    assert not torch.equal(cached[::2], ours_greedy)  # beam search found something greedy did not


def test_seeded_sampling_is_reproducible_and_cache_independent(ours, prompt, ours_greedy):
    input_ids, attention_mask = prompt
    sample = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=10)

    def sampled(seed, **kwargs):
        torch.manual_seed(seed)
        return ours.generate(input_ids, attention_mask=attention_mask, **sample, **kwargs)

    first = sampled(3)
    assert torch.equal(first, sampled(3))
    assert torch.equal(first, sampled(3, use_cache=False))
    assert not torch.equal(first, sampled(4))  # it really samples
    assert not torch.equal(first, ours_greedy)


@pytest.fixture(scope="module")
def other_assistant(tmp_path_factory):
    """Same geometry, different weights: most of its drafts are rejected and cropped off the main model's cache."""
    directory = tmp_path_factory.mktemp("assistant")
    save_peer("deepseek_v32", directory, seed=5, index_topk=DSA_TOPK)
    return mla_dsa.MlaDsaForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("row", [0, 1, 2], ids=["unpadded", "padded_3", "padded_6"])
@pytest.mark.parametrize("assistant", ["same_model", "other_weights"])
def test_assisted_greedy_equals_greedy(ours, other_assistant, prompt, monkeypatch, assistant, row):
    """Assisted decoding verifies several draft tokens per forward on our cache and crops rejected ones (batch 1:
    transformers' restriction). Greedy with any assistant must give the main model's own greedy tokens."""
    input_ids, attention_mask = (t[row : row + 1] for t in prompt)
    helper = ours if assistant == "same_model" else other_assistant
    plain = ours.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    crops = []
    original_crop = mla_dsa.MlaDsaCacheLayer.crop

    def recording_crop(self, max_length):
        crops.append(max_length)
        return original_crop(self, max_length)

    monkeypatch.setattr(mla_dsa.MlaDsaCacheLayer, "crop", recording_crop)
    assisted = ours.generate(input_ids, attention_mask=attention_mask, assistant_model=helper, **GREEDY)
    assert torch.equal(assisted, plain), (
        f"assisted {assisted[:, PROMPT_LEN:].tolist()} plain {plain[:, PROMPT_LEN:].tolist()}"
    )
    if assistant == "other_weights":
        assert any(removed < 0 for removed in crops), "no draft was rejected: the rollback went untested"


def test_crop_zero_removes_nothing(ours, prompt):
    """transformers 5.23 calls `cache.crop(0)` meaning "remove 0 tokens" (assisted decoding after a fully accepted
    draft; the assistant's cache before every draft), as DynamicCache.crop(0) does."""
    input_ids, attention_mask = prompt
    cache = mla_dsa.MlaDsaCache(ours.config)
    with torch.no_grad():
        ours(input_ids, attention_mask=attention_mask, cache=cache)
    reference = DynamicCache()
    reference.update(torch.zeros(1, 1, PROMPT_LEN, 4), torch.zeros(1, 1, PROMPT_LEN, 4), 0)
    reference.crop(0)
    assert reference.get_seq_length() == PROMPT_LEN
    cache.crop(0)
    assert cache.get_seq_length() == PROMPT_LEN


def test_generate_returns_our_cache_and_it_continues(ours, prompt, ours_greedy):
    """The returned cache holds every token but the last generated one (which was never fed back); handing it to a
    second generate() continues exactly where one long generate() goes."""
    input_ids, attention_mask = prompt
    half = NEW_TOKENS // 2
    out = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=half, do_sample=False,
                        return_dict_in_generate=True)  # fmt: skip
    cache = getattr(out, CACHE_NAME)
    assert all(isinstance(layer, mla_dsa.MlaDsaCacheLayer) for layer in cache.layers)
    assert out.sequences.shape[1] == PROMPT_LEN + half
    assert cache.get_seq_length() == out.sequences.shape[1] - 1 == PROMPT_LEN + half - 1
    assert all(layer.get_seq_length() == PROMPT_LEN + half - 1 for layer in cache.layers)
    mask = torch.cat([attention_mask, torch.ones(attention_mask.shape[0], half, dtype=attention_mask.dtype)], dim=1)
    continued = ours.generate(out.sequences, attention_mask=mask, **{CACHE_NAME: cache}, max_new_tokens=half,
                              do_sample=False)  # fmt: skip
    assert torch.equal(continued, ours_greedy)


def test_a_cache_of_other_layers_is_refused(ours, prompt):
    """A plain DynamicCache() (per-head key/value layers) would silently hold the wrong tensors."""
    input_ids, attention_mask = prompt
    with pytest.raises(ValueError, match="MlaDsaCache"):
        ours(input_ids, attention_mask=attention_mask, cache=DynamicCache())
    with pytest.raises(ValueError, match="MlaDsaCache"):
        ours.generate(input_ids, attention_mask=attention_mask, **{CACHE_NAME: DynamicCache()}, **GREEDY)


def test_dynamic_cache_from_the_config_holds_our_layers(ours, prompt, ours_greedy):
    """`DynamicCache(config=model.config)` - what generate() builds - is made of MlaDsaCacheLayer (registered layer
    type), and decodes like MlaDsaCache."""
    input_ids, attention_mask = prompt
    cache = DynamicCache(config=ours.config)
    assert [type(layer) for layer in cache.layers] == [mla_dsa.MlaDsaCacheLayer] * ours.config.num_hidden_layers
    tokens = ours.generate(input_ids, attention_mask=attention_mask, **{CACHE_NAME: cache}, **GREEDY)
    assert torch.equal(tokens, ours_greedy)
    assert cache.get_seq_length() == tokens.shape[1] - 1
