"""The feed-forward blocks of DeepSeek's decoder layers: a dense gated MLP (layers below `first_k_dense_replace`)
and the MoE of routed plus shared experts, with V2 softmax or V3 sigmoid (noaux_tc) routing.

Parameter names are those of the HF DeepSeek checkpoints (per-expert `mlp.experts.E.{gate,up,down}_proj`), so
deepseek_v2 / v3 / v32 checkpoints load without renaming.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .configuration_mla_dsa import MlaDsaConfig


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
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [N, hidden] -> expert indices [N, top_k] and float32 weights [N, top_k]."""
        logits = F.linear(hidden_states.float(), self.weight.float())  # [N, E]
        if self.config.scoring_func == "sigmoid":
            return self._route_sigmoid(logits.sigmoid())
        return self._route_softmax(logits.softmax(dim=-1))

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


class MlaDsaMoE(nn.Module):
    """Routed experts (one MLP each, DeepSeek checkpoint names) plus always-on shared experts."""

    def __init__(self, config: MlaDsaConfig):
        super().__init__()
        self.experts = nn.ModuleList(
            [MlaDsaMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)]
        )
        self.gate = MlaDsaRouter(config)
        if config.n_shared_experts:
            self.shared_experts = MlaDsaMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        indices, weights = self.gate(flat)
        routed = torch.zeros_like(flat)
        for expert_idx in indices.unique().tolist():
            token_idx, slot = torch.where(indices == expert_idx)
            expert_out = self.experts[expert_idx](flat[token_idx]) * weights[token_idx, slot, None]
            routed.index_add_(0, token_idx, expert_out.to(routed.dtype))
        routed = routed.view(shape)
        if hasattr(self, "shared_experts"):
            routed = routed + self.shared_experts(hidden_states)
        return routed


__all__ = ["MlaDsaMLP", "MlaDsaMoE", "MlaDsaRouter"]
