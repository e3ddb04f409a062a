"""The package imports and a DeepSeek-V3.2 peer's logits are reproduced: the quickest signal that nothing is broken."""

import torch

import mla_dsa

from peers import left_padded_batch, save_peer


def test_public_api():
    for name in ("MlaDsaConfig", "MlaDsaForCausalLM", "MlaDsaModel", "MlaDsaCache"):
        assert hasattr(mla_dsa, name)


def test_v32_logits_match(tmp_path):
    peer = save_peer("deepseek_v32", tmp_path)
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        expected = peer(input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)
