"""The package imports and a DeepSeek-V3.2 peer's logits are reproduced: the quickest signal that nothing is broken."""

import pytest
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


def test_the_documented_names_are_at_the_top_level():
    from mla_dsa import training

    for name in ("prepare_indexer_training", "indexer_lora_config"):
        assert getattr(mla_dsa, name) is getattr(training, name) and name in mla_dsa.__all__
    for name in ("convert_checkpoint", "upgrade_code", "MlaDsaConfig", "MlaDsaForCausalLM", "MlaDsaModel",
                 "MlaDsaCache", "MlaDsaCacheLayer"):  # fmt: skip
        assert hasattr(mla_dsa, name) and name in mla_dsa.__all__
    with pytest.raises(AttributeError):
        mla_dsa.no_such_name  # noqa: B018


def test_every_lazily_loaded_name_resolves_and_is_public():
    for name in mla_dsa._NAMES:
        assert getattr(mla_dsa, name) is not None and name in mla_dsa.__all__
    assert mla_dsa.__version__ == mla_dsa.PAYLOAD_VERSION
