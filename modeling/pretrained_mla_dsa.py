"""What every MLA + DeepSeek Sparse Attention model is built from: the decoder layer, and the pretrained-model base
(transformers' loading with our checks, weight init). The models themselves are in `modeling_mla_dsa.py`.

Decoder layer = MLA attention with a lightning indexer (`attention_mla_dsa.py`), then a dense MLP (layers below
`first_k_dense_replace`) or DeepSeek MoE (`moe_mla_dsa.py`). Loading checks beyond transformers' live in
`loading_mla_dsa.py`.
"""

import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import logging
from transformers.utils.output_capturing import OutputRecorder

from .attention_mla_dsa import MlaDsaAttention, MlaDsaRMSNorm, register_absorbed_attention
from .compat_mla_dsa import CACHE_NAME, CACHE_NAMES, loading_kwargs, take_cache
from .configuration_mla_dsa import MlaDsaConfig
from .indexer_mla_dsa import TopkSelection
from .loading_mla_dsa import check_weight_file, warn_if_code_is_older, warn_if_indexer_missing, weight_files
from .moe_mla_dsa import MlaDsaExperts, MlaDsaMLP, MlaDsaMoE, MlaDsaRouter, register_expert_layout
from .settings_mla_dsa import DsaSettings

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
    ) -> tuple[torch.Tensor, torch.Tensor | None, TopkSelection | None]:
        """The layer's output [B, S, hidden], its attention probabilities (with `output_attentions`) and the top-k
        selection it attended with (which GLM-5's shared layers after it reuse)."""
        # The cache comes by keyword, under the running transformers' name (CACHE_NAME): GradientCheckpointingLayer
        # looks for it there to drop it (with one warning) when a checkpointed training step asks for a cache.
        cache = kwargs.pop(CACHE_NAME, None)
        residual = hidden_states
        attn_output, attn_weights, selection = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, settings, key_padding_mask, cache,
            output_attentions=output_attentions, **kwargs,
        )  # fmt: skip
        hidden_states = residual + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights, selection


class MlaDsaPreTrainedModel(PreTrainedModel):
    config_class = MlaDsaConfig
    config: MlaDsaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MlaDsaDecoderLayer"]
    _skip_keys_device_placement = CACHE_NAMES
    _supports_sdpa = True
    # Kept in float32 as transformers keeps them for DeepseekV2/V3/V32 and GlmMoeDsa: the router's weight and bias in
    # bf16 and fp16 models (a bf16 router picks other experts than transformers' float32 one), the indexer's head
    # weights in fp16 models.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    _keep_in_fp32_modules = ["indexer.weights_proj"]
    # What transformers' output capture records (`output_hidden_states`, `output_attentions`, `output_router_logits`):
    # each layer's output, its attention probabilities (computed only when asked for), each router's logits.
    _can_record_outputs = {
        "hidden_states": MlaDsaDecoderLayer,
        "attentions": OutputRecorder(MlaDsaAttention, index=1),
        "router_logits": OutputRecorder(MlaDsaRouter, index=0),
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`: missing tensors are initialized and unexpected ones ignored, both
        reported in its load report and in `output_loading_info`; `pretrained_model_name_or_path=None` with
        `config=` and `state_dict=` works. Ours on top: a truncated or corrupt local weight file, or a tensor whose
        shape the config contradicts, is one ValueError naming the tensor and the file (`ignore_mismatched_sizes=True`
        re-initializes it instead, as in transformers); a checkpoint with no indexer at all (a dense MLA one) gets one
        warning on how to train it; a checkpoint carrying older code of ours, one notice. Where the `kernels`
        package is absent, no hub kernels are asked for (see `compat_mla_dsa`)."""
        kwargs = loading_kwargs(kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        tolerate_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        path = pretrained_model_name_or_path
        directory = Path(path) if path is not None and os.path.isdir(path) else None
        files = weight_files(directory) if directory is not None else {}
        for filename in sorted(set(files.values())):
            check_weight_file(directory / filename)
        # A dense checkpoint loaded to run dense (use_sparse_attention=False): its missing indexer is never used, so
        # transformers' load report (a table of it) is not shown; anything else missing or unexpected still is.
        dense_by_choice = kwargs.get("use_sparse_attention") is False and bool(files)
        quiet = dense_by_choice and not any(".self_attn.indexer." in name for name in files)
        verbosity = logging.get_verbosity()
        if quiet:
            logging.set_verbosity_error()
        try:
            # Both through transformers' documented arguments: its own mismatch error is a RuntimeError pointing at a
            # log report, so the load runs tolerant and the first mismatch (from its loading info) is raised here.
            model, info = super().from_pretrained(path, *args, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)  # fmt: skip
        finally:
            logging.set_verbosity(verbosity)
        if quiet:
            missing = sorted(key for key in info.get("missing_keys", ()) if ".self_attn.indexer." not in key)
            unexpected = sorted(info.get("unexpected_keys", ()))
            if missing or unexpected:
                logger.warning(f"{path}: missing tensors {missing} (initialized), unexpected tensors {unexpected} "
                               "(ignored)")  # fmt: skip
        for key, checkpoint_shape, model_shape in info.get("mismatched_keys", ()) if not tolerate_mismatch else ():
            where = directory / files[key] if key in files else path
            raise ValueError(f"{where}: tensor {key} has shape {list(checkpoint_shape)}, the config gives "
                             f"{list(model_shape)}")  # fmt: skip
        if directory is not None and (directory / "modeling_mla_dsa.py").is_file():  # it carries our code
            warn_if_code_is_older(model.config, directory)
        if model.config.use_sparse_attention:  # dense by choice: a missing indexer is never used
            warn_if_indexer_missing(model, set(info.get("missing_keys", ())), path)
        return (model, info) if wants_info else model

    def _backbone(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs):
        """The base model's output object for a head's forward (the cache under either name)."""
        cache = take_cache(cache, kwargs, f"{type(self).__name__}.forward")
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)  # fmt: skip

    def __init__(self, config: MlaDsaConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        register_expert_layout()  # before transformers loads or saves weights: per-expert names <-> fused experts
        register_absorbed_attention()  # unless the package's, or a kernel, is registered already

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MlaDsaExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, MlaDsaRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if hasattr(module, "e_score_correction_bias"):
                init.zeros_(module.e_score_correction_bias)


__all__ = ["MlaDsaDecoderLayer", "MlaDsaPreTrainedModel"]
