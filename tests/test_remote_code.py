"""trust_remote_code: a checkpoint we write loads, and computes the same logits, where mla-dsa cannot be imported.

The payload (modeling/*.py) is copied beside the weights by `save_pretrained`; a fresh, isolated interpreter with the
`mla_dsa` package blocked loads it through the Auto classes, and re-saves it. The payload's imports are checked
statically (save_pretrained copies only files reached by relative imports, and trust_remote_code can import only
what the target machine has: torch and transformers), and loading a dense DeepSeek-V3 checkpoint reports the missing
indexer in exactly one warning of ours.
"""

import ast
import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import mla_dsa
from mla_dsa.conversion.payload import payload_files

from peers import VOCAB, build_peer, save_peer

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELING_DIR = REPO_ROOT / "modeling"
# safetensors and huggingface_hub: requirements of transformers itself (safe_open validates weight files; `strict`
# runs config validation, as in transformers' own configs).
ALLOWED_ROOTS = {"torch", "transformers", "safetensors", "huggingface_hub"} | set(sys.stdlib_module_names)
PAYLOAD = {path.name for path in payload_files()}


@pytest.fixture(scope="module")
def input_ids():
    generator = torch.Generator().manual_seed(3)
    return torch.randint(3, VOCAB, (2, 10), generator=generator)


@pytest.fixture(scope="module")
def saved(ours_v32_topk4):
    """(our model, the directory it saved itself to) from a DeepSeek-V3.2 peer with DSA active at 10 tokens."""
    return mla_dsa.MlaDsaForCausalLM.from_pretrained(ours_v32_topk4).eval(), ours_v32_topk4


# ------------------------------------------------------------------------------------------------ the payload
def test_save_pretrained_writes_payload(saved):
    """What save_pretrained copies (transformers' own rule) is the one payload list, and nothing in modeling/ is
    left out of it: a new file there is either imported by the payload or does not belong there."""
    _, checkpoint = saved
    assert PAYLOAD == {path.name for path in MODELING_DIR.glob("*.py")} - {"__init__.py"}
    written = {path.name for path in checkpoint.glob("*.py")}
    assert written == PAYLOAD
    for name in PAYLOAD:
        assert (checkpoint / name).read_bytes() == (MODELING_DIR / name).read_bytes(), name
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "mla_dsa"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mla_dsa.MlaDsaConfig",
        "AutoModel": "modeling_mla_dsa.MlaDsaModel",
        "AutoModelForCausalLM": "modeling_mla_dsa.MlaDsaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_mla_dsa.MlaDsaForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_mla_dsa.MlaDsaForTokenClassification",
    }
    for target in config["auto_map"].values():
        module, cls = target.split(".")
        assert f"class {cls}(" in (checkpoint / f"{module}.py").read_text()


# The underscored names transformers documents for model authors to set or override (its own models do): class
# attributes that steer loading, device placement and saving, the weight-init hook, the attention switch, and what
# output capture records.
TRANSFORMERS_AUTHOR_HOOKS = {
    "_auto_class", "_no_split_modules", "_skip_keys_device_placement", "_supports_sdpa",
    "_keep_in_fp32_modules_strict", "_keep_in_fp32_modules",
    "_tied_weights_keys", "_keys_to_ignore_on_load_unexpected", "_init_weights",
    "_attn_implementation", "_layer_type", "_tp_plan", "_can_record_outputs",
}  # fmt: skip


