"""MLA + DeepSeek Sparse Attention models, loadable with `trust_remote_code=True`: the base model, the causal LM and
the classification heads.

Decoder layer = MLA attention with a lightning indexer (`attention_mla_dsa.py`), then a dense MLP (layers below
`first_k_dense_replace`) or DeepSeek MoE (`moe_mla_dsa.py`). Loading checks beyond transformers' live in
`loading_mla_dsa.py`.
"""

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.utils import logging

from .attention_mla_dsa import MlaDsaAttention, MlaDsaRMSNorm
from .cache_mla_dsa import MlaDsaCache, check_cache
from .compat_mla_dsa import CACHE_NAME, CACHE_NAMES, cache_field, take_cache
from .configuration_mla_dsa import MlaDsaConfig
from .indexer_loss_mla_dsa import IndexerStats
from .loading_mla_dsa import check_weight_file, warn_if_code_is_older, warn_if_indexer_missing, weight_files
from .moe_mla_dsa import MlaDsaMLP, MlaDsaMoE, MlaDsaRouter
from .rope_mla_dsa import MlaDsaRotaryEmbedding
from .settings_mla_dsa import DsaSettings

# Keywords transformers passes to `loss_function` (ForCausalLMLoss): Trainer's token count, pre-shifted labels of
# context/sequence parallelism, the ignored label id.
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")

logger = logging.get_logger(__name__)


class MlaDsaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MlaDsaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MlaDsaAttention(config, layer_idx)
        self.mlp = MlaDsaMoE(config) if config.is_moe_layer(layer_idx) else MlaDsaMLP(config)
        self.input_layernorm = MlaDsaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MlaDsaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        settings: DsaSettings,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, IndexerStats | None, torch.Tensor | None]:
        # The cache comes by keyword, under the running transformers' name (CACHE_NAME): GradientCheckpointingLayer
        # looks for it there to drop it (with one warning) when a checkpointed training step asks for a cache.
        cache = kwargs.pop(CACHE_NAME, None)
        residual = hidden_states
        attn_output, stats, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, settings, key_padding_mask, cache,
            output_attentions=output_attentions, **kwargs,
        )  # fmt: skip
        hidden_states = residual + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), stats, attn_weights


