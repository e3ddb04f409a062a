"""PEFT adapter state reaches absorbed (MQA) decoding: LoRA on `kv_b_proj` folds into W_UK / W_UV there, and the folded
weight must follow `disable_adapter()`, `set_adapter()` and merges, none of which changes a parameter.

Wrong answers here are silent: a DPO reference model under `disable_adapter()`, or an A/B comparison of two adapters,
would decode with whichever adapter the absorbed weight was first computed for.
"""

import pytest
import torch

import mla_dsa

from peers import left_padded_batch

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def checkpoint(v32_checkpoint):
    return v32_checkpoint  # the session's (conftest.py)


def lora(seed: int):
    torch.manual_seed(seed)  # init_lora_weights=False draws A and B at random: each adapter really changes kv_b_proj
    return peft.LoraConfig(target_modules=["kv_b_proj"], r=4, lora_alpha=8, init_lora_weights=False)


@pytest.fixture(scope="module")
def models(checkpoint):
    base = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint).eval()
    peft_model = peft.get_peft_model(mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint), lora(1), "first")
    peft_model.add_adapter("second", lora(2))
    return base, peft_model.eval()


def logits(model, input_ids, attention_mask, mode: str) -> torch.Tensor:
    config = model.config if isinstance(model, mla_dsa.MlaDsaForCausalLM) else model.base_model.model.config
    config.attention_mode = mode
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        config.attention_mode = "auto"


def generate(model, input_ids, attention_mask) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)


def test_disable_and_switch_adapters_reach_absorbed_decoding(models):
    base, peft_model = models
    input_ids, attention_mask = left_padded_batch()
    real = attention_mask.bool()
    base_tokens = generate(base, input_ids, attention_mask)
    base_logits = logits(base, input_ids, attention_mask, "absorbed")

    seen = {}
    for adapter in ("first", "second", "first"):
        peft_model.set_adapter(adapter)
        absorbed = logits(peft_model, input_ids, attention_mask, "absorbed")
        mha = logits(peft_model, input_ids, attention_mask, "mha")
        torch.testing.assert_close(absorbed[real], mha[real], atol=1e-4, rtol=0)
        assert (absorbed[real] - base_logits[real]).abs().max() > 1e-2  # the adapter changes the model
        seen.setdefault(adapter, (absorbed, generate(peft_model, input_ids, attention_mask)))
        torch.testing.assert_close(absorbed, seen[adapter][0], atol=0, rtol=0)  # switching back restores it
        with peft_model.disable_adapter():
            torch.testing.assert_close(logits(peft_model, input_ids, attention_mask, "absorbed"), base_logits,
                                       atol=1e-5, rtol=0)  # fmt: skip
            assert torch.equal(generate(peft_model, input_ids, attention_mask), base_tokens)
    assert (seen["first"][0][real] - seen["second"][0][real]).abs().max() > 1e-2
    assert not torch.equal(seen["first"][1], seen["second"][1])  # set_adapter switches what decoding uses


def test_merge_and_unmerge_reach_absorbed_decoding(models):
    base, peft_model = models
    input_ids, attention_mask = left_padded_batch()
    peft_model.set_adapter("first")
    active = logits(peft_model, input_ids, attention_mask, "absorbed")
    lora_layer = peft_model.base_model.model.model.layers[0].self_attn.kv_b_proj
    lora_layer.merge(adapter_names=["first"])
    try:
        torch.testing.assert_close(logits(peft_model, input_ids, attention_mask, "absorbed"), active, atol=1e-5, rtol=0)
    finally:
        lora_layer.unmerge()
    torch.testing.assert_close(logits(peft_model, input_ids, attention_mask, "absorbed"), active, atol=1e-5, rtol=0)


def test_lora_on_bitsandbytes_4bit_weights_reaches_absorbed_attention_in_training_and_decoding(checkpoint):
    """QLoRA: LoRA over bitsandbytes' 4-bit `kv_b_proj` (integer weights it dequantizes itself). The absorbed attention
    evaluates the wrapped layer on an identity: of the base weight's storage dtype (uint8) it was garbage, and the
    trained model's absorbed and MHA logits differed by 8 with no error. Both modes now give the same logits and
    loss, and the adapter gets the same gradient through either."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True)
    base = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=torch.float32)
    for module in base.modules():  # bitsandbytes 0.50's AVX512-BF16 4-bit kernel needs sizes in multiples of 64
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = peft.get_peft_model(base, lora(3))
    input_ids, attention_mask = left_padded_batch()
    real = attention_mask.bool()
    torch.testing.assert_close(logits(model, input_ids, attention_mask, "absorbed")[real],
                               logits(model, input_ids, attention_mask, "mha")[real], atol=1e-4, rtol=0)  # fmt: skip
    losses, grads = {}, {}
    for mode in ("absorbed", "mha"):
        model.zero_grad()
        labels = input_ids.masked_fill(~real, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, attention_mode=mode).loss
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])
    assert losses["absorbed"] == pytest.approx(losses["mha"], rel=1e-5)
    assert grads["mha"].abs().max() > 0
    torch.testing.assert_close(grads["absorbed"], grads["mha"], atol=1e-5 * grads["mha"].abs().max().item(), rtol=0)


PEFT_METHODS = {
    "prompt-tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "dora": lambda: peft.LoraConfig(
        task_type="CAUSAL_LM", target_modules=["kv_b_proj", "q_b_proj"], use_dora=True, init_lora_weights=False
    ),  # fmt: skip
    "ia3": lambda: peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["kv_b_proj", "o_proj"], feedforward_modules=["o_proj"]
    ),  # fmt: skip
}


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_peft_methods_besides_lora_train_and_decode_in_both_attention_modes(checkpoint, method):
    """Virtual tokens (prompt tuning, P-tuning) and other adapters on the attention's projections (DoRA, IA3): a
    training step reaches the adapter, the absorbed attention gives the MHA logits, and cached decoding gives what
    recomputation does."""
    model = peft.get_peft_model(mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint), PEFT_METHODS[method]())
    input_ids, attention_mask = left_padded_batch()
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids.masked_fill(attention_mask == 0, -100)
          ).loss.backward()  # fmt: skip
    trained = [param.grad for param in model.parameters() if param.requires_grad]
    assert trained and all(grad is not None for grad in trained) and any(grad.abs().max() > 0 for grad in trained)
    model.eval()
    real = attention_mask.bool()
    absorbed = logits(model, input_ids, attention_mask, "absorbed")[:, -1]
    torch.testing.assert_close(absorbed, logits(model, input_ids, attention_mask, "mha")[:, -1], atol=1e-5, rtol=0)
    assert real[:, -1].all()
    tokens = generate(model, input_ids, attention_mask)
    with torch.no_grad():
        recomputed = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **GREEDY)
    assert torch.equal(tokens, recomputed)


def test_prefix_tuning_is_refused_in_one_error(checkpoint):
    """PEFT's prefix tuning hands the model a DynamicCache of per-head keys and values; ours caches latent rows and
    indexer keys, which such a prefix does not have: one error naming the caches the model takes."""
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint), config)
    input_ids, attention_mask = left_padded_batch()
    with pytest.raises(ValueError, match="MlaDsaCache"):
        model(input_ids=input_ids, attention_mask=attention_mask)
