"""The absorbed attention and the index scoring through transformers' attention registry: the checkpoints' plain
implementations, the package's CPU-tuned ones registered over them (same numbers), and any implementation a user or a
kernel package registers under `ABSORBED_ATTENTION` or `INDEX_SCORES` taking their place without an edit to the
payload."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mla_dsa.attention
from mla_dsa import MlaDsaConfig, MlaDsaForCausalLM
from mla_dsa.attention import cpu_absorbed_attention, cpu_index_scores
from mla_dsa.modeling.modeling_mla_dsa import (
    ABSORBED_ATTENTION,
    CACHE_NAME,
    INDEX_SCORES,
    absorbed_attention_forward,
    index_scores,
)

from peers import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEW_TOKENS, TOPK = 20, 6, 5


@pytest.fixture
def registered():
    """Registers a function under ABSORBED_ATTENTION (or another name) for one test; the package's are put back."""
    yield lambda function, name=ABSORBED_ATTENTION: AttentionInterface.register(name, function)
    AttentionInterface.register(ABSORBED_ATTENTION, cpu_absorbed_attention)
    AttentionInterface.register(INDEX_SCORES, cpu_index_scores)


def _model(**overrides) -> MlaDsaForCausalLM:
    torch.manual_seed(0)
    shapes = dict(num_attention_heads=4, q_lora_rank=32, kv_lora_rank=128, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, index_n_heads=2, index_head_dim=16, index_topk=TOPK) | overrides  # fmt: skip
    config = MlaDsaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          first_k_dense_replace=2, **shapes)  # fmt: skip
    return MlaDsaForCausalLM(config).eval()


