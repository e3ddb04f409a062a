"""The indexer's KL loss (`mla_dsa.IndexerLoss`, beside the model): equal to a plain unchunked reference, chunked in
memory, wired so that gradients reach only what the paper says they reach, and the same under activation
checkpointing; the model itself computes no training loss."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mla_dsa
from mla_dsa import indexer_loss as indexer_loss_module
from mla_dsa.indexer_loss import IndexerLoss, IndexScorer, MainQueries, dense_stage_loss
from mla_dsa.modeling import modeling_mla_dsa
from mla_dsa.modeling.modeling_mla_dsa import VisibleKeys
from mla_dsa.training import prepare_indexer_training

from peers import VOCAB

SEQ = 14


@pytest.fixture(scope="module")
def checkpoint(v32_checkpoint):
    return v32_checkpoint  # the session's (conftest.py)


def load(checkpoint, **overrides):
    return mla_dsa.MlaDsaForCausalLM.from_pretrained(checkpoint, **overrides)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    return input_ids, attention_mask


def reference_layer_kl(attn, hidden, position_embeddings, key_padding_mask, sparse):
    """KL(p_t || softmax(I_t)) per query, from scratch: MHA-mode per-head attention over explicit [H, S, S] scores."""
    config = attn.config
    cos, sin = position_embeddings
    bsz, seq, _ = hidden.shape
    with torch.no_grad():
        _, q_nope, q_rope = attn._project_queries(hidden)
        c_kv, k_rope = attn.kv_a_proj_with_mqa(hidden).split([config.kv_lora_rank, config.qk_rope_head_dim], -1)
        q_rope, k_rope = attn._rotate(q_rope, cos.unsqueeze(2), sin.unsqueeze(2)), attn._rotate(k_rope, cos, sin)
        kv = attn.kv_b_proj(attn.kv_a_layernorm(c_kv)).view(bsz, seq, config.num_attention_heads, -1)
        k_nope = kv[..., : config.qk_nope_head_dim]
        scores = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
        scores = scores * attn.scaling
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    valid = causal[None] & key_padding_mask[:, None, :]  # [B, S, T]
    index_k = attn.indexer.keys(hidden, cos, sin, fp8=False)
    index_q, index_w = attn.indexer.queries(hidden, hidden_q_latent(attn, hidden), cos, sin)
    per_head = torch.relu(torch.einsum("bshd,btd->bsht", index_q, index_k) * attn.indexer.softmax_scale)
    index = (per_head * index_w.unsqueeze(-1)).sum(2)  # [B, S, T]
    if sparse:
        masked = index.detach().masked_fill(~valid, float("-inf"))
        chosen = masked.topk(min(config.index_topk, seq), dim=-1).indices
        selected = torch.zeros_like(valid).scatter_(-1, chosen, True)
        valid = valid & selected
    probs = torch.softmax(scores.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    target = probs.mean(1)  # heads summed, L1-normalised
    log_q = torch.log_softmax(index.masked_fill(~valid, float("-inf")), dim=-1)
    kl = torch.where(valid, target * (torch.log(target.clamp_min(1e-30)) - log_q), torch.zeros_like(target)).sum(-1)
    has_key = valid.any(-1)
    return kl[has_key].mean()


def hidden_q_latent(attn, hidden):
    return attn._project_queries(hidden)[0]


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_loss_equals_unchunked_reference(checkpoint, stage):
    model = load(checkpoint, query_chunk_size=3)
    input_ids, attention_mask = batch()
    captured = {}

    def grab(module, args, kwargs, output):
        captured[module.layer_idx] = (args, kwargs, output)

    hooks = [layer.self_attn.register_forward_hook(grab, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad(), IndexerLoss(model, stage) as indexer_loss:
        model(input_ids, attention_mask=attention_mask, use_sparse_attention=stage == "sparse")
    for hook in hooks:
        hook.remove()
    assert len(indexer_loss.layers) == model.config.num_hidden_layers
    layer_losses = []
    for idx, layer in enumerate(model.model.layers):
        args, kwargs, _ = captured[idx]
        hidden, position_embeddings, key_padding_mask = args[0], args[1], args[3]
        with torch.no_grad():
            expected = reference_layer_kl(
                layer.self_attn, hidden, position_embeddings, key_padding_mask, stage == "sparse"
            )
        torch.testing.assert_close(indexer_loss.layers[idx].kl, expected, atol=1e-7, rtol=1e-4)
        layer_losses.append(expected)
    torch.testing.assert_close(indexer_loss.kl, torch.stack(layer_losses).mean(), atol=1e-7, rtol=1e-4)
    assert indexer_loss.kl > 0


def test_loss_does_not_depend_on_chunk_size(checkpoint):
    input_ids, attention_mask = batch(1)
    results = []
    for chunk in (1, 4, 64):
        model = load(checkpoint, query_chunk_size=chunk)
        with torch.no_grad(), IndexerLoss(model, "dense") as indexer_loss:
            model(input_ids, attention_mask=attention_mask)
        results.append((indexer_loss.kl, indexer_loss.recall))
    for loss, recall in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(recall, results[0][1])


def test_training_index_scores_equal_the_definition_and_keep_one_layout_in_backward():
    """The training loss's index scores (`differentiable_index_scores`) are the checkpoint's `index_scores`, values and
    gradients, and the gradient that reaches ReLU's backward is laid out as the per-head scores are (contiguous): the
    einsum form handed it a transposed one, 4x slower, a fifth of a calibration fit step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ReluBackwardLayouts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.contiguous = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.threshold_backward.default:
                self.contiguous.append(args[0].is_contiguous())
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 5, 3, 16, generator=generator), torch.rand(2, 5, 3, generator=generator),
              torch.randn(2, 11, 16, generator=generator))  # fmt: skip
    results = []
    for function in (indexer_loss_module.differentiable_index_scores, modeling_mla_dsa.index_scores):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        layouts = ReluBackwardLayouts()
        scores = function(*leaves, 0.25)
        with layouts:
            (scores * torch.arange(11.0)).sum().backward()
        results.append((scores, *(leaf.grad for leaf in leaves)))
        if function is indexer_loss_module.differentiable_index_scores:
            assert layouts.contiguous == [True]
    for ours, definition in zip(*results, strict=True):
        torch.testing.assert_close(ours, definition, rtol=1e-6, atol=1e-6)


