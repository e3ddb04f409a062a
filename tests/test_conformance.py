"""Where transformers' common tests look (issue 13): output flags from the config and the forward, tuples with
return_dict=False, attention probabilities, the loss keywords. Each is checked against transformers' own
DeepseekV32 on the same weights, or against transformers' documented rule where the peer cannot show it."""

import pytest
import torch
import transformers

import mla_dsa
from mla_dsa.modeling.modeling_mla_dsa import CACHE_NAME

from peers import save_peer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(v32_checkpoint):
    return v32_checkpoint  # the session's (conftest.py)


def _pair(directory, **kwargs):
    peer = transformers.DeepseekV32ForCausalLM.from_pretrained(directory, attn_implementation="eager", **kwargs)
    return peer.eval(), mla_dsa.MlaDsaForCausalLM.from_pretrained(directory, **kwargs).eval()


def _ids(batch=2, length=11, seed=0):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("where", ["config", "forward"])
def test_output_hidden_states_from_the_config_or_the_forward(saved, where):
    flags = {"output_hidden_states": True}
    peer, ours = _pair(saved, **(flags if where == "config" else {}))
    input_ids = _ids()
    with torch.no_grad():
        expected = peer(input_ids, **(flags if where == "forward" else {})).hidden_states
        actual = ours(input_ids, **(flags if where == "forward" else {})).hidden_states
    assert actual is not None and len(actual) == len(expected) == ours.config.num_hidden_layers + 1
    for mine, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    with torch.no_grad():  # a forward keyword overrides the config; without either, none
        assert ours(input_ids, **({"output_hidden_states": False} if where == "config" else {})).hidden_states is None


@pytest.mark.parametrize("where", ["config", "forward"])
def test_output_router_logits_equal_the_peers(saved, where):
    """One float32 [tokens, experts] tensor per MoE layer, as transformers' DeepseekV32 records them, from the causal
    LM and the base model alike."""
    flags = {"output_router_logits": True}
    peer, ours = _pair(saved, **(flags if where == "config" else {}))
    input_ids = _ids()
    with torch.no_grad():
        expected = peer(input_ids, **(flags if where == "forward" else {})).router_logits
        actual = ours(input_ids, **(flags if where == "forward" else {})).router_logits
        base = ours.model(input_ids, **(flags if where == "forward" else {})).router_logits
    moe_layers = ours.config.num_hidden_layers - ours.config.first_k_dense_replace
    assert actual is not None and len(actual) == len(expected) == len(base) == moe_layers > 0
    for mine, theirs, from_base in zip(actual, expected, base, strict=True):
        assert mine.dtype == torch.float32 and mine.shape == (input_ids.numel(), ours.config.n_routed_experts)
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
        torch.testing.assert_close(from_base, mine)
    with torch.no_grad():  # a forward keyword overrides the config; without either, none
        assert ours(input_ids, **({"output_router_logits": False} if where == "config" else {})).router_logits is None


@pytest.mark.parametrize("where", ["config", "forward"])
def test_return_dict_false_gives_the_peers_tuple(saved, where):
    """The peer's tuple comes from the forward keyword (its config-level return_dict=False breaks its own CausalLM
    forward on transformers 5.24: the base model's tuple has no last_hidden_state); ours honours both."""
    peer, ours = _pair(saved)
    if where == "config":
        ours.config.return_dict = False
    input_ids = _ids()
    kwargs = {"return_dict": False} if where == "forward" else {}
    with torch.no_grad():
        expected = peer(input_ids, labels=input_ids, return_dict=False)
        actual, base = ours(input_ids, labels=input_ids, **kwargs), ours.model(input_ids, **kwargs)
    assert type(actual) is tuple and type(expected) is tuple and type(base) is tuple
    torch.testing.assert_close(actual[0], expected[0], atol=1e-4, rtol=0)  # loss
    torch.testing.assert_close(actual[1], expected[1], atol=1e-4, rtol=0)  # logits
    assert isinstance(actual[2], transformers.Cache) and isinstance(expected[2], transformers.Cache)
    torch.testing.assert_close(base[0], ours.model(input_ids, return_dict=True).last_hidden_state)


def test_use_cache_from_the_config(saved):
    peer, ours = _pair(saved, use_cache=False)
    with torch.no_grad():
        assert getattr(peer(_ids()), CACHE_NAME) is None and getattr(ours(_ids()), CACHE_NAME) is None
        assert getattr(ours(_ids(), use_cache=True), CACHE_NAME) is not None


