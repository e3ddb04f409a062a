"""No host-device synchronisation in a prefill or a decode step, and every tensor made on its input's device.

A sync is what makes the host wait for a GPU: `.item()`, `int(t)`, `bool(t)`, `.tolist()` dispatch to
`aten._local_scalar_dense`, data-dependent shapes to `aten.nonzero` (and `unique`, `masked_select`). A
`TorchDispatchMode` records them on CPU, with the innermost frame of our payload or of transformers that asked for
each, so the test names the line. A model on the meta device has no data at all: a forward there fails on any read of
a value and on any tensor made on another device."""

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, DynamicCache, StaticCache

import mla_dsa
import mla_dsa.attention
from mla_dsa import MlaDsaConfig, MlaDsaForCausalLM
from mla_dsa.modeling.modeling_mla_dsa import (
    ABSORBED_ATTENTION,
    INDEX_SCORES,
    absorbed_attention_forward,
    index_scores,
)

from peers import VOCAB

PAYLOAD_DIR = str(Path(mla_dsa.modeling.__file__).parent)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "unique", "_unique2", "masked_select", "item")
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              first_k_dense_replace=1, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
              index_n_heads=4, index_head_dim=32, index_topk=6, max_position_embeddings=512)  # fmt: skip


class SyncRecorder(TorchDispatchMode):
    """Counts sync ops by (op, the innermost frame in our payload or in transformers that led to it)."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.syncs[(func.overloadpacket.__name__, _asking_frame())] += 1
        return func(*args, **(kwargs or {}))

    def ours(self) -> list:
        return [(op, frame, n) for (op, frame), n in self.syncs.items() if frame.startswith(PAYLOAD_DIR)]


def _asking_frame() -> str:
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(PAYLOAD_DIR) or "/transformers/" in frame.filename:
            return f"{frame.filename}:{frame.lineno} {frame.line}"
    return "elsewhere"


def _model(device: str = "cpu", experts: str | None = None, **overrides) -> MlaDsaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = MlaDsaForCausalLM._from_config(MlaDsaConfig(**{**CONFIG, **overrides}), experts_implementation=experts)
    return model.eval()


def _prefill_and_decode(model, device: str = "cpu", recorder: SyncRecorder | None = None, static: bool = False,
                        **settings):  # fmt: skip
    """A left-padded batch of 2 x 20 (top-6 of up to 21 keys: the sparse path), then one decode step, on
    `DynamicCache(config)` as generate() makes it (or a 32-slot `StaticCache`); the recorder is on for both forwards
    only."""
    input_ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(2, 20, dtype=torch.long, device=device)
    mask[1, :4] = 0
    cache = StaticCache(config=model.config, max_cache_len=32) if static else DynamicCache(config=model.config)
    with torch.no_grad(), recorder or _Nothing():
        out = model(input_ids, attention_mask=mask, cache=cache, use_cache=True, **settings)
        next_token = out.logits[:, -1:].argmax(-1)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(next_token, attention_mask=step_mask, cache=cache, use_cache=True, **settings)
    return out


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_recorder_sees_every_kind_of_sync():
    """The control: each way of reading a value off a tensor is recorded (else the test below proves nothing)."""
    recorder = SyncRecorder()
    values = torch.tensor([0.0, 2.0, 3.0])
    with recorder:
        values.max().item(), int(values[1]), bool(values.all()), torch.nonzero(values), values.unique()
    assert {op for op, _ in recorder.syncs} >= {"_local_scalar_dense", "nonzero"}
    assert sum(recorder.syncs.values()) >= 5


@pytest.fixture
def gpu_implementations():
    """The absorbed attention and index scoring a GPU runs: the checkpoints' own. The package's, registered over them,
    hand every tensor off the CPU to them, and on the CPU read the size of a prefill block's union of selected rows
    (`mla_dsa.attention.selected_union`), which waits for no device there."""
    AttentionInterface.register(ABSORBED_ATTENTION, absorbed_attention_forward)
    AttentionInterface.register(INDEX_SCORES, index_scores)
    yield
    mla_dsa.attention.register()


@pytest.mark.parametrize(
    "settings, overrides",
    [
        ({}, {}),  # auto: MHA prefill, absorbed decode, DSA on
        ({"attention_mode": "absorbed"}, {}),
        ({"attention_mode": "mha"}, {}),
        ({"use_sparse_attention": False}, {}),
        ({}, {"latent_cache_dtype": "fp8", "indexer_cache_dtype": "fp8"}),
        ({}, {"dense_attention_layers": [0], "n_routed_experts": None}),
        ({"static": True}, {}),
    ],
    ids=["auto", "absorbed", "mha", "dense", "fp8-caches", "dense-layer-no-moe", "static-cache"],
)
def test_prefill_and_decode_never_wait_for_the_device(settings, overrides, gpu_implementations):
    recorder = SyncRecorder()
    _prefill_and_decode(_model(**overrides), recorder=recorder, **settings)
    assert recorder.ours() == []
    assert sum(recorder.syncs.values()) == 0, dict(recorder.syncs)  # transformers' grouped_mm experts: none either


def test_out_of_range_ids_are_still_one_line():
    """The vocabulary check no longer reads the ids on every step: the lookup fails first, then the ids are read."""
    model = _model()
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, vocab_size={VOCAB}\), got \[3, {VOCAB}\]"):
        model(torch.tensor([[3, VOCAB]]))


@pytest.mark.parametrize("overrides", [{}, {"latent_cache_dtype": "fp8", "indexer_cache_dtype": "fp8"}],
                         ids=["bf16-caches", "fp8-caches"])  # fmt: skip
def test_every_tensor_is_made_on_the_inputs_device(overrides):
    """On the meta device (no data: batched_mm experts, as grouped_mm has no float32 meta kernel) a prefill and a
    decode step run through: nothing is made on the CPU, nothing reads a value."""
    out = _prefill_and_decode(_model("meta", experts="batched_mm", **overrides), device="meta")
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 1, VOCAB)