def _private_uses(path: Path) -> list[str]:
    """Every place `path` reaches a private name of a dependency: an underscored name imported from torch,
    transformers or safetensors (or from a private module of theirs), an underscored attribute of an imported
    module or of `super()`, an underscored attribute name given to getattr, or an underscored class attribute
    that is not one of transformers' documented hooks."""
    tree = ast.parse(path.read_text())
    modules = set()  # names bound to imported dependency modules: torch, nn, F, init, logging, ...
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            private_module = any(part.startswith("_") for part in node.module.split("."))
            for alias in node.names:
                if private_module or alias.name.startswith("_"):
                    uses.append(f"{path.name}:{node.lineno} from {node.module} import {alias.name}")
                elif alias.name[0].islower() and not alias.name.isupper():  # a module or function, not a class
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base.split(".")[0] in modules or base == "super()":
                name = f"{base}.{node.attr}"
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr", "setattr"):
            literal = node.args[1] if len(node.args) > 1 else None
            if isinstance(literal, ast.Constant) and str(literal.value).startswith("_"):
                name = f"{ast.unparse(node.func)}(..., {literal.value!r})"
                name = None if literal.value in TRANSFORMERS_AUTHOR_HOOKS else name
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                targets = item.targets if isinstance(item, ast.Assign) else []
                for target in targets:
                    if isinstance(target, ast.Name) and target.id.startswith("_") and not target.id.startswith("__"):
                        if target.id not in TRANSFORMERS_AUTHOR_HOOKS:
                            uses.append(f"{path.name}:{item.lineno} class attribute {target.id}")
        if name is not None and name.rsplit(".", 1)[-1] not in TRANSFORMERS_AUTHOR_HOOKS:
            uses.append(f"{path.name}:{node.lineno} {name}")
    return uses


def test_private_name_scan_sees_what_it_must(tmp_path):
    """The scan below must catch each kind of private use (or it proves nothing)."""
    probe = tmp_path / "probe_mla_dsa.py"
    probe.write_text(
        textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from transformers.utils import _private_helper
        from transformers.models.deepseek_v32 import modeling_deepseek_v32
        class Model:
            _private_flag = True
            _auto_class = "AutoModel"
            def f(self, x):
                super()._private_method()
                getattr(x, "_hidden", None)
                modeling_deepseek_v32._inner(x)
                return torch._safe_softmax(x, -1) + F._canonical_mask(x)
    """)
    )
    found = " ".join(_private_uses(probe))
    for expected in ("_private_helper", "_private_flag", "super()._private_method", "'_hidden'",
                     "modeling_deepseek_v32._inner", "torch._safe_softmax", "F._canonical_mask"):  # fmt: skip
        assert expected in found, expected
    assert "_auto_class" not in found


@pytest.mark.parametrize("path", sorted(MODELING_DIR.glob("*.py")), ids=lambda p: p.name)
def test_payload_uses_only_public_names_of_its_dependencies(path):
    """The payload is frozen into every checkpoint; a private name of torch or transformers may change in any
    release and break checkpoints already written."""
    assert _private_uses(path) == []


@pytest.mark.parametrize("path", sorted(MODELING_DIR.glob("*.py")), ids=lambda p: p.name)
def test_payload_imports_only_torch_transformers_stdlib_and_siblings(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # function bodies included: remote-code checks walk them too
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                assert root in ALLOWED_ROOTS, f"{path.name}:{node.lineno} imports {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                root = node.module.split(".")[0]
                assert root in ALLOWED_ROOTS, f"{path.name}:{node.lineno} imports from {node.module}"
                continue
            # `from . import x` and `from ..x import` are not followed by save_pretrained.
            assert node.module is not None, f"{path.name}:{node.lineno} uses `from . import ...`"
            assert node.level == 1, f"{path.name}:{node.lineno} imports from a parent package"
            assert (MODELING_DIR / f"{node.module}.py").is_file(), f"{path.name}:{node.lineno}: no {node.module}.py"


# ------------------------------------------------------------------------------------- isolated remote loading
REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import os
    import sys

    checkpoint, expected_path, repo_root, resaved = sys.argv[1:5]


    class BlockMlaDsa(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mla_dsa" or name.startswith("mla_dsa."):
                raise ImportError(f"{name} is blocked in this interpreter")
            return None


    # The repo's own source folders (a virtualenv inside the checkout is not the repo's source).
    sources = [os.path.join(repo_root, folder) for folder in ("modeling", "mla_dsa", "conversion")]


    def from_repo(path):
        path = os.path.realpath(path)
        return path == repo_root or any(path == s or path.startswith(s + os.sep) for s in sources)


    sys.meta_path.insert(0, BlockMlaDsa())
    assert not any(from_repo(entry) for entry in sys.path), sys.path
    try:
        import mla_dsa  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("mla_dsa must not be importable here")

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    expected = torch.load(expected_path, weights_only=True)
    ids = expected["input_ids"]

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    with open(expected_path + ".config.json") as f:
        expected_config = json.load(f)
    got_config = {k: v for k, v in config.to_dict().items() if k in expected_config}
    assert got_config == expected_config, (got_config, expected_config)

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
        hidden = base(ids).last_hidden_state
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    # The output field is `cache` from transformers 5.24 on, `past_key_values` before.
    cache = generated["cache"] if "cache" in generated else generated["past_key_values"]
    cache_class = type(cache.layers[0])
    generated = generated.sequences
    # The same computation in two processes, equal up to float32 rounding: even in one process the same model's logits
    # moved by 6e-7 across an in-process `mla-dsa eval` (CPU BLAS kernels' rounding follows their buffers' alignment),
    # and this comparison by 1.2e-6 when test_cli_errors ran first.
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden, expected["hidden"], rtol=0, atol=1e-5)
    assert torch.equal(generated, expected["generated"]), (generated, expected["generated"])

    model.save_pretrained(resaved)
    again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected["logits"], rtol=0, atol=1e-5)
    # Two checkpoints' code side by side, each a module of its own (transformers keeps one cache layer class per layer
    # type): each model still generates on its own module's cache layers.
    assert type(again).__module__ != type(model).__module__
    for each in (model, again, model):
        assert torch.equal(each.generate(ids, max_new_tokens=4, do_sample=False), expected["generated"])

    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    heads = {}
    for name, auto in (("seq_cls", AutoModelForSequenceClassification), ("tok_cls", AutoModelForTokenClassification)):
        head = auto.from_pretrained(checkpoint, trust_remote_code=True, num_labels=3).eval()
        with torch.no_grad():
            scores = head(ids).logits
        head.save_pretrained(resaved + "-" + name)
        reloaded = auto.from_pretrained(resaved + "-" + name, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, scores, rtol=0, atol=1e-6)
        heads[name] = [type(reloaded).__name__, type(reloaded).__module__]

    loaded_from_repo = sorted(
        name for name, module in sys.modules.items()
        if getattr(module, "__file__", None) and from_repo(module.__file__)
    )
    print("REPORT " + json.dumps({
        "config": [type(config).__name__, type(config).__module__],
        "causal_lm": [type(model).__name__, type(model).__module__],
        "base": [type(base).__name__, type(base).__module__],
        "resaved": [type(again).__name__, type(again).__module__],
        **heads,
        "cache": [cache_class.__name__, cache_class.__module__],
        "mla_dsa_modules": sorted(name for name in sys.modules if name.split(".")[0] == "mla_dsa"),
        "loaded_from_repo": loaded_from_repo,
    }))
    """
)