@pytest.mark.parametrize("mode", ["mha", "absorbed"])
def test_output_attentions_equal_the_peers_probabilities(saved, mode):
    """[batch, heads, queries, keys] per layer, 0 at keys the indexer did not select (k = 5 of 11)."""
    peer, ours = _pair(saved, output_attentions=True)
    ours.config.attention_mode = mode
    input_ids = _ids()
    with torch.no_grad():
        expected, out = peer(input_ids).attentions, ours(input_ids)
    assert len(out.attentions) == len(expected) == ours.config.num_hidden_layers
    for mine, theirs in zip(out.attentions, expected, strict=True):
        assert mine.shape == (2, ours.config.num_attention_heads, 11, 11)
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
        assert ((mine > 0).sum(-1) <= 5).all()  # only selected keys carry probability
    with torch.no_grad():
        torch.testing.assert_close(out.logits, ours(input_ids, output_attentions=False).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("field", ["attentions", "hidden_states"])
def test_generate_returns_the_peers_attentions_and_hidden_states(saved, field):
    peer, ours = _pair(saved)
    input_ids = _ids(length=7)
    settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, **{f"output_{field}": True})
    expected, actual = peer.generate(input_ids, **settings), ours.generate(input_ids, **settings)
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(getattr(actual, field)) == len(getattr(expected, field)) == 4  # one tuple of layers per step
    for step_mine, step_theirs in zip(getattr(actual, field), getattr(expected, field), strict=True):
        for mine, theirs in zip(step_mine, step_theirs, strict=True):
            assert mine.shape == theirs.shape
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_pre_shifted_labels_give_the_unshifted_loss(saved):
    """Context/sequence parallelism hands the loss `shift_labels` (labels already shifted and padded with -100)."""
    _, ours = _pair(saved)
    input_ids = _ids()
    shift_labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        unshifted = ours(input_ids, labels=input_ids).loss
        shifted = ours(input_ids, shift_labels=shift_labels).loss
        wrong = ours(input_ids, shift_labels=input_ids).loss  # not shifted: a different loss
    torch.testing.assert_close(shifted, unshifted)
    assert not torch.allclose(wrong, unshifted)


def test_num_items_in_batch_and_ignore_index_reach_the_loss(saved):
    peer, ours = _pair(saved)
    input_ids = _ids()
    labels = input_ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        expected = peer(input_ids, labels=labels, num_items_in_batch=7).loss  # Trainer's token-count scaling
        torch.testing.assert_close(ours(input_ids, labels=labels, num_items_in_batch=7).loss, expected, atol=1e-5,
                                   rtol=0)  # fmt: skip
        mean = ours(input_ids, labels=labels).loss
        summed = ours(input_ids, labels=labels, num_items_in_batch=1).loss
        torch.testing.assert_close(summed, mean * 2 * 7)  # 2 rows x 7 counted next-token targets (labels 4..10)
        # another ignored id: ForCausalLMLoss's ignore_index (the peer drops it on 5.24: "Target -1 out of bounds")
        relabelled = torch.where(labels == -100, -1, labels)
        torch.testing.assert_close(ours(input_ids, labels=relabelled, ignore_index=-1).loss, mean)


# ------------------------------------------------------------------------------------------- classification heads
@pytest.fixture(scope="module")
def converted_v3(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    save_peer("deepseek_v3", root / "dense")
    mla_dsa.convert_checkpoint(root / "dense", root / "dsa", progress=False)
    return root


HEADS = {
    "sequence": (transformers.DeepseekV3ForSequenceClassification, mla_dsa.MlaDsaForSequenceClassification,
                 transformers.AutoModelForSequenceClassification),
    "token": (transformers.DeepseekV3ForTokenClassification, mla_dsa.MlaDsaForTokenClassification,
              transformers.AutoModelForTokenClassification),
}  # fmt: skip


@pytest.mark.parametrize("task", list(HEADS))
def test_classification_heads_equal_deepseek_v3s(converted_v3, tmp_path, task):
    """On the same backbone and score weights: logits and loss equal DeepseekV3's, on a left-padded batch (the
    sequence head scores each row's last real token); the Auto class finds ours; save/load round-trips."""
    peer_class, our_class, auto_class = HEADS[task]
    peer = peer_class.from_pretrained(converted_v3 / "dense", num_labels=3).eval()
    ours = auto_class.from_pretrained(converted_v3 / "dsa", num_labels=3, use_sparse_attention=False).eval()
    assert type(ours) is our_class
    ours.score.load_state_dict(peer.score.state_dict())
    input_ids = _ids(batch=3, length=9)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3], attention_mask[1, :3] = 0, 0  # left padding (pad_token_id = 0)
    labels = torch.tensor([0, 2, 1]) if task == "sequence" else torch.randint(0, 3, (3, 9))
    with torch.no_grad():
        expected = peer(input_ids, attention_mask=attention_mask, labels=labels)
        actual = ours(input_ids, attention_mask=attention_mask, labels=labels)
    rows = slice(None) if task == "sequence" else (slice(None), slice(3, None))  # padded positions: any value
    torch.testing.assert_close(actual.logits[rows], expected.logits[rows], atol=1e-4, rtol=0)
    if task == "sequence":
        torch.testing.assert_close(actual.loss, expected.loss, atol=1e-4, rtol=0)
    ours.save_pretrained(tmp_path / "head")
    again = auto_class.from_pretrained(tmp_path / "head").eval()
    assert again.config.num_labels == 3 and "modeling_mla_dsa.py" in {p.name for p in (tmp_path / "head").iterdir()}
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids, attention_mask=attention_mask).logits, actual.logits)