class MlaDsaPreTrainedModel(PreTrainedModel):
    config_class = MlaDsaConfig
    config: MlaDsaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MlaDsaDecoderLayer"]
    _skip_keys_device_placement = CACHE_NAMES
    _supports_sdpa = True
    # The indexer's head weights stay float32 in bf16/fp16 models, as in DeepSeek's inference code.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "indexer.weights_proj"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`: missing tensors are initialized and unexpected ones ignored, both
        reported in its load report and in `output_loading_info`; `pretrained_model_name_or_path=None` with
        `config=` and `state_dict=` works. Ours on top: a truncated or corrupt local weight file, or a tensor whose
        shape the config contradicts, is one ValueError naming the tensor and the file (`ignore_mismatched_sizes=True`
        re-initializes it instead, as in transformers); a checkpoint with no indexer at all (a dense MLA one) gets one
        warning on how to train it; a checkpoint carrying older code of ours, one notice."""
        wants_info = kwargs.pop("output_loading_info", False)
        tolerate_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        path = pretrained_model_name_or_path
        directory = Path(path) if path is not None and os.path.isdir(path) else None
        files = weight_files(directory) if directory is not None else {}
        for filename in sorted(set(files.values())):
            check_weight_file(directory / filename)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, ignore_mismatched_sizes=True,
                                              **kwargs)  # fmt: skip
        for key, checkpoint_shape, model_shape in info.get("mismatched_keys", ()) if not tolerate_mismatch else ():
            where = directory / files[key] if key in files else path
            raise ValueError(f"{where}: tensor {key} has shape {list(checkpoint_shape)}, the config gives "
                             f"{list(model_shape)}")  # fmt: skip
        if directory is not None and (directory / "modeling_mla_dsa.py").is_file():  # it carries our code
            warn_if_code_is_older(model.config, directory)
        warn_if_indexer_missing(model, set(info.get("missing_keys", ())), path)
        return (model, info) if wants_info else model

    def _backbone(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs):
        """The base model's output object for a head's forward (the cache under either name)."""
        cache = take_cache(cache, kwargs, f"{type(self).__name__}.forward")
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)  # fmt: skip

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MlaDsaRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if hasattr(module, "e_score_correction_bias"):
                init.zeros_(module.e_score_correction_bias)


@dataclass
class MlaDsaModelOutput(BaseModelOutputWithPast):
    """`indexer_loss`: mean over layers of the indexer's KL loss (when requested); `indexer_recall`: mean over layers
    of the attention mass its top-k covers (dense stage; NaN when no query has more than `index_topk` keys)."""

    indexer_loss: torch.FloatTensor | None = None
    indexer_recall: torch.FloatTensor | None = None


@dataclass
class MlaDsaCausalLMOutput(CausalLMOutputWithPast):
    """`loss` = `lm_loss` (with labels) + `indexer_loss` (when requested)."""

    lm_loss: torch.FloatTensor | None = None
    indexer_loss: torch.FloatTensor | None = None
    indexer_recall: torch.FloatTensor | None = None


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
        return_dict: bool | None = None,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
        indexer_stage: str | None = None,
        **kwargs,
    ) -> MlaDsaModelOutput | tuple:
        """`cache`: an `MlaDsaCache` (or `DynamicCache(config=model.config)`); `past_key_values` is its older name.
        Output flags left unset take the config's values, as in transformers' own models. `use_sparse_attention`,
        `index_topk`, `attention_mode`, `indexer_stage`: this call's DSA choices (see `DsaSettings`), the config's
        where unset."""
        cache = take_cache(cache, kwargs, "MlaDsaModel.forward")
        settings = DsaSettings.resolve(self.config, use_sparse_attention, index_topk, attention_mode,
                                       _stage(indexer_stage, kwargs))  # fmt: skip
        output_hidden_states, output_attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MlaDsaModel: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            _check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        if seq_len == 0:
            raise ValueError("MlaDsaModel: got an empty sequence (0 new tokens)")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # As transformers' own models: a checkpointed layer replayed in backward would write the cache twice.
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing: setting use_cache=False")
            use_cache = False
        if cache is not None:
            check_cache(cache, self.config.num_hidden_layers, "MlaDsaModel")
        if use_cache and cache is None:
            cache = MlaDsaCache(self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        key_padding_mask = _key_padding_mask(attention_mask, batch_size, past_len + seq_len)
        segment_ids = None
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device).unsqueeze(0)
        elif past_len == 0:
            segment_ids = _packed_segment_ids(position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        layer_stats = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, stats, attn_weights = layer(
                hidden_states, position_embeddings, settings, key_padding_mask, output_attentions=output_attentions,
                segment_ids=segment_ids,
                **cache_field(cache if use_cache else None), **kwargs,
            )  # fmt: skip
            if stats is not None:
                layer_stats.append(stats)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        output = MlaDsaModelOutput(
            last_hidden_state=hidden_states,
            **cache_field(cache if use_cache else None),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            indexer_loss=torch.stack([s.kl for s in layer_stats]).mean() if layer_stats else None,
            indexer_recall=torch.stack([s.recall for s in layer_stats]).nanmean() if layer_stats else None,
        )
        return _as_requested(output, self.config, return_dict)


class MlaDsaForCausalLM(MlaDsaPreTrainedModel, GenerationMixin):
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the payload files beside the weights
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

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
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
        indexer_stage: str | None = None,
        **kwargs,
    ) -> MlaDsaCausalLMOutput | tuple:
        """Causal LM forward. `indexer_stage` ("dense" | "sparse") adds the DSA indexer's KL loss (DeepSeek-V3.2
        warm-up / sparse stage) to the output (`indexer_loss`) and to `loss`; `use_sparse_attention`, `index_topk`
        and `attention_mode` override the config's defaults for this call (see `DsaSettings`); `generate()` passes
        them on to every step. `cache`: an `MlaDsaCache` (or `DynamicCache(config=model.config)`);
        `past_key_values` is its older name."""
        cache = take_cache(cache, kwargs, "MlaDsaForCausalLM.forward")
        kwargs.pop("cache_position", None)
        # transformers' loss keywords (Trainer's num_items_in_batch, context parallelism's pre-shifted labels, ...)
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        output_hidden_states, output_attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            use_sparse_attention=use_sparse_attention,
            index_topk=index_topk,
            attention_mode=attention_mode,
            indexer_stage=_stage(indexer_stage, kwargs),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        lm_loss = None
        if labels is not None or loss_kwargs.get("shift_labels") is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        losses = [part for part in (lm_loss, outputs.indexer_loss) if part is not None]
        output = MlaDsaCausalLMOutput(
            loss=sum(losses[1:], losses[0]) if losses else None,
            logits=logits,
            **cache_field(getattr(outputs, CACHE_NAME)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            indexer_loss=outputs.indexer_loss,
            indexer_recall=outputs.indexer_recall,
        )
        return _as_requested(output, self.config, return_dict)

    def generate(self, *args, **kwargs):
        """transformers' `generate()`, on a cache of MlaDsaCacheLayer (what `DynamicCache(config)` builds for this
        config). Static and quantized caches hold per-head keys and values, which this model does not make."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
        if implementation not in (None, "dynamic", "dynamic_full"):
            raise ValueError(
                f"MlaDsaForCausalLM.generate: cache_implementation={implementation!r} is not supported; the model "
                "caches latent + indexer keys in its own layers (leave cache_implementation unset)"
            )
        return super().generate(*args, **kwargs)


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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
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
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            **cache_field(getattr(outputs, CACHE_NAME)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return _as_requested(output, self.config, return_dict)


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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        outputs = self._backbone(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs)
        logits = self.score(self.dropout(outputs.last_hidden_state))  # [B, S, num_labels]
        loss = self.loss_function(logits, labels, self.config) if labels is not None else None
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return _as_requested(output, self.config, return_dict)


def _as_requested(output, config, return_dict: bool | None):
    """The output object, or its tuple with return_dict=False (the forward's value, else the config's)."""
    return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()


def _packed_segment_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, S] index of the packed sequence each position belongs to, where position ids restart within a row (a
    DataCollatorWithFlattening batch, TRL's padding_free); None for ordinary rows (one run of positions each)."""
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # [B, S - 1]
    if not bool(restarts.any()):
        return None
    return torch.nn.functional.pad(restarts.long(), (1, 0)).cumsum(-1)


def _stage(indexer_stage: str | None, kwargs: dict) -> str | None:
    """`indexer_stage`, or the stage passed under its name before 0.4.0, `indexer_loss=` (which now names only the
    output's loss tensor)."""
    if "indexer_loss" in kwargs:
        warnings.warn("`indexer_loss=` as a forward argument is now `indexer_stage=`", FutureWarning, stacklevel=3)
        old = kwargs.pop("indexer_loss")
        indexer_stage = old if indexer_stage is None else indexer_stage
    return indexer_stage


def _output_flags(config, hidden_states: bool | None, attentions: bool | None) -> tuple[bool, bool]:
    """A forward's output flags: each one passed wins, else the config's (transformers' rule)."""
    return (
        config.output_hidden_states if hidden_states is None else hidden_states,
        config.output_attentions if attentions is None else attentions,
    )


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"MlaDsaModel: input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"MlaDsaModel: input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"MlaDsaModel: token ids must lie in [0, vocab_size={vocab_size}), got "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )


def _key_padding_mask(attention_mask: torch.Tensor | None, batch_size: int, num_keys: int) -> torch.Tensor | None:
    """[B, T] bool, True at real tokens; None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape != (batch_size, num_keys):
        raise ValueError(
            f"MlaDsaModel: attention_mask must be 2D [batch, past + new tokens] = ({batch_size}, {num_keys}), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


__all__ = [
    "MlaDsaCache",
    "MlaDsaConfig",
    "MlaDsaForCausalLM",
    "MlaDsaForSequenceClassification",
    "MlaDsaForTokenClassification",
    "MlaDsaModel",
    "MlaDsaPreTrainedModel",
]
