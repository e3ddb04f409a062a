"""Defects a transformers user hit (issue 12), each pinned where it was fixed: gradient checkpointing with a cache,
validation that from_pretrained overrides and the CLI could bypass, the CLI's one-line errors, the public names."""

import pytest
import torch

import mla_dsa
from mla_dsa.cli import main as cli
from mla_dsa.data import stdlib_files
from mla_dsa.modeling.compat_mla_dsa import CACHE_NAME

from peers import save_peer

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = [str(stdlib_files("train")[0])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("v32")
    return save_peer("deepseek_v32", directory, index_topk=5), directory


def test_gradient_checkpointing_with_use_cache_trains_as_the_peer(saved):
    """transformers' DeepseekV32: one warning, use_cache turned off, no cache returned; the loss and its gradients are
    those of an unchecked step (a cache passed positionally used to raise CheckpointError in backward)."""
    peer, directory = saved
    input_ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, model in (("peer", peer), ("ours", mla_dsa.MlaDsaForCausalLM.from_pretrained(directory))):
        model.gradient_checkpointing_enable()
        model.train()
        out = model(input_ids, labels=input_ids, use_cache=True)
        out.loss.backward()
        results[name] = (out.loss.detach(), getattr(out, CACHE_NAME), model.lm_head.weight.grad.clone())
        model.gradient_checkpointing_disable()
        model.zero_grad()
        model.eval()
    (peer_loss, peer_cache, peer_grad), (loss, cache, grad) = results["peer"], results["ours"]
    assert peer_cache is None and cache is None
    torch.testing.assert_close(loss, peer_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, peer_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("override", [{"index_topk": -1}, {"index_topk": 0}, {"kv_lora_rank": 0},
                                      {"attention_mode": "fast"}, {"indexer_loss": "kl"}])  # fmt: skip
def test_from_pretrained_overrides_are_validated(saved, override):
    _, directory = saved
    name = next(iter(override))
    with pytest.raises(ValueError, match=name):
        mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, **override)
    with pytest.raises(ValueError, match=name):
        mla_dsa.MlaDsaConfig.from_pretrained(directory, **override)


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "SRC", "DST", "--index-topk", "0"],
        ["convert", "SRC", "DST", "--index-topk", "-3"],
        ["convert", "SRC", "DST", "--max-shard-size", "0"],
        ["convert", "SRC", "DST", "--max-shard-size", "lots"],
        ["train-indexer", "SRC", "--stage", "dense", "--data", "x", "--out", "DST", "--batch-size", "0"],
        ["train-indexer", "SRC", "--stage", "dense", "--data", "x", "--out", "DST", "--seq-len", "-1"],
        ["train-indexer", "SRC", "--stage", "dense", "--data", "x", "--out", "DST", "--index-topk", "0"],
        ["eval", "SRC", "--data", "x", "--batch-size", "0"],
        ["eval", "SRC", "--data", "x", "--windows", "two"],
    ],
    ids=lambda argv: " ".join(argv[:1] + argv[-2:]),
)
def test_bad_numbers_on_the_command_line_stop_before_any_work(saved, tmp_path, capsys, argv):
    _, directory = saved
    argv = [str(directory) if a == "SRC" else str(tmp_path / "dst") if a == "DST" else a for a in argv]
    with pytest.raises(SystemExit) as stopped:
        cli(argv)
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    assert "must be a positive" in err.splitlines()[-1], err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("command", ["eval", "train-indexer"])
def test_a_missing_checkpoint_is_one_line(tmp_path, capsys, command):
    argv = [command, str(tmp_path / "nowhere"), "--data", *DATA]
    if command == "train-indexer":
        argv += ["--stage", "dense", "--out", str(tmp_path / "out")]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err and "no such checkpoint" in err, err
    assert not (tmp_path / "out").exists()


def test_the_documented_names_are_at_the_top_level():
    from mla_dsa import training

    for name in ("prepare_indexer_training", "finish_indexer_training", "indexer_lora_config"):
        assert getattr(mla_dsa, name) is getattr(training, name) and name in mla_dsa.__all__
    for name in ("convert_checkpoint", "upgrade_code", "MlaDsaConfig", "MlaDsaForCausalLM", "MlaDsaModel",
                 "MlaDsaCache", "MlaDsaCacheLayer"):  # fmt: skip
        assert hasattr(mla_dsa, name) and name in mla_dsa.__all__
    with pytest.raises(AttributeError):
        mla_dsa.no_such_name  # noqa: B018


def test_a_dense_only_deepseek_config_loads_and_converts(tmp_path):
    """transformers' DeepseekV3 with every layer dense keeps its MoE defaults (n_group=8 with 4 routed experts) and
    runs; so does ours, and the converter takes it. Routing fields are still checked where a layer routes."""
    peer = save_peer("deepseek_v3", tmp_path / "dense", first_k_dense_replace=3, n_routed_experts=4, n_group=8,
                     topk_group=4)  # fmt: skip
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "dense", use_sparse_attention=False).eval()
    input_ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, peer(input_ids).logits, atol=1e-4, rtol=0)
    mla_dsa.convert_checkpoint(tmp_path / "dense", tmp_path / "dsa", progress=False)
    assert mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "dsa").config.n_group == 8
    with pytest.raises(ValueError, match="n_group"):
        mla_dsa.MlaDsaConfig(
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=8
        )
