"""`mla-dsa upgrade-code DIR` repairs a checkpoint written by an older release: new code, same weights.

The 0.1.0 checkpoint is made with the 0.1.0 payload, kept as it was released in tests/fixtures/payload-0.1.0/. On
transformers 5.24+ that code decodes every step on an empty cache (it knows only `past_key_values`); after the
upgrade the same weight files generate the peer's tokens through trust_remote_code. The 0.5.0 payload
(tests/fixtures/payload-0.5.0/, the last before the indexer loss left the checkpoints' code) generates them before and
after, and its file that the payload no longer has is removed.
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mla_dsa
from mla_dsa.cli import main as cli
from mla_dsa.conversion.payload import payload_files
from mla_dsa.modeling.configuration_mla_dsa import PAYLOAD_VERSION, PAYLOAD_VERSION_KEY
from mla_dsa.modeling.modeling_mla_dsa import DEPRECATED_CACHE_NAME

from peers import save_peer

OLD_PAYLOAD = Path(__file__).parent / "fixtures" / "payload-0.1.0"
PAYLOAD_0_5_0 = Path(__file__).parent / "fixtures" / "payload-0.5.0"
NEW_TOKENS = 8

GENERATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import mla_dsa  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("mla_dsa must not be importable here")
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)
    print("TOKENS " + json.dumps(tokens[:, ids.shape[1]:].tolist()))
    """
)


def run_remotely(script: str, args: list[str], tmp_path: Path) -> str:
    """stdout of `script` run with `args` in an interpreter that cannot import mla_dsa."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "mla_dsa.py").write_text("raise ImportError('mla_dsa is blocked here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(blocker), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def generate_remotely(checkpoint: Path, ids: torch.Tensor, tmp_path: Path) -> list[list[int]]:
    """Greedy tokens from `checkpoint`'s own code, in an interpreter that cannot import mla_dsa."""
    stdout = run_remotely(GENERATE_SCRIPT, [str(checkpoint), json.dumps(ids.tolist()), str(NEW_TOKENS)], tmp_path)
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("TOKENS "))[7:])


def with_old_payload(directory: Path, payload: Path, version: str | None) -> Path:
    """A checkpoint as an older release wrote it: that release's payload files (kept in tests/fixtures) in place of
    the current ones, and its version stamp in config.json (0.1.0 wrote none: `version` None)."""
    for path in directory.glob("*.py"):
        path.unlink()
    for path in payload.glob("*.py"):
        shutil.copyfile(path, directory / path.name)
    config = json.loads((directory / "config.json").read_text())
    config.pop(PAYLOAD_VERSION_KEY)
    (directory / "config.json").write_text(json.dumps(config | ({PAYLOAD_VERSION_KEY: version} if version else {}),
                                                      indent=2))  # fmt: skip
    return directory


def make_0_1_0_checkpoint(directory: Path) -> Path:
    return with_old_payload(directory, OLD_PAYLOAD, None)


def make_0_5_0_checkpoint(directory: Path) -> Path:
    return with_old_payload(directory, PAYLOAD_0_5_0, "0.5.0")


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file that is not code or config.json: the weights and everything beside them."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix != ".py" and path.name != "config.json"
    }


@pytest.fixture
def old_checkpoint(tmp_path):
    peer = save_peer("deepseek_v32", tmp_path / "peer", index_topk=5)
    checkpoint = tmp_path / "ckpt"
    mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "peer").save_pretrained(checkpoint)
    return peer, make_0_1_0_checkpoint(checkpoint)