@pytest.mark.compat
@pytest.mark.slow  # a fresh interpreter loads the checkpoint (about 10 s)
def test_isolated_interpreter_loads_with_trust_remote_code(saved, input_ids, tmp_path):
    model, checkpoint = saved
    with torch.no_grad():
        expected = {
            "input_ids": input_ids,
            "logits": model(input_ids).logits,
            "hidden": model.model(input_ids).last_hidden_state,
            "generated": model.generate(input_ids, max_new_tokens=4, do_sample=False),
        }
    expected_path = tmp_path / "expected.pt"
    torch.save(expected, expected_path)
    config_fields = ("model_type", "kv_lora_rank", "q_lora_rank", "index_topk", "index_n_heads", "index_head_dim",
                     "rope_parameters", "scoring_func", "topk_method", "n_group", "topk_group", "auto_map")  # fmt: skip
    config_dict = model.config.to_dict()
    (tmp_path / "expected.pt.config.json").write_text(json.dumps({k: config_dict[k] for k in config_fields}))

    resaved = tmp_path / "resaved"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(checkpoint), str(expected_path), str(REPO_ROOT), str(resaved)],
        cwd=checkpoint.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])

    assert report["mla_dsa_modules"] == [] and report["loaded_from_repo"] == []
    expected_classes = {
        "config": "MlaDsaConfig",
        "causal_lm": "MlaDsaForCausalLM",
        "base": "MlaDsaModel",
        "resaved": "MlaDsaForCausalLM",
        "seq_cls": "MlaDsaForSequenceClassification",
        "tok_cls": "MlaDsaForTokenClassification",
    }
    for key, name in expected_classes.items():
        class_name, module = report[key]
        assert class_name == name and module.startswith("transformers_modules."), report[key]
    assert report["cache"][0] == "MlaDsaCacheLayer" and report["cache"][1].startswith("transformers_modules."), report
    # Re-saving the remotely loaded model wrote the payload again, unchanged.
    assert {path.name for path in resaved.glob("*.py")} == PAYLOAD
    for name in PAYLOAD:
        assert (resaved / name).read_bytes() == (MODELING_DIR / name).read_bytes(), name
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == model.config.auto_map


