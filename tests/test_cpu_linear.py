"""`mla_dsa.use_onednn_linear`: float32 `nn.Linear` layers through oneDNN on CPU, equal to `F.linear` up to float32
rounding, on the oneDNN op where it applies (seen in the profiler) and on `F.linear` wherever it must not (autograd,
bfloat16), eager and compiled, on a whole model of ours and on a LoRA-wrapped one."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import StaticCache

from mla_dsa import MlaDsaConfig, MlaDsaForCausalLM, use_onednn_linear
from mla_dsa.cpu_linear import onednn_available

from peers import VOCAB

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")

ONEDNN_OP = "mkldnn::_linear_pointwise"
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              first_k_dense_replace=1, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
              index_n_heads=8, index_head_dim=32, index_topk=6, max_position_embeddings=512)  # fmt: skip


def _ops_run(function) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        function()
    return {event.key for event in profile.key_averages()}


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 32, bias=False))


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48)])
def test_onednn_linear_equals_f_linear_and_runs_on_onednn(shape):
    plain, fast = _layers(), _layers()
    assert use_onednn_linear(fast, min_weight_elements=0) == 2
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        assert ONEDNN_OP in _ops_run(lambda: fast(x))
        assert ONEDNN_OP not in _ops_run(lambda: plain(x))


def test_onednn_linear_leaves_autograd_and_bfloat16_to_f_linear():
    plain, fast = _layers(), _layers()
    use_onednn_linear(fast, min_weight_elements=0)
    x = torch.randn(4, 48)
    assert ONEDNN_OP not in _ops_run(lambda: fast(x).sum().backward())  # weights that need gradients
    plain(x).sum().backward()
    for ours, theirs in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    with torch.no_grad():
        bf16 = _layers().to(torch.bfloat16)
        assert use_onednn_linear(bf16, min_weight_elements=0) == 0
        half = _layers()
        use_onednn_linear(half, min_weight_elements=0)
        half.to(torch.bfloat16)  # cast after: each call checks the dtype
        assert torch.equal(half(x.bfloat16()), bf16(x.bfloat16()))


@pytest.mark.slow  # compiles a decode step: ~9 s
def test_onednn_linear_on_our_model_eager_and_compiled_decode():
    torch.manual_seed(0)
    model = MlaDsaForCausalLM(MlaDsaConfig(**CONFIG)).eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        patched = use_onednn_linear(model, min_weight_elements=0)
        assert patched == sum(type(module) is nn.Linear for module in model.modules())
        assert ONEDNN_OP in _ops_run(lambda: model(ids))
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)

        cache = StaticCache(config=model.config, max_cache_len=16)
        model(ids[:, :9], cache=cache, use_cache=True)
        torch._dynamo.reset()
        step = torch.compile(model.forward, fullgraph=True)
        with torch._inductor.config.patch(freezing=True):
            logits = step(ids[:, 9:], position_ids=torch.full((2, 1), 9), cache=cache, use_cache=True).logits
        torch._dynamo.reset()
        torch.testing.assert_close(logits[:, -1], want[:, -1], rtol=1e-4, atol=1e-4)


def test_onednn_linear_under_a_lora_adapter():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = MlaDsaForCausalLM(MlaDsaConfig(**CONFIG)).eval()
    config = peft.LoraConfig(r=4, target_modules=["q_b_proj", "o_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config).eval()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        use_onednn_linear(lora, min_weight_elements=0)  # the adapters' own Linear layers and the wrapped base layers
        torch.testing.assert_close(lora(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        assert ONEDNN_OP in _ops_run(lambda: lora(input_ids=ids))


def test_onednn_linear_on_a_tensor_subclass_weight_is_f_linear():
    """A weight that is not a plain tensor (a tensor-parallel DTensor shard, a quantized tensor) goes to F.linear."""

    class Marked(torch.Tensor):
        pass

    layer = nn.Linear(8, 4)
    use_onednn_linear(layer, min_weight_elements=0)
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Marked), requires_grad=False)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert ONEDNN_OP not in _ops_run(lambda: layer(x))
        torch.testing.assert_close(layer(x).as_subclass(torch.Tensor), F.linear(x, layer.weight, layer.bias)
                                   .as_subclass(torch.Tensor))  # fmt: skip


def test_onednn_linear_by_default_moves_every_layer_from_two_threads_and_none_on_one():
    """The default rule reads the thread count: on one thread MKL's decode step was the faster, from two oneDNN's
    with every layer moved (`mla_dsa.cpu_linear.ONEDNN_FROM_THREADS`)."""
    threads = torch.get_num_threads()
    small, large = nn.Linear(64, 64), nn.Linear(64, 4096, bias=False)
    model = nn.ModuleDict({"small": small, "large": large})
    x = torch.randn(1, 64)
    try:
        torch.set_num_threads(1)
        assert use_onednn_linear(model) == 0
        with torch.no_grad():
            assert ONEDNN_OP not in _ops_run(lambda: large(x))
        torch.set_num_threads(2)
        assert use_onednn_linear(model) == 2
        with torch.no_grad():
            assert ONEDNN_OP in _ops_run(lambda: small(x)) and ONEDNN_OP in _ops_run(lambda: large(x))
    finally:
        torch.set_num_threads(threads)


def test_onednn_linear_reports_a_wrong_input_width_as_f_linear_does():
    layer = nn.Linear(16, 8)
    use_onednn_linear(layer, min_weight_elements=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        layer(torch.randn(2, 12))
