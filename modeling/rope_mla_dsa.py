"""Rotary position embedding for the decoupled rope slice of MLA, and the two layouts that rotate it.

- Main attention of V2/V3 checkpoints (`rope_interleave=True`): dims are rotated in adjacent pairs (x0, x1), (x2, x3),
  ... (V2 writes this as complex multiplication, V3 as an interleaved rotation: the same math).
- The DSA indexer, and main attention with `rope_interleave=False`: half-split (NeoX) pairs (x_i, x_{i + d/2}).
"""

import math

import torch
import torch.nn as nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update


class MlaDsaRotaryEmbedding(nn.Module):
    """cos/sin [B, S, qk_rope_head_dim] for positions [B, S], any position (past max_position_embeddings too), in
    every rope type transformers computes: default, linear, yarn, llama3, ... and, through transformers' own
    `dynamic_rope_update`, "dynamic" (NTK frequencies grow with the sequence) and "longrope" (long factors past the
    original length)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings  # read by dynamic_rope_update
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            inv_freq, self.attention_scaling = _default_inv_freq(config), 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, **kwargs) -> tuple[torch.Tensor, float]:
        return _default_inv_freq(config), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _default_inv_freq(config) -> torch.Tensor:
    dim = config.qk_rope_head_dim
    base = config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def apply_rotary_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x_i, x_{i+d/2}); cos/sin [..., d] broadcast against x [..., d]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs (x_{2i}, x_{2i+1}); the result is laid out [rotated evens | rotated odds].

    Queries and keys both come out in that layout, so their dot products equal those of the interleaved layout."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def yarn_softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times mscale^2 under YaRN with `mscale_all_dim` (DeepSeek-V3's long-context scaling)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = rope["factor"]
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    return scale


__all__ = ["MlaDsaRotaryEmbedding", "apply_rotary_half_split", "apply_rotary_interleaved", "yarn_softmax_scale"]