def _prompt(batch=2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def _run(model) -> tuple[torch.Tensor, torch.Tensor]:
    """A long sparse prefill in absorbed mode (several query chunks) and greedy cached decoding's scores."""
    with torch.no_grad():
        prefill = model(_prompt(), attention_mode="absorbed").logits
        out = model.generate(_prompt(), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
    return prefill, torch.stack(out.scores)


def test_importing_the_package_registers_its_cpu_attention_and_index_scoring():
    assert ALL_ATTENTION_FUNCTIONS[ABSORBED_ATTENTION] is cpu_absorbed_attention
    assert ALL_ATTENTION_FUNCTIONS[INDEX_SCORES] is cpu_index_scores


@pytest.mark.parametrize("indexer_cache_dtype", ["auto", "fp8"])
def test_the_cpu_index_scoring_computes_what_the_checkpoints_own_does(registered, indexer_cache_dtype):
    model = _model(indexer_cache_dtype=indexer_cache_dtype, query_chunk_size=7)
    tuned = _run(model)
    registered(index_scores, INDEX_SCORES)
    plain = _run(model)
    for mine, theirs in zip(tuned, plain, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_a_registered_index_scoring_takes_its_place(registered):
    """Every DSA layer's selection scores through the registry: a recording wrapper sees the prefill and every decode
    step, and a scoring that prefers the earliest keys changes the logits."""
    model = _model()
    expected = _run(model)
    calls = []

    def recording(queries, weights, keys, softmax_scale):
        calls.append((queries.shape[1], keys.shape[1]))
        return index_scores(queries, weights, keys, softmax_scale)

    registered(recording, INDEX_SCORES)
    for mine, theirs in zip(_run(model), expected, strict=True):
        torch.testing.assert_close(mine, theirs)
    assert (PROMPT, PROMPT) in calls and (1, PROMPT + NEW_TOKENS - 1) in calls

    def earliest(queries, weights, keys, softmax_scale):
        return -torch.arange(keys.shape[1], dtype=torch.float32).expand(*queries.shape[:2], -1)

    registered(earliest, INDEX_SCORES)
    assert not torch.allclose(_run(model)[0], expected[0])


def _prefill_by(monkeypatch, prefill: str) -> None:
    """Makes the package's sparse prefill read each block's union of selected rows, or gather each query's own."""
    monkeypatch.setattr(mla_dsa.attention, "_union_pays", lambda *args: prefill == "union")


@pytest.mark.parametrize("prefill", ["union", "gathered"])
@pytest.mark.parametrize("qk_nope_head_dim", [16, 0], ids=["deepseek-queries", "rope-only-queries"])
@pytest.mark.parametrize("heads_major", [True, False], ids=["avx512-form", "avx2-form"])
@pytest.mark.parametrize("latent_cache_dtype", ["auto", "fp8"])
def test_the_cpu_attention_computes_what_the_checkpoints_own_does(registered, latent_cache_dtype, heads_major,
                                                                   qk_nope_head_dim, prefill, monkeypatch):  # fmt: skip
    """Both forms of a decode step's score and output matmuls (chosen by the CPU's vector width), whichever this CPU
    has; both forms of a sparse prefill (a block of queries over the union of its selections, or each query over its
    own gathered rows); and queries with no position-free part (a full-width GQA conversion's), which the package
    scores by their RoPE columns alone."""
    monkeypatch.setattr(mla_dsa.attention, "_HEADS_MAJOR_OUTPUT", heads_major)
    monkeypatch.setattr(mla_dsa.attention, "_HEADS_MAJOR_SCORES", heads_major)
    _prefill_by(monkeypatch, prefill)
    model = _model(latent_cache_dtype=latent_cache_dtype, query_chunk_size=7, qk_nope_head_dim=qk_nope_head_dim)
    tuned = _run(model)
    registered(absorbed_attention_forward)
    plain = _run(model)
    for mine, theirs in zip(tuned, plain, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_nope_head_dim", [16, 0], ids=["deepseek-queries", "rope-only-queries"])
def test_rope_only_queries_are_scored_by_their_rope_columns_alone(registered, qk_nope_head_dim, monkeypatch):
    """With no position-free query part (`qk_nope_head_dim` 0: a GQA conversion that keeps every key head's RoPE, the
    default), the absorbed query's first kv_lora_rank columns (q_nope W_UK) are zeros: the package's attention skips
    them in the scores of a sparse prefill and of every decode step, exactly that product's multiply-adds fewer than
    the checkpoint's own implementation; DeepSeek-shaped queries score every column in both."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(qk_nope_head_dim=qk_nope_head_dim)
    config = model.config
    _prefill_by(monkeypatch, "gathered")  # the same rows as the checkpoint's (the union's: below)

    def flops() -> int:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(_prompt(), attention_mode="absorbed")  # a sparse prefill: PROMPT queries, TOPK rows each
            model.generate(_prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)
        return counter.get_total_flops()

    tuned = flops()
    registered(absorbed_attention_forward)
    plain = flops()
    # the decode steps after generate()'s prefill (which runs in MHA mode) attend to TOPK rows, one query each
    queries = 2 * PROMPT + 2 * (NEW_TOKENS - 1)
    latent_scores = config.num_hidden_layers * queries * config.num_attention_heads * TOPK * config.kv_lora_rank
    assert plain - tuned == (2 * latent_scores if qk_nope_head_dim == 0 else 0)  # 2 flops per multiply-add


def test_a_compiled_decode_step_hands_w_uv_its_rows_contiguous(monkeypatch):
    """Traced by torch.compile, a decode step's latent output comes out heads-major, [B, 1, H, R] contiguous, on every
    CPU: inductor turns the W_UV product after it into a loop of its own, which from the keys-major form (AVX2's
    eager choice) read its input with a stride and ran unvectorized, 0.94 ms a layer against 0.23 (bench model, 4K,
    float32, 1 thread: a compiled step 13.1 -> 11.6 ms). The same numbers either way."""
    monkeypatch.setattr(mla_dsa.attention, "_HEADS_MAJOR_OUTPUT", False)  # an AVX2 CPU's eager form
    generator = torch.Generator().manual_seed(0)
    query, rows = torch.randn(2, 1, 9, 48, generator=generator), torch.randn(2, 1, 24, 48, generator=generator)
    valid = torch.rand(2, 1, 24, generator=generator) > 0.3
    eager = mla_dsa.attention._decode_step(query, rows, valid, 0.1, 32)
    assert not eager.is_contiguous()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = mla_dsa.attention._decode_step(query, rows, valid, 0.1, 32)
    assert traced.shape == (2, 1, 9, 32) and traced.is_contiguous()
    torch.testing.assert_close(traced, eager, atol=1e-6, rtol=1e-5)


def test_a_registered_implementation_takes_its_place(registered):
    """What the registry holds is what every DSA layer calls, with the documented shapes: a recording wrapper sees
    the decode steps' and the prefill's calls, and a function that zeroes the attention changes the logits."""
    model = _model()
    expected = _run(model)
    calls = []

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, indices=None, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape), None if indices is None else tuple(indices.shape)))
        assert value is key and key.shape[1] == 1 and query.shape[-1] == key.shape[-1]
        if indices is not None:
            assert indices.dtype == torch.int64 and bool((indices >= -1).all())
        return absorbed_attention_forward(module, query, key, value, attention_mask, scaling, dropout, indices)

    registered(recording)
    recorded = _run(model)
    for mine, theirs in zip(recorded, expected, strict=True):
        torch.testing.assert_close(mine, theirs)
    heads, row = model.config.num_attention_heads, model.config.kv_lora_rank + model.config.qk_rope_head_dim
    assert (2, heads, 1, row) in {call[0] for call in calls}  # decode steps: one query per sequence
    assert all(call[2] is not None and call[2][-1] == TOPK for call in calls)  # every call past k keys is sparse

    def zeros(module, query, key, value, attention_mask, scaling, dropout=0.0, indices=None, **kwargs):
        batch, heads, queries, _ = query.shape
        return query.new_zeros(batch, queries, heads, module.kv_lora_rank), None

    registered(zeros)
    assert not torch.allclose(_run(model)[0], expected[0])


def test_the_cpu_prefill_gathers_every_chunk_and_layer_into_one_reused_buffer(monkeypatch):
    """The package's prefill (several query chunks, two layers, twice) gathers into one buffer it keeps: a fresh large
    allocation per chunk costs more than the gather on a CPU."""
    model = _model(query_chunk_size=7)
    _prefill_by(monkeypatch, "gathered")
    buffers = []
    original = mla_dsa.attention.gather_rows_into

    def recording(out, rows, indices):
        buffers.append(out.untyped_storage().data_ptr())
        return original(out, rows, indices)

    monkeypatch.setattr(mla_dsa.attention, "gather_rows_into", recording)
    with torch.no_grad():
        model(_prompt(), attention_mode="absorbed")
        model(_prompt(), attention_mode="absorbed")
    assert len(buffers) == 2 * 2 * 3  # two prefills, two layers, ceil(20 / 7) query chunks
    assert len(set(buffers)) == 1


@pytest.mark.parametrize("prefill", ["union", "gathered"])
def test_a_left_padded_batch_prefills_as_the_checkpoints_own_does(registered, monkeypatch, prefill):
    """A batch whose second prompt is left-padded: its padding selects nothing (-1), and its union of rows differs
    from the first sequence's; every real position's logits equal the checkpoint's own, in both prefill forms."""
    model = _model(query_chunk_size=7, qk_nope_head_dim=0)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :6] = 0
    _prefill_by(monkeypatch, prefill)
    with torch.no_grad():
        tuned = model(_prompt(), attention_mask=mask, attention_mode="absorbed").logits
        registered(absorbed_attention_forward)
        plain = model(_prompt(), attention_mask=mask, attention_mode="absorbed").logits
    real = mask.bool()
    torch.testing.assert_close(tuned[real], plain[real], atol=1e-5, rtol=1e-5)


def _block(n_heads: int, kv_lora_rank: int, rope_dim: int, shared: bool, queries=8, k=64, num_keys=1024, seed=0):
    """A prefill's block of queries [1, H, s, C] over latent rows [1, 1, T, C] as the registry passes them, with
    selections [1, s, k] (the first query's last 10 none, -1) that every query shares, or that no two share."""
    generator = torch.Generator().manual_seed(seed)
    row = kv_lora_rank + rope_dim
    query = torch.randn(1, n_heads, queries, row, generator=generator)
    rows = torch.randn(1, 1, num_keys, row, generator=generator)
    order = torch.randperm(num_keys, generator=generator)
    indices = (order[:k].expand(queries, k) if shared else order[: queries * k].view(queries, k)).clone()
    indices[0, -10:] = -1
    module = SimpleNamespace(kv_lora_rank=kv_lora_rank, qk_nope_head_dim=16)
    return module, query, rows, indices.unsqueeze(0)


def _reads(monkeypatch, module, query, rows, indices) -> tuple[torch.Tensor, list[int]]:
    """The package's attention of one block, and the number of rows each `index_select` of the latent rows read."""
    reads = []
    original = torch.Tensor.index_select

    def recording(self, dim, index, *args, **kwargs):
        reads.append(index.numel())
        return original(self, dim, index, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_select", recording)
    original_into = mla_dsa.attention.gather_rows_into
    monkeypatch.setattr(
        mla_dsa.attention,
        "gather_rows_into",
        lambda out, rows, indices: reads.append(indices.numel()) or original_into(out, rows, indices),
    )
    with torch.no_grad():
        out, _ = cpu_absorbed_attention(module, query, rows, rows, None, 0.1, indices=indices)
    monkeypatch.undo()
    return out, reads


def test_a_prefill_block_whose_queries_share_their_rows_reads_each_once(monkeypatch):
    """Queries of a long prefill's block select mostly the same keys (SmolLM2's exact conversion at 8K, k = 1,024: the
    85 queries of a block select 2-4x k distinct ones): the package's attention reads their union once and scores
    the block against it in one product, each query's other rows masked out; DeepSeek-V3.2's heads (128) over rows no
    two queries share still gather each query's own (there the union costs more than the gather it saves). The
    same numbers as the checkpoint's own either way."""
    for n_heads, kv_lora_rank, rope_dim, shared, expected_reads in ((4, 128, 8, True, [64]),
                                                                    (128, 512, 64, False, [8 * 64])):  # fmt: skip
        module, query, rows, indices = _block(n_heads, kv_lora_rank, rope_dim, shared)
        out, reads = _reads(monkeypatch, module, query, rows, indices)
        assert reads == expected_reads
        with torch.no_grad():
            theirs, _ = absorbed_attention_forward(module, query, rows, rows, None, 0.1, indices=indices)
        torch.testing.assert_close(out, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "n_heads, kv_lora_rank, rope_dim, rope_only, largest_union",
    [(9, 192, 192, True, 3), (16, 512, 64, False, 1), (128, 512, 64, False, 1)],
    ids=["smollm2-exact-conversion", "bench-model", "deepseek-v32"],
)
def test_a_prefill_block_takes_the_union_only_while_it_pays(monkeypatch, n_heads, kv_lora_rank, rope_dim, rope_only,
                                                            largest_union):  # fmt: skip
    """The choice follows what each form costs (measured where they cross: a union of 3.3x k rows at SmolLM2's 9 heads
    of rope-only queries, 2.1x at the bench model's 16 heads, 1.05x at DeepSeek-V3.2's 128): blocks whose queries
    select a union of 1, 2, 4 or 8 x k rows read it once up to `largest_union` x k, and above it gather each query's
    own."""
    module, query, rows, _ = _block(n_heads, kv_lora_rank, rope_dim, shared=True)
    module.qk_nope_head_dim = 0 if rope_only else 16
    order = torch.randperm(1024, generator=torch.Generator().manual_seed(1))
    for union in (1, 2, 4, 8):  # `union` groups of queries, each group sharing its own k = 64 rows
        indices = order[: union * 64].view(union, 1, 64).expand(-1, 8 // union, -1).reshape(1, 8, 64)
        reads = _reads(monkeypatch, module, query, rows, indices)[1]
        assert reads == ([union * 64] if union <= largest_union else [8 * 64]), union


def test_a_traced_prefill_leaves_no_buffer_behind_for_eager_calls():
    """A prefill traced with fake tensors (torch.export, as a user exporting the model does) neither keeps its buffer
    nor reuses an eager one: a fake buffer kept by the trace made every later eager prefill of that shape return a
    fake tensor (torch 2.14's export)."""
    model = _model()
    mla_dsa.attention._local.__dict__.clear()  # no buffer from an earlier test

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids, attention_mode="absorbed", use_cache=False).logits

    with torch.no_grad():
        exported = torch.export.export(Logits(), (_prompt(),))
        eager = model(_prompt(), attention_mode="absorbed", use_cache=False).logits
        assert type(eager) is torch.Tensor
        torch.testing.assert_close(exported.module()(_prompt()), eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("implementation", ["package", "checkpoint"])
def test_float16_scores_past_its_range_before_scaling_still_attend(registered, implementation):
    """float16 attention scores of 145,000 before the softmax scale (29,000 after: within float16's 65,504): the
    absorbed attention scales the query first, as SDPA (the MHA mode) does. Scaling the product overflowed it to inf,
    the softmax gave NaN and every such head's output was silently zero (0.70 off float32 in dense logits, 0.54 off
    the MHA mode in a decode step)."""
    if implementation == "checkpoint":
        registered(absorbed_attention_forward)
    models = {}
    for dtype in (torch.float32, torch.float16):
        models[dtype] = _model()
        with torch.no_grad():
            for layer in models[dtype].model.layers:  # queries and latents 600x larger: scores 360,000x
                layer.self_attn.q_b_proj.weight.mul_(600)
                layer.self_attn.kv_a_layernorm.weight.mul_(600)
        models[dtype].to(dtype)
    ids, half = _prompt(), models[torch.float16]
    with torch.no_grad():
        dense = half(ids, attention_mode="absorbed", use_sparse_attention=False).logits.float()
        reference = models[torch.float32](ids, attention_mode="absorbed", use_sparse_attention=False).logits
        torch.testing.assert_close(dense, reference, rtol=0, atol=5e-3)
        prefill = half(ids[:, :-1], attention_mode="mha")
        cache = getattr(prefill, CACHE_NAME)
        step = half(ids[:, -1:], attention_mode="absorbed", **{CACHE_NAME: cache}).logits
        mha = half(ids, attention_mode="mha").logits[:, -1:]
        torch.testing.assert_close(step.float(), mha.float(), rtol=0, atol=5e-3)
