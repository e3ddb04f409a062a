"""The routed experts live in transformers' fused layout inside the model, while checkpoints keep DeepSeek's
per-expert tensor names: what we save is what transformers' own DeepSeek classes (and the Hub) read."""

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3ForCausalLM

import mla_dsa

from peers import VOCAB, save_peer


def _names(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    peer = save_peer("deepseek_v3", root / "peer")
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(root / "peer").eval()
    ours.save_pretrained(root / "ours")
    return peer, ours, root


def test_experts_are_fused_in_the_model(saved):
    _, ours, _ = saved
    experts = ours.model.layers[1].mlp.experts
    config = ours.config
    assert experts.gate_up_proj.shape == (config.n_routed_experts, 2 * config.moe_intermediate_size, config.hidden_size)
    assert experts.down_proj.shape == (config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)


def test_saved_checkpoint_has_the_per_expert_names_and_loads_in_transformers(saved):
    peer, ours, root = saved
    written = _names(root / "ours")
    assert written - {n for n in written if ".self_attn.indexer." in n} == _names(root / "peer")
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in written
    # transformers' own DeepseekV3 reads our checkpoint (ignoring the indexer) and computes what we compute densely.
    theirs = DeepseekV3ForCausalLM.from_pretrained(root / "ours").eval()
    reloaded = mla_dsa.MlaDsaForCausalLM.from_pretrained(root / "ours").eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peer(ids).logits
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded(ids, use_sparse_attention=False).logits, expected, atol=1e-4, rtol=0)
