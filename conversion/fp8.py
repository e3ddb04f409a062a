"""Block-quantized FP8 weights as DeepSeek publishes them (V3, V3.1, V3.2, R1).

A weight [out, in] is stored as `float8_e4m3fn` with `weight_scale_inv` [ceil(out/128), ceil(in/128)] in float32:
each 128 x 128 block is `W_block = W_fp8_block * scale`.
"""

import torch

BLOCK = (128, 128)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """FP8 weight [out, in] times its per-block scale [ceil(out/b0), ceil(in/b1)], in float32, cast to `dtype`."""
    rows, cols = weight.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)}: "
                         f"expected {expected} for {block[0]}x{block[1]} blocks")  # fmt: skip
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek's checkpoints were made: per block, scale = amax / 448, W_fp8 = W / scale.

    Returns (`float8_e4m3fn` weight, float32 `weight_scale_inv`)."""
    rows, cols = weight.shape
    block_rows, block_cols = -(-rows // block[0]), -(-cols // block[1])
    padded = weight.float().new_zeros(block_rows * block[0], block_cols * block[1])
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(block_rows, block[0], block_cols, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [block_rows, block_cols]
    scale = amax / FP8_MAX
    quantized = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.view_as(padded)[:rows, :cols].contiguous(), scale.float()


__all__ = ["BLOCK", "dequantize_block_fp8", "quantize_block_fp8"]