def test_a_lora_fine_tune_step_of_the_sequence_classifier(converted_v3):
    """PEFT's SEQ_CLS task trains LoRA on the attention and the score head in full; a few steps on one batch lower
    its loss, and the base weights stay untouched."""
    from peft import LoraConfig, get_peft_model

    model = mla_dsa.MlaDsaForSequenceClassification.from_pretrained(converted_v3 / "dsa", num_labels=2)
    base_weight = model.model.layers[1].self_attn.q_b_proj.weight.detach().clone()
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_b_proj", "kv_b_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert any("lora_" in name for name in trainable) and any(".score." in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    input_ids, labels = _ids(batch=4, length=10), torch.tensor([0, 1, 1, 0])
    peft_model.train()
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    torch.testing.assert_close(model.model.layers[1].self_attn.q_b_proj.base_layer.weight, base_weight)


# --------------------------------------------------------------------------------- attn_implementation and flags
def test_eager_is_the_explicit_path_and_sdpa_the_default(saved, monkeypatch):
    """attn_implementation is honoured: "eager" never calls SDPA (and is what output_attentions uses), "sdpa" (the
    default, as for DeepseekV32) does in MHA mode; both give the same logits. Flash/flex attention are refused."""
    eager = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    sdpa = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved, attention_mode="mha").eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    input_ids = _ids()
    with torch.no_grad():
        expected = sdpa(input_ids).logits

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids).logits, expected, atol=1e-5, rtol=0)
        with pytest.raises(AssertionError, match="SDPA called"):
            sdpa(input_ids)
    for unsupported in ("flash_attention_2", "flex_attention"):
        with pytest.raises((ValueError, ImportError)):
            mla_dsa.MlaDsaForCausalLM.from_pretrained(saved, attn_implementation=unsupported)


def test_set_attn_implementation_switches_as_the_peers_does(saved, monkeypatch):
    """`model.set_attn_implementation(...)` after loading: transformers allows it for a model whose file looks its
    attention up with `ALL_ATTENTION_FUNCTIONS.get_interface(` (ours was left on "sdpa" with a warning). Switched to
    eager the model never calls SDPA and gives the sdpa logits; flex attention is refused, as by the peer."""
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved, attention_mode="mha").eval()
    input_ids = _ids()
    with torch.no_grad():
        expected = model(input_ids).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=0)
    monkeypatch.undo()
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    peer, _ = _pair(saved)
    for candidate in (peer, model):
        with pytest.raises(ValueError):
            candidate.set_attn_implementation("flex_attention")