def test_dense_stage_chunks_score_only_the_keys_their_queries_may_see(checkpoint, monkeypatch):
    """Causal queries before a chunk's end see no later key: each chunk of the dense stage scores (index and main
    attention) the keys up to its end, not all T (about half the work of a long sequence). Same loss as one chunk."""
    widths = []
    original = indexer_loss_module.differentiable_index_scores

    def recording(queries, weights, keys, softmax_scale):
        widths.append(keys.shape[1])
        return original(queries, weights, keys, softmax_scale)

    monkeypatch.setattr(indexer_loss_module, "differentiable_index_scores", recording)
    input_ids, attention_mask = batch(2)
    losses = []
    for chunk in (4, SEQ):
        model = load(checkpoint, query_chunk_size=chunk)
        widths.clear()
        with torch.no_grad(), IndexerLoss(model, "dense") as indexer_loss:
            model(input_ids, attention_mask=attention_mask)
        losses.append((indexer_loss.kl, indexer_loss.recall, indexer_loss.kl_uniform))
        ends = [min(start + chunk, SEQ) for start in range(0, SEQ, chunk)]
        assert widths == ends * model.config.num_hidden_layers, (chunk, widths)
    for chunked, whole in zip(losses[0], losses[1], strict=True):
        torch.testing.assert_close(chunked, whole)


