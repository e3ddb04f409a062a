"""A fixed-size cache and a compiled decode step: `generate(cache_implementation="static")` builds
`StaticCache(config)` of our `MlaDsaStaticCacheLayer` (transformers' convention: a StaticLayer subclass registered for
the config's layer type), and `torch.compile(model.forward, fullgraph=True)` decodes on it with no graph break and no
recompilation per token, equal to eager. Graphs are counted with torch._dynamo's counters."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache, StaticCache

from mla_dsa import MlaDsaConfig, MlaDsaForCausalLM
from mla_dsa.modeling.cache_mla_dsa import MlaDsaStaticCacheLayer

from peers import VOCAB

CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              first_k_dense_replace=1, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
              index_n_heads=8, index_head_dim=32, index_topk=6, max_position_embeddings=512,
              pad_token_id=0)  # fmt: skip


def _model(**overrides) -> MlaDsaForCausalLM:
    torch.manual_seed(0)
    return MlaDsaForCausalLM(MlaDsaConfig(**{**CONFIG, **overrides})).eval()


def _padded_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, :3], input_ids[1, :3] = 0, 0
    return input_ids, mask


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_static_cache_is_built_of_our_layers():
    model = _model()
    cache = StaticCache(config=model.config, max_cache_len=40)
    assert all(type(layer) is MlaDsaStaticCacheLayer for layer in cache.layers) and cache.is_compileable
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 9)), cache=cache, use_cache=True)
    assert cache.layers[0].latent.shape == (1, 40, 32 + 8) and int(cache.get_seq_length()) == 9
    assert cache.layers[0].bytes_per_token() == (32 + 8 + 32) * 4


def test_static_cache_buffers_have_fixed_addresses():
    """CUDA graphs replay a compiled step on the very buffers it was recorded with: the static cache marks its
    latent rows, indexer keys and length as static addresses (as transformers' StaticLayer marks its keys), or
    torch.compile(mode="reduce-overhead") skips CUDA graphs for the step's in-place cache writes."""
    model = _model()
    cache = StaticCache(config=model.config, max_cache_len=40)
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 9)), cache=cache, use_cache=True)
    for layer in cache.layers:  # the latent rows and indexer keys are views of the marked buffers
        for buffer in (layer.keys, layer.indexer_keys, layer.cumulative_length):
            assert getattr(buffer, "_dynamo_static_input_type", None) is not None
        assert layer.latent.data_ptr() == layer.keys.data_ptr()
        assert layer.index_keys.data_ptr() == layer.indexer_keys.data_ptr()


SLOW = pytest.mark.slow


@pytest.mark.compat
@pytest.mark.parametrize(
    "strategy, overrides",
    [
        pytest.param({}, {}, id="greedy"),
        pytest.param({}, {"latent_cache_dtype": "fp8", "indexer_cache_dtype": "fp8"}, id="fp8-caches"),
        pytest.param({"num_beams": 2}, {}, id="beams", marks=SLOW),
        pytest.param({"use_sparse_attention": False}, {}, id="dense", marks=SLOW),
        pytest.param({"attention_mode": "mha"}, {}, id="mha", marks=SLOW),
    ],
)
def test_generate_on_a_static_cache_equals_the_dynamic_cache(strategy, overrides):
    """A left-padded batch; the static cache is longer than the context, so attention sees empty slots it must hide."""
    model = _model(**overrides)
    input_ids, mask = _padded_prompt()
    settings = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, **strategy)
    dynamic = model.generate(input_ids, **settings)
    static = model.generate(input_ids, cache_implementation="static", **settings)
    assert torch.equal(static, dynamic)