@pytest.mark.compat
@pytest.mark.slow  # a fresh interpreter loads the checkpoint (about 10 s)
def test_upgrade_code_repairs_a_0_1_0_checkpoint(old_checkpoint, tmp_path, capsys):
    peer, checkpoint = old_checkpoint
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peer.generate(ids, use_cache=False, max_new_tokens=NEW_TOKENS, do_sample=False)[:, 12:].tolist()
    weights_before = file_hashes(checkpoint)
    assert "model.safetensors" in weights_before
    if DEPRECATED_CACHE_NAME is not None:  # transformers >= 5.24: the 0.1.0 code decodes on an empty cache
        assert generate_remotely(checkpoint, ids, tmp_path) != expected

    assert cli(["upgrade-code", str(checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "modeling_mla_dsa.py" in printed and "attention_mla_dsa.py (removed)" in printed
    assert file_hashes(checkpoint) == weights_before
    for source in payload_files():
        assert (checkpoint / source.name).read_bytes() == source.read_bytes(), source.name
    assert {path.name for path in checkpoint.glob("*.py")} == {path.name for path in payload_files()}
    config = json.loads((checkpoint / "config.json").read_text())
    assert config[PAYLOAD_VERSION_KEY] == PAYLOAD_VERSION
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mla_dsa.MlaDsaForCausalLM"
    assert not list(checkpoint.glob(".*mla-dsa-upgrade"))  # no temporary file left
    assert generate_remotely(checkpoint, ids, tmp_path) == expected

    assert cli(["upgrade-code", str(checkpoint)]) == 0  # a second run changes nothing
    assert "already current" in capsys.readouterr().out


def test_loading_an_older_checkpoint_names_the_command_once(old_checkpoint, caplog):
    _, checkpoint = old_checkpoint
    with caplog.at_level(logging.WARNING):
        mla_dsa.load_checkpoint(checkpoint)
        mla_dsa.load_checkpoint(checkpoint)
    hints = [r.getMessage() for r in caplog.records if "upgrade-code" in r.getMessage()]
    assert len(hints) == 1 and f"mla-dsa upgrade-code {checkpoint}" in hints[0] and "0.1.0" in hints[0], hints
    cli(["upgrade-code", str(checkpoint)])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mla_dsa.load_checkpoint(checkpoint)
    assert not [r for r in caplog.records if "upgrade-code" in r.getMessage()]


def test_a_checkpoint_saved_now_records_its_code_version(old_checkpoint, tmp_path):
    _, checkpoint = old_checkpoint
    resaved = tmp_path / "resaved"
    mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint).save_pretrained(resaved)
    assert json.loads((resaved / "config.json").read_text())[PAYLOAD_VERSION_KEY] == PAYLOAD_VERSION


def test_upgrade_code_refuses_what_it_did_not_write(tmp_path, capsys):
    assert cli(["upgrade-code", str(tmp_path / "missing")]) == 1
    assert "no config.json" in capsys.readouterr().err
    save_peer("deepseek_v3", tmp_path / "dense")
    before = file_hashes(tmp_path / "dense")
    assert cli(["upgrade-code", str(tmp_path / "dense")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "deepseek_v3" in err and "mla-dsa convert" in err, err
    assert file_hashes(tmp_path / "dense") == before and not list((tmp_path / "dense").glob("*.py"))


@pytest.mark.slow  # a fresh interpreter loads the checkpoint twice (about 20 s)
def test_upgrade_code_moves_a_0_5_0_checkpoint_to_the_new_payload(tmp_path, capsys):
    peer = save_peer("deepseek_v32", tmp_path / "peer", index_topk=5)
    checkpoint = tmp_path / "ckpt"
    mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "peer").save_pretrained(checkpoint)
    make_0_5_0_checkpoint(checkpoint)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peer.generate(ids, use_cache=False, max_new_tokens=NEW_TOKENS, do_sample=False)[:, 12:].tolist()
    assert generate_remotely(checkpoint, ids, tmp_path) == expected
    weights_before = file_hashes(checkpoint)

    assert cli(["upgrade-code", str(checkpoint)]) == 0
    assert "indexer_loss_mla_dsa.py (removed)" in capsys.readouterr().out
    assert not (checkpoint / "indexer_loss_mla_dsa.py").exists()
    assert {path.name for path in checkpoint.glob("*.py")} == {path.name for path in payload_files()}
    assert file_hashes(checkpoint) == weights_before
    assert json.loads((checkpoint / "config.json").read_text())[PAYLOAD_VERSION_KEY] == PAYLOAD_VERSION
    assert generate_remotely(checkpoint, ids, tmp_path) == expected


SIDE_BY_SIDE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM

    old_dir, other_dir, current_dir, ids, new_tokens = sys.argv[1:6]
    ids = torch.tensor(json.loads(ids))


    def greedy(model):
        return model.generate(ids, max_new_tokens=int(new_tokens), do_sample=False)[:, ids.shape[1]:].tolist()


    old = AutoModelForCausalLM.from_pretrained(old_dir, trust_remote_code=True).eval()
    result = {"old_first": greedy(old)}
    other = AutoModelForCausalLM.from_pretrained(other_dir, trust_remote_code=True).eval()
    current = AutoModelForCausalLM.from_pretrained(current_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        result["current_logits"] = current(ids, attention_mode="absorbed").logits.tolist()
    result |= {"current": greedy(current), "old_again": greedy(old), "other": greedy(other)}
    print("RESULT " + json.dumps(result))
    """
)

# Appended to a copy of the payload: a release whose plain attention and index scoring differ from this one's, which
# registers them under the shared names and runs whatever the registry holds, as releases up to 0.7.8 did.
OTHER_RELEASE = """

from transformers import AttentionInterface as _Registry


def registered_or_own(name, own):
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, own)


def _other_index_scores(queries, weights, keys, softmax_scale):
    return -index_scores(queries, weights, keys, softmax_scale)


def _other_absorbed_attention(module, query, *args, **kwargs):
    return absorbed_attention_forward(module, query * 0.5, *args, **kwargs)


_Registry.register(INDEX_SCORES, _other_index_scores)
_Registry.register(ABSORBED_ATTENTION, _other_absorbed_attention)
"""


@pytest.mark.compat
@pytest.mark.slow  # a fresh interpreter loads three checkpoints (about 11 s)
def test_checkpoints_of_different_releases_in_one_process_each_run_their_own_code(tmp_path):
    """A model and its assistant, a base beside its fine-tune: checkpoints written by different releases, loaded in
    one process, each run their own code. Found by a probe: a 0.5.0 model loaded first stopped generating once a
    0.7.8 checkpoint was loaded (the newer code took over the cache layer type its config names, and the old model
    refused the newer layers), and the first checkpoint loaded supplied the absorbed attention and index scoring of
    every later one (a 0.7.0 checkpoint's, without dropout, for 0.7.8 models)."""
    peer = save_peer("deepseek_v32", tmp_path / "peer", index_topk=5)
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "peer").eval()
    for name in ("old", "other", "current"):
        ours.save_pretrained(tmp_path / name)
    make_0_5_0_checkpoint(tmp_path / "old")
    modeling = tmp_path / "other" / "modeling_mla_dsa.py"
    modeling.write_text(modeling.read_text() + OTHER_RELEASE)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peer.generate(ids, use_cache=False, max_new_tokens=NEW_TOKENS, do_sample=False)[:, 12:].tolist()
        expected_logits = ours(ids, attention_mode="absorbed").logits

    args = [str(tmp_path / name) for name in ("old", "other", "current")] + [json.dumps(ids.tolist()), str(NEW_TOKENS)]
    stdout = run_remotely(SIDE_BY_SIDE_SCRIPT, args, tmp_path)
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["old_first"] == result["old_again"] == result["current"] == expected, result
    torch.testing.assert_close(torch.tensor(result["current_logits"]), expected_logits, rtol=0, atol=1e-5)
    assert result["other"] != expected  # the other release does run its own (different) code
