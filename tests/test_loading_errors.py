"""Loading is transformers' own: the checkpoints' `from_pretrained` fails on a broken checkpoint exactly where
transformers' DeepseekV32 does, and missing and unexpected tensors are initialized or ignored and reported as it
reports them. The package's `load_checkpoint` (what its commands run) makes each failure one ValueError naming the
tensor and the file."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mla_dsa


@pytest.fixture(scope="module")
def checkpoint(ours_v32_topk4):
    return ours_v32_topk4  # read-only: every test edits a copy


def edited(checkpoint, tmp_path, edit):
    target = tmp_path / "bad"
    shutil.copytree(checkpoint, target)
    edit(target / "model.safetensors")
    return target


def rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: rewrite(p, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(3, 3)})),
         r"model\.safetensors: tensor model\.layers\.0\.self_attn\.kv_b_proj\.weight has shape \[3, 3\]"),
        (lambda p: os.truncate(p, os.path.getsize(p) - 1000), r"model\.safetensors: truncated or corrupt"),
        (lambda p: p.write_bytes(b"not a safetensors file"), r"model\.safetensors: truncated or corrupt"),
    ],
    ids=["shape", "truncated", "garbage"],
)  # fmt: skip
def test_broken_checkpoint_is_one_clear_error(checkpoint, tmp_path, edit, message):
    bad = edited(checkpoint, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as error:
        mla_dsa.load_checkpoint(bad)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "edit",
    [lambda p: rewrite(p, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(3, 3)})),
     lambda p: os.truncate(p, os.path.getsize(p) - 1000)],
    ids=["shape", "truncated"],
)  # fmt: skip
def test_from_pretrained_fails_where_transformers_deepseek_v32_fails(checkpoint, tmp_path, edit):
    import transformers

    bad = edited(checkpoint, tmp_path, edit)
    peer_dir = tmp_path / "peer"
    shutil.copytree(bad, peer_dir)
    (peer_dir / "config.json").write_text((peer_dir / "config.json").read_text().replace('"mla_dsa"', '"deepseek_v32"'))
    with pytest.raises(Exception) as theirs:
        transformers.DeepseekV32ForCausalLM.from_pretrained(peer_dir)
    with pytest.raises(type(theirs.value)) as ours:
        mla_dsa.MlaDsaForCausalLM.from_pretrained(bad)
    assert str(ours.value) == str(theirs.value)


def test_mismatch_can_be_tolerated_as_in_transformers(checkpoint, tmp_path):
    bad = edited(checkpoint, tmp_path, lambda p: rewrite(
        p, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(3, 3)})))  # fmt: skip
    model = mla_dsa.load_checkpoint(bad, ignore_mismatched_sizes=True)
    assert model.model.layers[0].self_attn.kv_b_proj.weight.shape[1] == model.config.kv_lora_rank


def test_sharded_checkpoint_names_the_shard(checkpoint, tmp_path):
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    os.truncate(shards[-1], os.path.getsize(shards[-1]) - 10)
    with pytest.raises(ValueError, match=rf"{shards[-1].name}: truncated or corrupt"):
        mla_dsa.load_checkpoint(sharded)
    shards[-1].unlink()
    with pytest.raises(ValueError, match=rf"{shards[-1].name}: weight file listed in the index is missing"):
        mla_dsa.load_checkpoint(sharded)


@pytest.mark.parametrize(
    ("edit", "missing", "unexpected"),
    [
        (lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"), {"model.layers.1.self_attn.o_proj.weight"}, set()),
        (lambda t: t.pop("model.layers.2.self_attn.indexer.wk.weight"),
         {"model.layers.2.self_attn.indexer.wk.weight"}, set()),
        (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}), set(),
         {"model.layers.0.self_attn.extra.weight"}),
    ],
    ids=["missing", "missing-indexer-tensor", "unexpected"],
)  # fmt: skip
def test_missing_and_unexpected_tensors_are_reported_as_transformers_does(checkpoint, tmp_path, edit, missing,
                                                                           unexpected):  # fmt: skip
    """As transformers' DeepseekV32 on the same edit: loaded, the gap initialized, both named in the loading info."""
    import transformers

    bad = edited(checkpoint, tmp_path, lambda p: rewrite(p, edit))
    model, info = mla_dsa.MlaDsaForCausalLM.from_pretrained(bad, output_loading_info=True)
    assert set(info["missing_keys"]) == missing and set(info["unexpected_keys"]) == unexpected
    _, checked_info = mla_dsa.load_checkpoint(bad, output_loading_info=True)
    assert checked_info == info
    peer_dir = tmp_path / "peer"
    shutil.copytree(checkpoint, peer_dir)
    (peer_dir / "config.json").write_text((peer_dir / "config.json").read_text().replace('"mla_dsa"', '"deepseek_v32"'))
    rewrite(peer_dir / "model.safetensors", edit)
    _, peer_info = transformers.DeepseekV32ForCausalLM.from_pretrained(peer_dir, output_loading_info=True)
    assert set(peer_info["missing_keys"]) == missing and set(peer_info["unexpected_keys"]) == unexpected
    for name in missing:
        assert not model.get_parameter(name).isnan().any() and model.get_parameter(name).abs().sum() > 0
