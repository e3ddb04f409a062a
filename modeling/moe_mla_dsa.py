"""The feed-forward blocks of DeepSeek's decoder layers: a dense gated MLP (layers below `first_k_dense_replace`)
and the MoE of routed plus shared experts, with V2 softmax or V3 sigmoid (noaux_tc) routing.

The routed experts use transformers' fused layout (`MlaDsaExperts`: 3D `gate_up_proj` and `down_proj`), which its
tensor- and expert-parallel plans shard. Checkpoints keep DeepSeek's per-expert names (`mlp.experts.E.{gate,up,down}
_proj.weight`): transformers' checkpoint conversion mapping (`EXPERT_LAYOUT`, registered for our model type) fuses
them on load and splits them again on save, so deepseek_v2 / v3 / v32 checkpoints load and save as they are.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.integrations import use_experts_implementation

from .configuration_mla_dsa import MlaDsaConfig
from .deepseek_format_mla_dsa import MODEL_TYPE


class MlaDsaMLP(nn.Module):
    def __init__(self, config: MlaDsaConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MlaDsaRouter(nn.Module):
    """DeepSeek expert routing: V2 softmax (greedy / group-limited greedy) or V3 sigmoid with bias (noaux_tc)."""

    def __init__(self, config: MlaDsaConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        # float32 whatever the model's dtype, from construction on (as transformers' routers): bf16 picks other experts
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [N, hidden] -> the router logits [N, E] (float32; what `output_router_logits` returns, as
        transformers' DeepSeek routers do), the float32 expert weights [N, top_k] and the expert indices [N, top_k]."""
        logits = F.linear(hidden_states.float(), self.weight.float())  # [N, E]
        if self.config.scoring_func == "sigmoid":
            indices, weights = self._route_sigmoid(logits.sigmoid())
        else:
            indices, weights = self._route_softmax(logits.softmax(dim=-1))
        return logits, weights, indices

    def _route_sigmoid(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        choice = scores + self.e_score_correction_bias
        groups = choice.view(-1, self.config.n_group, self.num_experts // self.config.n_group)
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]: a group's two best experts
        choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.config.routed_scaling_factor

    def _route_softmax(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.topk_method == "group_limited_greedy":
            groups = scores.view(-1, self.config.n_group, self.num_experts // self.config.n_group)
            scores = scores.masked_fill(~self._group_mask(groups.max(dim=-1).values), 0.0)
        weights, indices = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.config.norm_topk_prob:
            return indices, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.config.routed_scaling_factor

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[N, E] bool: experts of the `topk_group` best groups."""
        best = group_scores.topk(self.config.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return group_mask.repeat_interleave(self.num_experts // self.config.n_group, dim=1)


# Each fused expert parameter [E, rows, cols] and the per-expert checkpoint tensors stacked in it along rows, in order:
# the one definition of the checkpoint names (loading, saving and the converter's plan all read it).
FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def expert_layout() -> list:
    """transformers' conversion between DeepSeek's per-expert checkpoint tensors and the fused expert parameters (the
    same rules as its own DeepSeek models')."""
    layout = []
    for fused, parts in FUSED_EXPERTS.items():
        operations = [MergeModulelist(dim=0)] + ([Concatenate(dim=1)] if len(parts) > 1 else [])
        sources = [f"mlp.experts.*.{part}.weight" for part in parts]
        layout.append(WeightConverter(source_patterns=sources if len(sources) > 1 else sources[0],
                                      target_patterns=f"mlp.experts.{fused}", operations=operations))  # fmt: skip
    return layout


def register_expert_layout() -> None:
    """Tells transformers' loading and saving how our experts map to checkpoint names (once per process)."""
    if get_checkpoint_conversion_mapping(MODEL_TYPE) is None:
        register_checkpoint_conversion_mapping(MODEL_TYPE, expert_layout())


@use_experts_implementation
class MlaDsaExperts(nn.Module):
    """The routed experts, fused: gate_up_proj [E, 2 * I, H] (each expert's [gate ; up]) and down_proj [E, H, I].
    transformers' `experts_implementation` may swap the forward (grouped matmuls, expert-parallel dispatch); this one
    runs each selected expert on its tokens. Routed experts have no biases (DeepSeek's have none)."""

    def __init__(self, config: MlaDsaConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        intermediate, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states [N, H]; top_k_index and top_k_weights [N, k] -> the weighted sum of the experts [N, H].
        An index outside this module's experts (expert parallelism's marker for another process's) is skipped."""
        out = torch.zeros_like(hidden_states)
        local_experts = self.gate_up_proj.shape[0]
        for expert_idx in top_k_index.unique().tolist():
            if not 0 <= expert_idx < local_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert_idx)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out.index_add_(0, token_idx, (expert_out * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


class MlaDsaMoE(nn.Module):
    """Routed experts (fused, `MlaDsaExperts`) plus always-on shared experts."""

    def __init__(self, config: MlaDsaConfig):
        super().__init__()
        self.experts = MlaDsaExperts(config)
        self.gate = MlaDsaRouter(config)
        if config.n_shared_experts:
            self.shared_experts = MlaDsaMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        routed = self.experts(flat, indices, weights).view(shape)
        if hasattr(self, "shared_experts"):
            routed = routed + self.shared_experts(hidden_states)
        return routed


__all__ = [
    "FUSED_EXPERTS",
    "MlaDsaExperts",
    "MlaDsaMLP",
    "MlaDsaMoE",
    "MlaDsaRouter",
    "expert_layout",
    "register_expert_layout",
]
