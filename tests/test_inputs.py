"""Bad model inputs fail with a ValueError naming the problem, and low precision agrees with float32."""

import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import mla_dsa

from peers import VOCAB, left_padded_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(v32_checkpoint):
    return mla_dsa.MlaDsaForCausalLM.from_pretrained(v32_checkpoint).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, "empty sequence"),
        ({"input_ids": torch.zeros(2, 4)}, "integer tensor"),
        ({"input_ids": torch.zeros(4, dtype=torch.long)}, r"\[batch, seq_len\]"),
        ({"input_ids": torch.tensor([[1, 2, VOCAB]])}, "vocab_size"),
        ({"input_ids": torch.tensor([[1, 2, -1]])}, "vocab_size"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 5)}, "attention_mask"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 1, 4, 5)}, "4D"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, 4)}, "2D"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long), "cache": DynamicCache()}, "MlaDsaCache"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long), "inputs_embeds": torch.zeros(1, 4, 64)}, "exactly one"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long), "indexer_stage": "full"}, "indexer_stage"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long), "index_topk": 0}, "index_topk"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long), "index_topk": 2.5}, "index_topk"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mode": "fast"}, "attention_mode"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_value_error(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        with torch.no_grad():
            model(**kwargs)


@pytest.mark.parametrize("index_topk", [0, -3])
def test_nonpositive_index_topk_is_rejected(index_topk):
    with pytest.raises(ValueError, match="index_topk"):
        mla_dsa.MlaDsaConfig(index_topk=index_topk)


def test_index_topk_larger_than_context_is_dense(model):
    input_ids, attention_mask = left_padded_batch(seq_len=8)
    with torch.no_grad():
        model.config.index_topk = 10_000
        large = model(input_ids, attention_mask=attention_mask).logits
        model.config.use_sparse_attention = False
        dense = model(input_ids, attention_mask=attention_mask).logits
        model.config.use_sparse_attention, model.config.index_topk = True, 5
    torch.testing.assert_close(large, dense, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.bfloat16, 0.15), (torch.float16, 0.03)])
def test_low_precision_agrees_with_float32(model, dtype, atol):
    input_ids, attention_mask = left_padded_batch()
    real = attention_mask.bool()
    # Dense attention: in low precision the top-k of near-equal index scores may legitimately differ.
    model.config.use_sparse_attention = False
    try:
        with torch.no_grad():
            expected = model(input_ids, attention_mask=attention_mask).logits[real]
            low = mla_dsa.MlaDsaForCausalLM.from_pretrained(model.name_or_path, dtype=dtype).eval()
            low.config.use_sparse_attention = False
            for mode in ("mha", "absorbed"):
                low.config.attention_mode = mode
                actual = low(input_ids, attention_mask=attention_mask).logits
                assert actual.dtype == dtype and torch.isfinite(actual).all()
                torch.testing.assert_close(actual[real].float(), expected, atol=atol, rtol=0)
    finally:
        model.config.use_sparse_attention = True
    # As transformers keeps them: the indexer's head weights in float32 under fp16 only, the router always
    indexer_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert low.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == indexer_dtype
    assert all(layer.mlp.gate.weight.dtype == torch.float32 for layer in low.model.layers if hasattr(layer.mlp, "gate"))


def test_no_unsafe_deserialization_anywhere():
    """Only safetensors are read: no pickle, and no torch.load without weights_only=True, in any source file."""
    offenders = []
    project_folders = ("modeling", "conversion", "mla_dsa", "tests", "examples", "benchmarks", "docs")
    for path in sorted(p for folder in project_folders for p in (REPO / folder).rglob("*.py")):
        if path.name == "test_inputs.py":
            continue
        text = path.read_text()
        if re.search(r"^\s*import pickle|^\s*from pickle|cPickle|dill\.load", text, re.M):
            offenders.append(f"{path}: pickle")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path}: {call.group(0)}")
    assert not offenders, offenders


def test_payload_does_nothing_at_import_but_define():
    """Module level of each payload file: imports, constants, class and function definitions, __all__ only."""
    import ast

    for path in sorted((REPO / "modeling").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            allowed = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef, ast.Assign, ast.AnnAssign, ast.Expr)
            assert isinstance(node, allowed), f"{path.name}:{node.lineno} runs {type(node).__name__} at import"
            if isinstance(node, ast.Expr):
                assert isinstance(node.value, ast.Constant), f"{path.name}:{node.lineno} calls code at import"
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                value = node.value
                calls = [n for n in ast.walk(value) if isinstance(n, ast.Call)] if value is not None else []
                calls = [c for c in calls if ast.unparse(c.func) != "logging.get_logger"]  # a logger is inert
                assert not calls, f"{path.name}:{node.lineno} calls code at import"


def test_dense_attention_layers_attend_to_every_token(model):
    """A layer in `dense_attention_layers` ignores top-k; listing every layer is the dense model."""
    input_ids, attention_mask = left_padded_batch(seq_len=12)
    real = attention_mask.bool()
    layers = list(range(model.config.num_hidden_layers))
    with torch.no_grad():
        sparse = model(input_ids, attention_mask=attention_mask).logits
        dense = model(input_ids, attention_mask=attention_mask, use_sparse_attention=False).logits
        model.config.dense_attention_layers = layers
        all_dense = model(input_ids, attention_mask=attention_mask).logits
        model.config.dense_attention_layers = [0]
        first_dense = model(input_ids, attention_mask=attention_mask).logits
        model.config.dense_attention_layers = None
    torch.testing.assert_close(all_dense, dense, atol=1e-6, rtol=0)
    assert (first_dense[real] - sparse[real]).abs().max() > 1e-4
    assert (first_dense[real] - dense[real]).abs().max() > 1e-4
