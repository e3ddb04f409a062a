"""Float32 linear layers through oneDNN on CPUs: `use_onednn_linear(model)`.

PyTorch runs a float32 `nn.Linear` on an x86 CPU through MKL (eager `F.linear`, and `torch.compile` with freezing,
which packs the weights for MKL). Measured on a 2-core AMD EPYC (AVX-512), torch 2.14: MKL's matrix-vector product - a
batch-1 decode step's every projection - uses one core whatever the thread count (8192 x 1024: 1.9 ms with 1 or 2
threads, 18 GB/s), where oneDNN's (the library PyTorch already uses for bfloat16 layers) takes 1.1 ms on one thread
and 0.65 ms on two; at 256 or 4,096 rows oneDNN was 1.06-1.34x MKL's speed too. A decode step of the benchmark model
at 4K, 2 threads: 10.8 -> 7.9 ms compiled, 14.0 -> 10.7 ms eager.

The same layers, the same weights and state dict: only the forward of each float32 `nn.Linear` is replaced, on the
instance, by one that calls oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, what inductor calls for bfloat16
layers) for float32 CPU tensors outside autograd, and `F.linear` otherwise (training, other dtypes and devices, a
tensor-parallel shard). Results equal `F.linear`'s up to float32 rounding (another summation order). Applies to any
model, ours or transformers' (the benchmarks apply it to both sides of a comparison). Not applied by default: it
replaces methods on the user's modules, and the gain depends on the CPU's MKL.
"""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (x86 and Arm CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    plain = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
    if not plain or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, self.bias)  # oneDNN's op has no backward
    rows = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, self.bias, "none", [], "")
    return rows.view(*x.shape[:-1], rows.shape[-1])


def use_onednn_linear(model: nn.Module) -> int:
    """Routes every float32 CPU `nn.Linear` of `model` (exactly that class: a LoRA or quantized wrapper's own
    forward is left alone, its base layer is not) through oneDNN; returns how many layers. Does nothing (0) where
    this PyTorch has no oneDNN. Applying it twice changes nothing more."""
    if not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.forward = types.MethodType(_onednn_linear_forward, module)
            count += 1
    return count


__all__ = ["onednn_available", "use_onednn_linear"]