class _LargestTensor(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_loss_memory_is_chunked():
    """No [heads, S, T] tensor: the largest tensor built by the loss is O(chunk * T * heads)."""
    torch.manual_seed(0)
    bsz, seq, heads, index_heads, nope, rope, rank, chunk = 1, 256, 8, 4, 8, 8, 16, 16
    main_queries = MainQueries(torch.randn(bsz, seq, heads, nope), torch.randn(bsz, seq, heads, rope),
                               torch.randn(heads, nope, rank))  # fmt: skip
    latent = torch.randn(bsz, seq, rank + rope)
    index_q = torch.randn(bsz, seq, index_heads, 16, requires_grad=True)
    index_w = torch.randn(bsz, seq, index_heads)
    index_k = torch.randn(bsz, seq, 16)
    visible = VisibleKeys(0, seq, None, torch.device("cpu"))
    scorer = IndexScorer(index_q, index_w, index_k, 0.25)
    recorder = _LargestTensor()
    with recorder:
        stats = dense_stage_loss(scorer, visible, main_queries, latent, 0.1, top_k=32, chunk_size=chunk)
        stats.kl.backward()
    assert index_q.grad is not None and index_q.grad.abs().sum() > 0
    assert recorder.largest <= bsz * chunk * max(heads, index_heads) * seq
    assert recorder.largest < bsz * heads * seq * seq // 4


def test_dense_stage_keeps_no_absorbed_query_for_backward(checkpoint, monkeypatch):
    """What a layer keeps for the dense stage's backward grows with the sequence: its main queries as projected
    ([H, dn + dr] per token), never absorbed ([H, R + dr]: 3x more at DeepSeek-V3.2's shapes); a chunk absorbs its
    own again when backward recomputes it. The KL and its gradients are those of the absorbed queries."""
    monkeypatch.setattr(indexer_loss_module, "KEPT_ELEMENTS_PER_STEP", 0)  # the chunks checkpointed, as at length
    model = load(checkpoint, query_chunk_size=4)
    prepare_indexer_training(model, "dense")
    config = model.config
    input_ids, attention_mask = batch()
    absorbed_shape = (config.num_attention_heads, config.kv_lora_rank + config.qk_rope_head_dim)
    saved_shapes = []

    def keep(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with IndexerLoss(model, "dense") as indexer_loss:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(input_ids, attention_mask=attention_mask, use_sparse_attention=False)
        indexer_loss.kl.backward()
    projected = (config.num_attention_heads, config.qk_nope_head_dim)
    # queries are [B, S or s, H, *] (a chunk's latent rows [B, T', R + dr] can share the last two sizes: not queries)
    assert any(len(shape) == 4 and shape[-2:] == projected for shape in saved_shapes)  # kept, as projected
    assert not [shape for shape in saved_shapes if len(shape) == 4 and shape[-2:] == absorbed_shape]
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads) and any(grad.abs().sum() > 0 for grad in grads)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_small_steps_keep_their_chunks_scores_instead_of_recomputing_them(checkpoint, monkeypatch, stage):
    """Within `KEPT_ELEMENTS_PER_STEP`, each query chunk's index scores run once and are kept for backward; beyond it
    (the default at long context) they run under activation checkpointing, again in backward. Same loss, same
    gradients."""
    chunk_function = "_dense_chunk" if stage == "dense" else "_selected_index_scores"
    original, calls = getattr(indexer_loss_module, chunk_function), []
    monkeypatch.setattr(indexer_loss_module, chunk_function, lambda *args: calls.append(1) or original(*args))
    input_ids, attention_mask = batch()
    results = {}
    for budget in (indexer_loss_module.KEPT_ELEMENTS_PER_STEP, 0):
        monkeypatch.setattr(indexer_loss_module, "KEPT_ELEMENTS_PER_STEP", budget)
        calls.clear()
        model = load(checkpoint, query_chunk_size=4)
        prepare_indexer_training(model, stage)
        with IndexerLoss(model, stage) as indexer_loss:
            model(input_ids, attention_mask=attention_mask, use_sparse_attention=stage == "sparse")
            forward_calls = len(calls)
            indexer_loss.kl.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[budget] = (indexer_loss.kl.detach(), grads, forward_calls, len(calls))
    (kl, grads, forward_calls, calls), (kl_checkpointed, grads_checkpointed, _, calls_checkpointed) = results.values()
    assert forward_calls > 0 and calls == forward_calls  # kept: nothing recomputed in backward
    assert calls_checkpointed == 2 * forward_calls
    torch.testing.assert_close(kl_checkpointed, kl)
    assert grads.keys() == grads_checkpointed.keys() and any(".indexer." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, msg=name)


def test_dense_stage_trains_only_the_indexer(checkpoint):
    model = load(checkpoint)
    before = model.config.to_dict()
    prepare_indexer_training(model, "dense")
    assert model.config.to_dict() == before  # the stage is the loss beside the model, not a config change
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".indexer." in name for name in trainable)
    input_ids, attention_mask = batch()
    with IndexerLoss(model, "dense") as indexer_loss:
        model(input_ids, attention_mask=attention_mask, use_sparse_attention=False)
    indexer_loss.kl.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= trainable
    assert any("wq_b" in name for name in with_grad) and any("weights_proj" in name for name in with_grad)


def test_sparse_stage_separates_the_two_losses(checkpoint):
    model = load(checkpoint)
    prepare_indexer_training(model, "sparse")
    assert all(p.requires_grad for p in model.parameters())
    input_ids, attention_mask = batch()
    with IndexerLoss(model, "sparse") as indexer_loss:
        out = model(input_ids, attention_mask=attention_mask, labels=input_ids)

    out.loss.backward(retain_graph=True)
    lm_grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert lm_grads and not any(".indexer." in name for name in lm_grads)
    model.zero_grad()
    indexer_loss.kl.backward()
    kl_grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert kl_grads and all(".indexer." in name for name in kl_grads)


