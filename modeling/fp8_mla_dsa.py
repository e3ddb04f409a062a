"""The FP8 codecs of the cache, as DeepSeek-V3.2's inference code and FlashMLA store it.

- Indexer keys: rotated by a Hadamard transform (orthogonal, so q.k is unchanged, and outliers spread over all dims),
  then rounded to float8 e4m3 with one float32 scale per block of 128 values. A cached key is one uint8 row
  `[head_dim e4m3 bytes | 4 bytes per scale]`, so a key and its scales never part.
- Latent rows (FlashMLA's sparse-decode layout): the `kv_lora_rank` latent values in e4m3 with one float32 scale per
  128 (no rotation), then the `qk_rope_head_dim` RoPE values in bfloat16: `[512 e4m3 | 4 x 4 scale bytes | 64 x 2
  bf16 bytes]` = 656 bytes per token for DeepSeek-V3.2's shapes.
"""

import torch

FP8_BLOCK = 128  # values per scale, as DeepSeek's inference code
FP8_MAX = 448.0  # largest finite float8 e4m3 value

_HADAMARDS: dict = {}


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last dim (n a power of two): orthogonal, so dot products are unchanged."""
    return x @ _hadamard(x.shape[-1], x.device)


def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    """Sylvester's construction, normalised; cached per size and device."""
    key = (n, str(device))
    if key not in _HADAMARDS:
        if n & (n - 1):
            raise ValueError(f"the Hadamard rotation needs a power-of-two index_head_dim, got {n}")
        matrix = torch.ones(1, 1)
        while matrix.shape[0] < n:
            matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
        _HADAMARDS[key] = (matrix / n**0.5).to(device)
    return _HADAMARDS[key]


def quantize_fp8_blocks(x: torch.Tensor, block: int, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values [..., D] and float32 scales [..., D / block]: scale = amax / 448 per block of the last dim,
    rounded up to a power of two with `scale_fmt="ue8m0"`."""
    blocks = x.float().unflatten(-1, (x.shape[-1] // block, block))
    scales = blocks.abs().amax(dim=-1).clamp(min=1e-10) / FP8_MAX
    if scale_fmt == "ue8m0":
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    quantized = (blocks / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.flatten(-2), scales


def dequantize_fp8_blocks(quantized: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    blocks = quantized.float().unflatten(-1, (quantized.shape[-1] // block, block))
    return (blocks * scales.unsqueeze(-1)).flatten(-2)


def pack_fp8_rows(x: torch.Tensor, block: int, scale_fmt: str | None = None) -> torch.Tensor:
    """Rotated, FP8-quantized rows [..., D + 4 * D / block] (uint8) from float rows [..., D]."""
    quantized, scales = quantize_fp8_blocks(hadamard_rotate(x.float()), block, scale_fmt)
    return torch.cat([quantized.view(torch.uint8), scales.contiguous().view(torch.uint8)], dim=-1)


def unpack_fp8_rows(packed: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """Float32 rotated rows [..., D] from the packed uint8 rows."""
    quantized = packed[..., :dim].contiguous().view(torch.float8_e4m3fn)
    scales = packed[..., dim:].contiguous().view(torch.float32)
    return dequantize_fp8_blocks(quantized, scales, block)


def fp8_round_trip(x: torch.Tensor, block: int, scale_fmt: str | None = None) -> torch.Tensor:
    """x rotated and rounded through FP8 as the cached keys are, float32 [..., D]: the queries that score them."""
    quantized, scales = quantize_fp8_blocks(hadamard_rotate(x.float()), block, scale_fmt)
    return dequantize_fp8_blocks(quantized, scales, block)


def latent_block(kv_lora_rank: int) -> int:
    """Latent values per scale: 128, or the whole latent when it is shorter (small test models)."""
    return min(FP8_BLOCK, kv_lora_rank)


def pack_latent_rows(latent: torch.Tensor, kv_lora_rank: int) -> torch.Tensor:
    """uint8 rows [..., R + 4 * R / block + 2 * dr] from latent rows [..., R + dr] (`[c_KV ; k_R]`)."""
    c_kv, k_rope = latent[..., :kv_lora_rank], latent[..., kv_lora_rank:]
    quantized, scales = quantize_fp8_blocks(c_kv, latent_block(kv_lora_rank))
    parts = (quantized, scales.contiguous(), k_rope.to(torch.bfloat16).contiguous())
    return torch.cat([part.view(torch.uint8) for part in parts], dim=-1)


def unpack_latent_rows(packed: torch.Tensor, kv_lora_rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Latent rows [..., R + dr] in `dtype` from the packed uint8 rows."""
    block = latent_block(kv_lora_rank)
    scale_end = kv_lora_rank + 4 * (kv_lora_rank // block)
    quantized = packed[..., :kv_lora_rank].contiguous().view(torch.float8_e4m3fn)
    scales = packed[..., kv_lora_rank:scale_end].contiguous().view(torch.float32)
    k_rope = packed[..., scale_end:].contiguous().view(torch.bfloat16)
    return torch.cat([dequantize_fp8_blocks(quantized, scales, block).to(dtype), k_rope.to(dtype)], dim=-1)


__all__ = [
    "FP8_BLOCK",
    "FP8_MAX",
    "dequantize_fp8_blocks",
    "fp8_round_trip",
    "hadamard_rotate",
    "latent_block",
    "pack_fp8_rows",
    "pack_latent_rows",
    "quantize_fp8_blocks",
    "unpack_fp8_rows",
    "unpack_latent_rows",
]
