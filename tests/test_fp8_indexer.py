"""FP8 indexer keys (indexer_cache_dtype="fp8"): Hadamard rotation, e4m3 with per-128 scales, packed per token.

The fast path is checked against the full-precision one on its top-k, not just its shapes: a quantized path whose
shapes are right can still select other keys."""

import pytest
import torch

import mla_dsa
from mla_dsa.modeling.cache_mla_dsa import dequantize_fp8_blocks, hadamard_rotate, quantize_fp8_blocks, unpack_fp8_rows
from mla_dsa.modeling.modeling_mla_dsa import index_scores

from peers import VOCAB, save_peer


def test_hadamard_rotation_is_orthogonal():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(50, 128, generator=generator), torch.randn(70, 128, generator=generator)
    torch.testing.assert_close(hadamard_rotate(q) @ hadamard_rotate(k).T, q @ k.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(hadamard_rotate(hadamard_rotate(q)), q, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rotate(torch.randn(3, 96))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_block_quantization_round_trip(scale_fmt):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 256, generator=generator) * torch.logspace(-2, 2, 256)
    quantized, scales = quantize_fp8_blocks(x, 128, scale_fmt)
    assert quantized.dtype == torch.float8_e4m3fn and scales.shape == (4, 9, 2)
    if scale_fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # powers of two
    restored = dequantize_fp8_blocks(quantized, scales, 128)
    block_max = x.abs().unflatten(-1, (2, 128)).amax(-1, keepdim=True)
    error = (restored - x).abs().unflatten(-1, (2, 128))
    assert (error <= block_max * 2**-3).all()  # e4m3 has 3 mantissa bits


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_topk_overlaps_full_precision(scale_fmt):
    """The indexer's top-k with FP8 queries/keys keeps >= 95% of the full-precision top-k."""
    generator = torch.Generator().manual_seed(2)
    bsz, seq, heads, dim, k = 2, 256, 16, 128, 32
    queries = torch.randn(bsz, seq, heads, dim, generator=generator)
    keys = torch.randn(bsz, seq, dim, generator=generator) + torch.randn(dim, generator=generator)  # shared offset
    weights = torch.rand(bsz, seq, heads, generator=generator)
    full = index_scores(queries, weights, keys, dim**-0.5)

    def fp8(x):
        return dequantize_fp8_blocks(*quantize_fp8_blocks(hadamard_rotate(x), 128, scale_fmt), 128)

    approx = index_scores(fp8(queries), weights, fp8(keys), dim**-0.5)
    top_full, top_fp8 = full.topk(k, -1).indices, approx.topk(k, -1).indices
    overlap = (top_full.unsqueeze(-1) == top_fp8.unsqueeze(-2)).any(-1).float().mean()
    assert overlap >= 0.95, overlap


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32")
    save_peer("deepseek_v32", path, index_topk=4, index_head_dim=32)
    return path


def test_fp8_cache_layout_and_bytes(checkpoint):
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, indexer_cache_dtype="fp8").eval()
    cache = mla_dsa.MlaDsaCache(model.config)
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (2, 10)), cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.index_keys.dtype == torch.uint8 and layer.index_keys.shape[-1] == 32 + 4  # 32 e4m3 + one fp32
    config = model.config
    assert cache.bytes_per_token_per_layer() == (config.kv_lora_rank + config.qk_rope_head_dim) * 4 + 36
    # Keys and their scales travel together through batch operations (one packed row per token).
    attn = model.model.layers[0].self_attn
    before = unpack_fp8_rows(layer.index_keys[:, : layer.length], attn.indexer.head_dim, attn.indexer.fp8_block)
    cache.reorder_cache(torch.tensor([1, 0]))
    after = unpack_fp8_rows(layer.index_keys[:, : layer.length], attn.indexer.head_dim, attn.indexer.fp8_block)
    torch.testing.assert_close(after, before.flip(0))


def test_fp8_cached_decoding_equals_fp8_recomputation(checkpoint):
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, indexer_cache_dtype="fp8").eval()
    ids = torch.randint(3, VOCAB, (2, 14))
    cache = mla_dsa.MlaDsaCache(model.config)
    with torch.no_grad():
        model(ids[:, :10], cache=cache, use_cache=True)
        for step in range(10, 14):
            cached = model(ids[:, step : step + 1], cache=cache, use_cache=True).logits[:, -1]
            full = model(ids[:, : step + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_fp8_needs_a_power_of_two_head():
    with pytest.raises(ValueError, match="index_head_dim"):
        mla_dsa.MlaDsaConfig(indexer_cache_dtype="fp8", index_head_dim=96)
