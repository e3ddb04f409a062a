"""The indexer's KL loss inside the model: equal to a plain unchunked reference, chunked in memory, and wired so that
gradients reach only what the paper says they reach."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import mla_dsa
from mla_dsa.modeling import indexer_mla_dsa
from mla_dsa.modeling.indexer_loss_mla_dsa import dense_stage_loss
from mla_dsa.modeling.indexer_mla_dsa import IndexScorer
from mla_dsa.modeling.masks_mla_dsa import VisibleKeys
from mla_dsa.training import prepare_indexer_training

from peers import VOCAB, save_peer

SEQ = 14


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32")
    save_peer("deepseek_v32", path, index_topk=5)
    return path


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
    visible = VisibleKeys(0, seq, key_padding_mask, hidden.device)
    index_keys = attn.indexer.keys(hidden, cos, sin, fp8=False)
    scorer = attn.indexer(hidden, hidden_q_latent(attn, hidden), position_embeddings, index_keys, visible, None).scorer
    index_q, index_w, index_k = scorer.queries, scorer.weights, scorer.keys
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
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, indexer_stage=stage)
    for hook in hooks:
        hook.remove()
    layer_losses = []
    for idx, layer in enumerate(model.model.layers):
        args, kwargs, (_, stats, _, _) = captured[idx]
        hidden, position_embeddings, key_padding_mask = args[0], args[1], args[3]
        with torch.no_grad():
            expected = reference_layer_kl(
                layer.self_attn, hidden, position_embeddings, key_padding_mask, stage == "sparse"
            )
        torch.testing.assert_close(stats.kl, expected, atol=1e-7, rtol=1e-4)
        layer_losses.append(expected)
    torch.testing.assert_close(out.indexer_loss, torch.stack(layer_losses).mean(), atol=1e-7, rtol=1e-4)
    assert out.indexer_loss > 0


def test_loss_does_not_depend_on_chunk_size(checkpoint):
    input_ids, attention_mask = batch(1)
    results = []
    for chunk in (1, 4, 64):
        model = load(checkpoint, query_chunk_size=chunk)
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, indexer_stage="dense")
        results.append((out.indexer_loss, out.indexer_recall))
    for loss, recall in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(recall, results[0][1])


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
    bsz, seq, heads, index_heads, row, chunk = 1, 256, 8, 4, 24, 16
    main_query = torch.randn(bsz, seq, heads, row)
    latent = torch.randn(bsz, seq, row)
    index_q = torch.randn(bsz, seq, index_heads, 16, requires_grad=True)
    index_w = torch.randn(bsz, seq, index_heads)
    index_k = torch.randn(bsz, seq, 16)
    visible = VisibleKeys(0, seq, None, torch.device("cpu"))
    scorer = IndexScorer(index_q, index_w, index_k, 0.25)
    recorder = _LargestTensor()
    with recorder:
        stats = dense_stage_loss(scorer, visible, main_query, latent, 0.1, top_k=32, chunk_size=chunk)
        stats.kl.backward()
    assert index_q.grad is not None and index_q.grad.abs().sum() > 0
    assert recorder.largest <= bsz * chunk * max(heads, index_heads) * seq
    assert recorder.largest < bsz * heads * seq * seq // 4


def test_dense_stage_trains_only_the_indexer(checkpoint):
    model = load(checkpoint)
    before = model.config.to_dict()
    prepare_indexer_training(model, "dense")
    assert model.config.to_dict() == before  # the stage is a forward argument, not a config change
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".indexer." in name for name in trainable)
    input_ids, attention_mask = batch()
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, indexer_stage="dense")
    out.loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= trainable
    assert any("wq_b" in name for name in with_grad) and any("weights_proj" in name for name in with_grad)


def test_sparse_stage_separates_the_two_losses(checkpoint):
    model = load(checkpoint)
    prepare_indexer_training(model, "sparse")
    assert all(p.requires_grad for p in model.parameters())
    input_ids, attention_mask = batch()
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, indexer_stage="sparse")
    torch.testing.assert_close(out.loss, out.lm_loss + out.indexer_loss)

    out.lm_loss.backward(retain_graph=True)
    lm_grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert lm_grads and not any(".indexer." in name for name in lm_grads)
    model.zero_grad()
    out.indexer_loss.backward()
    kl_grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert kl_grads and all(".indexer." in name for name in kl_grads)


def test_recall_is_the_attention_mass_inside_topk(checkpoint):
    """With k >= every query's key count recall is undefined (NaN); with k = 1 it is in (0, 1)."""
    model = load(checkpoint)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, indexer_stage="dense", index_topk=SEQ)
        assert torch.isnan(out.indexer_recall)
        recall = model(input_ids, attention_mask=attention_mask, indexer_stage="dense", index_topk=1).indexer_recall
    assert 0.0 < recall.item() < 1.0


def _count_scoring(monkeypatch) -> list[int]:
    """Records the number of queries of every index-scoring call (the [T, queries, heads] products)."""
    calls = []
    original = indexer_mla_dsa.index_scores

    def counting(queries, *args):
        calls.append(queries.shape[1])
        return original(queries, *args)

    monkeypatch.setattr(indexer_mla_dsa, "index_scores", counting)
    return calls


def test_sparse_stage_scores_each_query_block_once(checkpoint, monkeypatch):
    """One selection per layer feeds the attention and the loss: each DSA layer scores its queries once in the
    forward pass and once more in backward (the checkpointed block is recomputed), never per consumer."""
    model = load(checkpoint)
    prepare_indexer_training(model, "sparse")
    input_ids, attention_mask = batch()
    calls = _count_scoring(monkeypatch)
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, indexer_stage="sparse")
    layers = model.config.num_hidden_layers
    assert calls == [SEQ] * layers  # one block of all SEQ queries per layer
    out.loss.backward()
    assert calls == [SEQ] * (2 * layers)
    assert all(p.grad is not None for p in model.model.layers[0].self_attn.indexer.parameters())


def test_inference_scores_each_query_block_once(checkpoint, monkeypatch):
    model = load(checkpoint).eval()
    input_ids, attention_mask = batch()
    calls = _count_scoring(monkeypatch)
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, attention_mode="mha")
        model(input_ids, attention_mask=attention_mask, attention_mode="absorbed")
    assert calls == [SEQ] * (2 * model.config.num_hidden_layers)
