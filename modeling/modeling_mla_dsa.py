"""MLA + DeepSeek Sparse Attention models, loadable with `trust_remote_code=True`: the base model, the causal LM and
the classification heads (their common base and decoder layer are in `pretrained_mla_dsa.py`).

Decoder layer = MLA attention with a lightning indexer (`attention_mla_dsa.py`), then a dense MLP (layers below
`first_k_dense_replace`) or DeepSeek MoE (`moe_mla_dsa.py`).

The routed experts are `@use_experts_implementation` (in `moe_mla_dsa.py`). transformers decides whether a model's
`experts_implementation` may be chosen by finding that decorator's name in the source of the module that defines the
model class - this one - which is why it is named here: so "grouped_mm" (transformers' default, as for DeepseekV32)
and "batched_mm" can be chosen for our models too.
"""

import torch
import torch.nn as nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .attention_mla_dsa import MlaDsaRMSNorm
from .cache_mla_dsa import MlaDsaCache, cache_lengths, check_cache, static_cache_size
from .compat_mla_dsa import CACHE_NAME, cache_field, take_cache
from .configuration_mla_dsa import MlaDsaConfig
from .inputs_mla_dsa import (
    check_input_ids,
    key_padding_mask_of,
    out_of_range_ids,
    output_flags,
    packed_segment_ids,
    padded_to_keys,
    refuse_training_arguments,
)
from .pretrained_mla_dsa import MlaDsaDecoderLayer, MlaDsaPreTrainedModel
from .rope_mla_dsa import MlaDsaRotaryEmbedding
from .settings_mla_dsa import DsaSettings

# Keywords transformers passes to `loss_function` (ForCausalLMLoss): Trainer's token count, pre-shifted labels of
# context/sequence parallelism, the ignored label id.
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")

logger = logging.get_logger(__name__)