@pytest.mark.parametrize("kind", ["positions per row", "bool mask"])
def test_logits_to_keep_as_a_2d_tensor_as_the_peer(saved, kind):
    """transformers reads a 2D `logits_to_keep` as positions per row ([B, n] integers) or as a mask ([B, S] bool,
    flattened to [count, vocab]); ours had indexed the sequence dimension with it."""
    peer, ours = _pair(saved)
    input_ids = _ids(length=12)
    if kind == "bool mask":
        keep = torch.zeros(2, 12, dtype=torch.bool)
        keep[0, [1, 2]] = keep[1, 7] = True
    else:
        keep = torch.tensor([[0, 5], [3, 11]])
    with torch.no_grad():
        expected = peer(input_ids, logits_to_keep=keep).logits
        got = ours(input_ids, logits_to_keep=keep).logits
        full = ours(input_ids).logits
    assert got.shape == expected.shape == ((3, full.shape[-1]) if kind == "bool mask" else (2, 2, full.shape[-1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, full[keep] if kind == "bool mask" else full.gather(
        1, keep[..., None].expand(-1, -1, full.shape[-1])))  # fmt: skip


@pytest.mark.parametrize("mode", ["absorbed", "mha"])
def test_attention_dropout_applies_in_training_in_every_mode(saved, mode):
    """config.attention_dropout in train mode drops attention probabilities whichever path attends (the absorbed one,
    which "auto" picks for short inputs, had applied none), and nothing in eval mode, as the peer."""
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved, attention_mode=mode, attention_dropout=0.5)
    input_ids = _ids(length=12)

    def logits(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(input_ids).logits

    model.train()
    assert not torch.equal(logits(0), logits(1))
    model.eval()
    assert torch.equal(logits(0), logits(1))


# ------------------------------------------------------------------------------------------------------- RoPE
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
             "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
                 "long_factor": [2.0, 2.5, 3.0, 4.0], "original_max_position_embeddings": 16},
}  # fmt: skip


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_every_rope_type_equals_the_peer_past_max_position_embeddings(tmp_path, rope_type):
    """40 positions on a model built for 24: transformers runs them, and so do we, with its frequencies (dynamic
    NTK grows them with the sequence, longrope switches to its long factors)."""
    peer = save_peer("deepseek_v32", tmp_path, index_topk=64, max_position_embeddings=24,
                     rope_parameters=ROPE_TYPES[rope_type])  # fmt: skip
    ours = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path).eval()
    for length in (12, 40, 12):  # dynamic/longrope: short, long, and back to short
        input_ids = _ids(batch=1, length=length, seed=length)
        with torch.no_grad():
            expected = peer(input_ids).logits
            actual = ours(input_ids).logits
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.model.rotary_emb.inv_freq, peer.model.rotary_emb.inv_freq)


def test_a_rope_type_transformers_cannot_compute_is_refused_at_config_time():
    with pytest.raises(ValueError, match="rope_type"):
        mla_dsa.MlaDsaConfig(rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 10000.0})


# ------------------------------------------------------------------------------------------ loading semantics
def test_from_pretrained_with_no_path_takes_config_and_state_dict(saved):
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved).eval()
    again = mla_dsa.MlaDsaForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize("direction", ["base into causal-lm", "causal-lm into base"])
def test_base_and_causal_lm_checkpoints_load_into_each_other_as_the_peers(saved, tmp_path, direction):
    ours_lm = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved)
    peer_lm = transformers.DeepseekV32ForCausalLM.from_pretrained(saved)
    classes = {"ours": (mla_dsa.MlaDsaModel, mla_dsa.MlaDsaForCausalLM),
               "peer": (transformers.DeepseekV32Model, transformers.DeepseekV32ForCausalLM)}  # fmt: skip
    infos = {}
    for who, lm in (("ours", ours_lm), ("peer", peer_lm)):
        base_class, lm_class = classes[who]
        if direction == "base into causal-lm":
            lm.model.save_pretrained(tmp_path / who)
            loaded, infos[who] = lm_class.from_pretrained(tmp_path / who, output_loading_info=True)
            backbone = loaded.model
        else:
            lm.save_pretrained(tmp_path / who)
            backbone, infos[who] = base_class.from_pretrained(tmp_path / who, output_loading_info=True)
        with torch.no_grad():
            expected = lm.model.eval()(_ids()).last_hidden_state
            torch.testing.assert_close(backbone.eval()(_ids()).last_hidden_state, expected)
    for field in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert set(infos["ours"][field]) == set(infos["peer"][field]), (field, infos)
    if direction == "base into causal-lm":
        assert set(infos["ours"]["missing_keys"]) == {"lm_head.weight"}