def test_recall_is_the_attention_mass_inside_topk(checkpoint):
    """With k >= every query's key count recall is undefined (NaN); with k = 1 it is in (0, 1)."""
    model = load(checkpoint)
    input_ids, attention_mask = batch()
    with torch.no_grad(), IndexerLoss(model, "dense") as indexer_loss:
        model(input_ids, attention_mask=attention_mask, index_topk=SEQ)
        assert torch.isnan(indexer_loss.recall)
        indexer_loss.reset()
        model(input_ids, attention_mask=attention_mask, index_topk=1)
    assert 0.0 < indexer_loss.recall.item() < 1.0


def _count_scoring(monkeypatch) -> list[int]:
    """Records the number of queries of every index-scoring call (the [T, queries, heads] products)."""
    calls = []
    original = ALL_ATTENTION_FUNCTIONS[modeling_mla_dsa.INDEX_SCORES]

    def counting(queries, *args):
        calls.append(queries.shape[1])
        return original(queries, *args)

    # registered as transformers registers (an item set on ALL_ATTENTION_FUNCTIONS would stay in its
    # local mapping after the test, over every later registration)
    monkeypatch.setitem(AttentionInterface._global_mapping, modeling_mla_dsa.INDEX_SCORES, counting)
    return calls


def test_sparse_stage_scores_every_key_once_per_layer(checkpoint, monkeypatch):
    """The selection scores every key once per DSA layer (in the forward, without autograd); the loss then scores
    only the selected keys, so backward scores no block of every key again."""
    model = load(checkpoint)
    prepare_indexer_training(model, "sparse")
    input_ids, attention_mask = batch()
    calls = _count_scoring(monkeypatch)
    with IndexerLoss(model, "sparse") as indexer_loss:
        out = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    layers = model.config.num_hidden_layers
    assert calls == [SEQ] * layers  # one block of all SEQ queries per layer
    (out.loss + indexer_loss.kl).backward()
    assert calls == [SEQ] * layers
    assert all(p.grad is not None for p in model.model.layers[0].self_attn.indexer.parameters())


def test_inference_scores_each_query_block_once(checkpoint, monkeypatch):
    model = load(checkpoint).eval()
    input_ids, attention_mask = batch()
    calls = _count_scoring(monkeypatch)
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, attention_mode="mha")
        model(input_ids, attention_mask=attention_mask, attention_mode="absorbed")
    assert calls == [SEQ] * (2 * model.config.num_hidden_layers)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_the_model_computes_no_training_loss(checkpoint, stage):
    """`indexer_stage=` is refused with the way to the loss; a forward's loss is the LM loss alone."""
    model = load(checkpoint)
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match="IndexerLoss"):
        model(input_ids, indexer_stage=stage)
    with IndexerLoss(model, stage):
        out = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    plain = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    torch.testing.assert_close(out.loss, plain.loss)
    assert not hasattr(out, "indexer_loss")


@pytest.mark.parametrize("stage", ["dense", "sparse"])
@pytest.mark.parametrize("indexer_types", [None, ["full", "shared"]], ids=["v32", "glm-shared"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(stage, indexer_types):
    """Each layer's loss is made inside its forward, which activation checkpointing replays in backward: the KL and
    every gradient are those without it (GLM-5's shared layers: the source indexer learns from both layers)."""
    from mla_dsa.modeling.configuration_mla_dsa import MlaDsaConfig

    torch.manual_seed(0)
    config = MlaDsaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                          qk_rope_head_dim=4, v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=5,
                          first_k_dense_replace=2, indexer_types=indexer_types)  # fmt: skip
    input_ids, attention_mask = batch()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = mla_dsa.MlaDsaForCausalLM(config).train()
        prepare_indexer_training(model, stage)
        if checkpointing:  # transformers' name for it (the older one before 5.25)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})
        indexer_loss = IndexerLoss(model, stage).install()
        out = model(input_ids, attention_mask=attention_mask, labels=input_ids, use_sparse_attention=stage == "sparse")
        kl = indexer_loss.kl
        (kl + out.loss if stage == "sparse" else kl).backward()
        indexer_loss.remove()
        # with checkpointing, backward replayed every layer's forward, and its loss with it
        assert len(indexer_loss.layers) == config.num_hidden_layers * (2 if checkpointing else 1)
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((kl.detach(), grads))
    (kl, grads), (kl_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(kl_checkpointed, kl)
    assert grads.keys() == grads_checkpointed.keys()
    assert any(".indexer." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, msg=name)