class MlaDsaModel(MlaDsaPreTrainedModel):
    _auto_class = "AutoModel"  # save_pretrained copies the payload files beside the weights

    def __init__(self, config: MlaDsaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MlaDsaDecoderLayer(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = MlaDsaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MlaDsaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        """`cache`: an `MlaDsaCache` (or `DynamicCache(config=model.config)`); `past_key_values` is its older name.
        Output flags left unset take the config's values, as in transformers' own models; hidden states, attentions
        and router logits are recorded by transformers' output capture (`_can_record_outputs`), `return_dict` too.
        `use_sparse_attention`, `index_topk`, `attention_mode`: this call's DSA choices (see `DsaSettings`), the
        config's where unset."""
        cache = take_cache(cache, kwargs, "MlaDsaModel.forward")
        refuse_training_arguments(kwargs)
        settings = DsaSettings.resolve(self.config, use_sparse_attention, index_topk, attention_mode)
        _, output_attentions = output_flags(self.config, output_hidden_states, output_attentions)
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        use_cache = self._wants_cache(use_cache)
        if cache is not None:
            check_cache(cache, self.config.num_hidden_layers, "MlaDsaModel")
        if use_cache and cache is None:
            cache = MlaDsaCache(self.config)
        batch_size, seq_len = inputs_embeds.shape[:2]
        # A static cache's length is a device scalar and its key count fixed: no host-side length, one shape per step.
        past_len, num_keys = cache_lengths(cache, seq_len)
        static = isinstance(past_len, torch.Tensor)
        key_padding_mask = key_padding_mask_of(attention_mask, batch_size, num_keys, static, seq_len)
        segment_ids = None
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_len).unsqueeze(0)
        elif not static and past_len == 0:
            segment_ids = packed_segment_ids(position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        selection = None
        for layer in self.layers:
            # `selection`: the last full layer's top-k, which the shared layers after it reuse (GLM-5's indexer_types)
            hidden_states, _, selection = layer(
                hidden_states, position_embeddings, settings, key_padding_mask, output_attentions=output_attentions,
                segment_ids=segment_ids, past_len=past_len, shared_selection=selection,
                **cache_field(cache if use_cache else None), **kwargs,
            )  # fmt: skip
        return MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **cache_field(cache if use_cache else None)
        )

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B, S, hidden] from exactly one of input_ids (checked) and inputs_embeds."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MlaDsaModel: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids)
            try:
                inputs_embeds = self.embed_tokens(input_ids)
            except IndexError:  # an id outside the vocabulary (CPU; on GPUs the lookup asserts on the device)
                raise out_of_range_ids(input_ids, self.config.vocab_size) from None
        if inputs_embeds.shape[1] == 0:
            raise ValueError("MlaDsaModel: got an empty sequence (0 new tokens)")
        return inputs_embeds

    def _wants_cache(self, use_cache: bool | None) -> bool:
        """The forward's `use_cache`, else the config's outside training; never under gradient checkpointing."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # As transformers' own models: a checkpointed layer replayed in backward would write the cache twice.
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing: setting use_cache=False")
            use_cache = False
        return use_cache


class MlaDsaForCausalLM(MlaDsaPreTrainedModel, GenerationMixin):
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the payload files beside the weights
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as DeepseekV32's: vocabulary split, logits gathered

    def __init__(self, config: MlaDsaConfig):
        super().__init__(config)
        # DeepSeek-V3 checkpoints carry multi-token-prediction layers after the last decoder layer: not ours.
        first_mtp = config.num_hidden_layers
        self._keys_to_ignore_on_load_unexpected = [
            rf"model\.layers\.{idx}\." for idx in range(first_mtp, first_mtp + 4)
        ]
        self.model = MlaDsaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        """Causal LM forward. `use_sparse_attention`, `index_topk` and `attention_mode` override the config's
        defaults for this call (see `DsaSettings`); `generate()` passes them on to every step. The indexer's training
        losses are not the model's: the `mla_dsa` package computes them (`mla_dsa.IndexerLoss`). `cache`: an
        `MlaDsaCache` (or `DynamicCache(config=model.config)`);
        `past_key_values` is its older name."""
        cache = take_cache(cache, kwargs, "MlaDsaForCausalLM.forward")
        kwargs.pop("cache_position", None)
        # transformers' loss keywords (Trainer's num_items_in_batch, context parallelism's pre-shifted labels, ...)
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        output_hidden_states, output_attentions = output_flags(self.config, output_hidden_states, output_attentions)
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_router_logits=output_router_logits,
            return_dict=True,
            use_sparse_attention=use_sparse_attention,
            index_topk=index_topk,
            attention_mode=attention_mode,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None or loss_kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_field(getattr(outputs, CACHE_NAME)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def generate(self, *args, **kwargs):
        """transformers' `generate()`, on a cache of our layers: `DynamicCache(config)` builds MlaDsaCacheLayer for
        this config, `cache_implementation="static"` (and "offloaded_static") MlaDsaStaticCacheLayer, preallocated
        for a compiled decode step. Quantized caches hold per-head keys and values, which this model does not make."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
        if implementation not in (None, "dynamic", "dynamic_full", "static", "offloaded_static"):
            raise ValueError(
                f"MlaDsaForCausalLM.generate: cache_implementation={implementation!r} is not supported; the model "
                'caches latent + indexer keys in its own layers (leave it unset, or "static" for a fixed-size cache)'
            )
        return super().generate(*args, **kwargs)

    def create_masks_for_generate(self, *args, attention_mask: torch.Tensor | None = None, **kwargs):
        """What `generate()` passes as the attention mask with a static cache (transformers' hook for models that
        mask their own way): our 2D key padding mask, padded to the cache's fixed size, so every compiled decode
        step sees one shape (the slots past the tokens so far are later than every query: causality hides them)."""
        cache = kwargs.get(CACHE_NAME, kwargs.get("past_key_values"))
        size = static_cache_size(cache)
        if attention_mask is None or attention_mask.dim() != 2 or size is None:
            return attention_mask
        return padded_to_keys(attention_mask.bool(), size)


class MlaDsaForSequenceClassification(MlaDsaPreTrainedModel):
    """A linear score on the last non-pad token (transformers' generic sequence classifier, as DeepseekV3's):
    reward models and classifiers on an MLA+DSA backbone. The loss follows `config.problem_type`."""

    _auto_class = "AutoModelForSequenceClassification"

    def __init__(self, config: MlaDsaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MlaDsaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        outputs = self._backbone(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs)
        logits = self.score(outputs.last_hidden_state)  # [B, S, num_labels]
        batch_size = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("MlaDsaForSequenceClassification: batches of more than one row need a pad_token_id")
        if pad_token_id is None or input_ids is None:
            last_token = torch.full((batch_size,), -1, device=logits.device)
        else:  # the rightmost non-pad token: left and right padding alike
            positions = torch.arange(input_ids.shape[-1], device=logits.device)
            last_token = (positions * (input_ids != pad_token_id).to(logits.device)).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            **cache_field(getattr(outputs, CACHE_NAME)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class MlaDsaForTokenClassification(MlaDsaPreTrainedModel):
    """A linear score on every token after dropout (transformers' generic token classifier, as DeepseekV3's)."""

    _auto_class = "AutoModelForTokenClassification"

    def __init__(self, config: MlaDsaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MlaDsaModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        outputs = self._backbone(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs)
        logits = self.score(self.dropout(outputs.last_hidden_state))  # [B, S, num_labels]
        loss = self.loss_function(logits, labels, self.config) if labels is not None else None
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "MlaDsaCache",
    "MlaDsaConfig",
    "MlaDsaForCausalLM",
    "MlaDsaForSequenceClassification",
    "MlaDsaForTokenClassification",
    "MlaDsaModel",
    "MlaDsaPreTrainedModel",
]