def test_tied_embeddings_save_once_and_load_tied(tmp_path):
    save_peer("deepseek_v32", tmp_path / "peer", index_topk=5, tie_word_embeddings=True)
    model, info = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "peer", output_loading_info=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in info["missing_keys"]
    model.save_pretrained(tmp_path / "ours")
    again = mla_dsa.MlaDsaForCausalLM.from_pretrained(tmp_path / "ours")
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------------------------------------- packed batches
@pytest.mark.parametrize("setting", ["training (MHA)", "scoring (absorbed, sparse)"])
def test_a_flattened_batch_gives_each_sequence_what_it_gets_alone(saved, setting):
    """DataCollatorWithFlattening (TRL's padding_free): one row, position ids restarting per sequence. Logits,
    attention probabilities (so the indexer's selection) and the loss of each sequence equal its own forward."""
    model = mla_dsa.MlaDsaForCausalLM.from_pretrained(saved)
    if setting.startswith("training"):
        model.train()
        model.config.attention_mode = "mha"
    else:
        model.eval()
        model.config.attention_mode = "absorbed"
    sequences = [_ids(batch=1, length=n, seed=n)[0] for n in (9, 12, 7)]
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences])
    assert batch["input_ids"].shape == (1, 28) and batch["position_ids"][0, 9] == 0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                       output_attentions=True, use_cache=False)  # fmt: skip
        start, total_loss, total_targets = 0, 0.0, 0
        for sequence in sequences:
            alone = model(sequence[None], labels=sequence[None], output_attentions=True, use_cache=False)
            end = start + len(sequence)
            torch.testing.assert_close(packed.logits[:, start:end], alone.logits, atol=1e-5, rtol=0)
            for layer_packed, layer_alone in zip(packed.attentions, alone.attentions, strict=True):
                torch.testing.assert_close(layer_packed[..., start:end, start:end], layer_alone, atol=1e-6, rtol=0)
                assert not layer_packed[..., start:end, :start].any()  # nothing across the boundary
            total_loss += alone.loss * (len(sequence) - 1)
            total_targets += len(sequence) - 1
            start = end
    torch.testing.assert_close(packed.loss, total_loss / total_targets, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("mode", ["mha", "absorbed"])
def test_a_custom_4d_mask_gives_the_peers_logits(saved, kind, mode):
    """A 4D mask [B, 1, S, T] (transformers' custom masks: boolean, or additive with 0 where a key is seen) replaces
    causality for the attention and the indexer alike, as in DeepseekV32: here two sequences packed in each row,
    each causal within itself, with DSA selecting 5 keys. The peer runs SDPA (its default): transformers 5.25's
    eager path adds a boolean mask to the scores as numbers."""
    _, ours = _pair(saved)
    peer = transformers.DeepseekV32ForCausalLM.from_pretrained(saved, attn_implementation="sdpa").eval()
    input_ids = _ids(length=14)
    causal = torch.ones(14, 14, dtype=torch.bool).tril()
    first = torch.arange(14) < 6  # tokens 0-5 are one sequence, 6-13 another
    mask = (causal & (first[:, None] == first[None, :]))[None, None].expand(2, 1, 14, 14)
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = peer(input_ids, attention_mask=mask).logits
        actual = ours(input_ids, attention_mask=mask, attention_mode=mode).logits
        causal_only = ours(input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(actual[:, 6:], causal_only[:, 6:], atol=1e-3)  # the mask changed what was seen


def test_gradient_checkpointing_with_use_cache_trains_as_the_peer(saved):
    """transformers' DeepseekV32: one warning, use_cache turned off, no cache returned; the loss and its gradients are
    those of an unchecked step (a cache passed positionally used to raise CheckpointError in backward)."""
    peer = transformers.DeepseekV32ForCausalLM.from_pretrained(saved)
    input_ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, model in (("peer", peer), ("ours", mla_dsa.MlaDsaForCausalLM.from_pretrained(saved))):
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


def test_layers_return_hidden_states_and_the_indexer_only_its_selection(saved):
    """As transformers' layers: a decoder layer returns its hidden states, the attention (output, probabilities); the
    indexer returns its selection (indices, valid) and nothing training-only."""
    _, ours = _pair(saved)
    outputs = {}
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out))
             for name, module in (("layer", ours.model.layers[1]), ("attention", ours.model.layers[1].self_attn),
                                  ("indexer", ours.model.layers[1].self_attn.indexer))]  # fmt: skip
    with torch.no_grad():
        ours(_ids(length=11))  # index_topk 5 < 11 keys: the indexer selects
    for hook in hooks:
        hook.remove()
    assert isinstance(outputs["layer"], torch.Tensor) and outputs["layer"].shape == (2, 11, ours.config.hidden_size)
    assert len(outputs["attention"]) == 2 and outputs["attention"][1] is None
    indices, valid = outputs["indexer"]
    assert type(outputs["indexer"])._fields == ("indices", "valid") and indices.shape == valid.shape == (2, 11, 5)