def _decode_steps(forward, model, steps: int, cache_len: int = 48) -> torch.Tensor:
    """Eager prefill of a padded batch into a static cache, then `steps` greedy decode steps through `forward` with
    a fixed-size mask (what generate() passes with a static cache); returns every step's logits."""
    input_ids, prompt_mask = _padded_prompt()
    mask = torch.nn.functional.pad(prompt_mask, (0, cache_len - prompt_mask.shape[1]), value=1)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    logits = []
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, cache=cache, use_cache=True)
        positions = prompt_mask.sum(-1, keepdim=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = forward(token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            logits.append(out.logits)
            positions = positions + 1
    return torch.cat(logits, dim=1)


@pytest.mark.compat
@pytest.mark.parametrize("overrides", [{}, {"latent_cache_dtype": "fp8", "indexer_cache_dtype": "fp8"}],
                         ids=["bf16-caches", "fp8-caches"])  # fmt: skip
def test_compiled_decode_has_no_graph_break_and_no_recompilation_per_token(overrides):
    """Dynamo's own tracing (backend="eager": the graph capture, without code generation): fullgraph=True fails on
    any graph break; after the first compiled step, more steps make no new graph."""
    model = _model(**overrides)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    expected = _decode_steps(model.forward, model, steps=6)
    _decode_steps(compiled, model, steps=2)
    graphs = counters["stats"]["unique_graphs"]
    actual = _decode_steps(compiled, model, steps=6)
    assert counters["stats"]["unique_graphs"] == graphs == 1
    assert not counters["graph_break"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_torchao_int8_weights_decode_compiled_with_one_graph():
    """torchao's int8 weight-only quantization (`quantize_`, what transformers' TorchAoConfig applies): the absorbed
    attention dequantizes kv_b_proj's quantized weight inside the graph, so the compiled decode has no graph break (the
    probe-and-cache path of wrapped modules compares tensors on the host) and equals eager."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = _model()
    quantize_(model, Int8WeightOnlyConfig())
    assert type(model.model.layers[0].self_attn.kv_b_proj.weight).__module__.startswith("torchao")
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    expected = _decode_steps(model.forward, model, steps=4)
    actual = _decode_steps(compiled, model, steps=4)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def test_torch_export_reads_kv_b_proj_as_a_view_and_leaves_the_model_trainable():
    """torch.export (non-strict: Python runs on traced tensors) of a forward in absorbed mode: kv_b_proj's weight is
    read as a view, as in eager. The torchao test "has a dequantize" had held for every traced tensor, so the graph
    aliased the parameter through aten.dequantize (run with grad, the exported module turned the model's weight into
    a non-leaf: no backward, no optimizer). Now: no dequantize, equal logits, the model still trains."""
    model = _model(attention_mode="absorbed", first_k_dense_replace=2)  # dense MLPs: grouped_mm traces bf16 only
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = torch.export.export(_Logits(model), (input_ids,))
        expected = model(input_ids).logits
        torch.testing.assert_close(exported.module()(input_ids), expected, rtol=0, atol=1e-5)
    assert "aten.dequantize.self" not in {str(node.target) for node in exported.graph.nodes}
    weight = model.model.layers[0].self_attn.kv_b_proj.weight
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    assert weight.is_leaf and weight.grad is not None
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def test_a_lora_adapter_on_kv_b_proj_compiles_in_one_graph_and_exports():
    """The absorbed mode under a PEFT LoRA on kv_b_proj (not merged) reads the adapted weight by evaluating the module;
    outside a trace it reuses that while a probe row's output is unchanged, a comparison of values that no trace can
    follow: fullgraph compile failed ("Data dependent operator aten.equal") and torch.export too, where transformers'
    DeepseekV32 with the same adapter compiles and exports. Traced, the weight is evaluated every call."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["kv_b_proj", "q_b_proj"], init_lora_weights=False)
    model = get_peft_model(_model(attention_mode="absorbed", first_k_dense_replace=2), lora).eval()
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(input_ids=input_ids).logits, expected, rtol=0, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        exported = torch.export.export(_Logits(model), (input_ids,))
        torch.testing.assert_close(exported.module()(input_ids), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)  # eager after


def test_compiled_decode_writes_the_cache_in_place():
    """The decode graph after functionalization (what inductor compiles) writes each new row into the cache buffers
    themselves: an in-place write into a view of a graph input (the latent rows as `keys[:, 0]`) becomes a scatter
    of a copy of the whole buffer, which inductor cannot turn back into an in-place write: two copies of every
    layer's latent buffer per step (at 16K, a compiled step took 68 ms against 22 written in place)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    model = _model()
    _decode_steps(torch.compile(model.forward, fullgraph=True, backend=aot_autograd(fw_compiler=keep)), model, 2)
    (graph,) = graphs  # one decode graph
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "aten.index_copy.default" in targets  # the cache writes, on the buffers themselves
    view_scatters = {"aten.select_scatter.default", "aten.slice_scatter.default", "aten.as_strided_scatter.default"}
    assert not targets & view_scatters


@pytest.mark.slow
def test_generate_with_a_compiled_forward_compiles_once_per_shape():
    """generate(cache_implementation="static") with `model.forward` compiled (fullgraph): one graph for the prefill,
    one for every decode step, the same tokens as eager."""
    model = _model()
    input_ids, mask = _padded_prompt()
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    actual = model.generate(input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            cache_implementation="static")  # fmt: skip
    assert torch.equal(actual, expected)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


@pytest.mark.slow
@pytest.mark.parametrize(("freezing", "cpp_wrapper"), [(False, False), (True, True)],
                         ids=["weights-as-inputs", "frozen-weights-cpp-wrapper"])  # fmt: skip
def test_inductor_compiled_decode_equals_eager(freezing, cpp_wrapper):
    """The real compiler (inductor, C++ on CPU): one graph for every decode step, logits equal to eager. Plain (the
    Python wrapper calling inductor's kernels), and with `torch._inductor.config.freezing` (the weights folded in as
    constants and the linear layers prepacked for oneDNN, what the CPU speed table uses), inductor's C++ wrapper and
    its concat_linear pass (the products of one input made one: docs/usage.md's recipe). Freezing with the Python
    wrapper, the corner between them, is left out for the suite's time: the wrapper only calls the kernels either
    way."""
    model = _model()
    compiled = torch.compile(model.forward, fullgraph=True, options={"cpp_wrapper": cpp_wrapper})
    expected = _decode_steps(model.forward, model, steps=5)
    with torch._inductor.config.patch(freezing=freezing, **{"cpp.enable_concat_linear": freezing}):
        actual = _decode_steps(compiled, model, steps=5)
    packed = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]  # frozen: prepacked
    linear_layers = sum(type(module) is torch.nn.Linear for module in model.modules())
    # concatenated: each layer's projections of its input (q_a, kv_a, the indexer's; gate and up) fewer products
    # (22 of 23 layers packed without the pass, 14 with it)
    merged = 2 * model.config.num_hidden_layers
    assert 0 < packed <= linear_layers - merged if freezing else packed == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def test_a_dynamic_cache_still_works_under_the_same_forward():
    """The static path changes nothing for the growing cache: its decode logits equal a full recomputation."""
    model = _model()
    input_ids = torch.randint(3, VOCAB, (1, 10))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids[:, :-1], cache=cache, use_cache=True)
        step = model(input_ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, model(input_ids).logits[:, -1], rtol=0, atol=1e-5)