@pytest.mark.slow  # a fresh interpreter
def test_readme_usage_runs_in_a_terminal_without_a_prompt(tmp_path):
    """The README's first example, as a user pastes it, against a converted checkpoint in an interpreter that cannot
    import mla_dsa, stdin closed: transformers asks "Do you wish to run the custom code?" of any AutoTokenizer call
    without trust_remote_code on a custom-code checkpoint (it reads config.json), and waited there."""
    from peers import save_byte_level_dsa

    checkpoint = save_byte_level_dsa(tmp_path / "dense", tmp_path / "dsa", index_topk=8)
    readme = (REPO_ROOT / "README.md").read_text()
    code = readme.split("## Using it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("path/to/dsa-checkpoint", str(checkpoint)).replace("max_new_tokens=64", "max_new_tokens=4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert "to instantiate a model of type" not in result.stderr


# --------------------------------------------------------------------------------------- dense V3 checkpoints
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Watching two loggers: where another test turned on transformers' propagation, one record reaches both.
        if not any(record is seen for seen in self.records):
            self.records.append(record)


@contextlib.contextmanager
def _logged_warnings():
    """The warnings logged inside the block, ours and transformers', at transformers' warning verbosity."""
    handler = _Records()
    # Our logger propagates to the root logger; transformers' own loggers stop at "transformers".
    watched = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in watched:
        logger.addHandler(handler)
    transformers.logging.set_verbosity_warning()
    try:
        yield handler
    finally:
        transformers.logging.set_verbosity_error()
        for logger in watched:
            logger.removeHandler(handler)


def test_dense_v3_checkpoint_warns_once_about_indexer(tmp_path, input_ids):
    peer = save_peer("deepseek_v3", tmp_path)
    with _logged_warnings() as handler:
        model = mla_dsa.load_checkpoint(tmp_path).eval()

    ours = [r.getMessage() for r in handler.records if r.name.startswith("mla_dsa") and r.levelno >= logging.WARNING]
    about_indexer = [message for message in ours if "indexer" in message.lower()]
    assert len(about_indexer) == 1, ours
    assert "3 layer" in about_indexer[0] and "mla-dsa train-indexer" in about_indexer[0]
    # transformers' own load report names the initialized tensors, as for any of its models
    reports = [r.getMessage() for r in handler.records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "self_attn.indexer" in reports[0], reports

    # It still runs: with index_topk (2048 by default) above the context, it is the dense V3 model.
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, peer(input_ids).logits, atol=1e-4, rtol=0)


def test_documented_loads_print_nothing_alarming(tmp_path):
    """A DeepseekV3/V32 checkpoint read as ours is not transformers' "model of type deepseek_v3 to instantiate a
    model of type mla_dsa ... can yield errors" (printed on every such load), and a dense checkpoint loaded to run
    dense through the package's loading, as our warning recommends, gets neither that warning nor a load report of
    the indexer it does not use."""
    save_peer("deepseek_v3", tmp_path / "v3")
    save_peer("deepseek_v32", tmp_path / "v32")
    with _logged_warnings() as handler:
        mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "v32")
        mla_dsa.MlaDsaConfig.from_pretrained(tmp_path / "v3")
        mla_dsa.load_checkpoint(tmp_path / "v3", use_sparse_attention=False)
    assert [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING] == []


def test_dense_v3_checkpoint_runs_sparse_with_untrained_indexer(tmp_path, input_ids):
    save_peer("deepseek_v3", tmp_path)
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path, index_topk=4).eval()
    dense = build_peer("deepseek_v3")
    with torch.no_grad():
        logits = model(input_ids).logits
        reference = dense(input_ids).logits
    assert torch.isfinite(logits).all()
    # Up to position index_topk every query sees all its keys, so sparse equals dense there.
    torch.testing.assert_close(logits[:, :4], reference[:, :4], atol=1e-4, rtol=0)
