"""Float32 linear layers through oneDNN on CPUs: `use_onednn_linear(model)`.

PyTorch runs a float32 `nn.Linear` on an x86 CPU through MKL (eager `F.linear`, and `torch.compile` with freezing,
which packs the weights for MKL). Measured on 2-core AMD EPYCs, torch 2.14: MKL's matrix-vector product - a batch-1
decode step's every projection - barely uses a second core (8192 x 1024: 1.7-1.9 ms on 1 thread, 1.4-1.9 on 2; about
18 GB/s), where oneDNN's (the library PyTorch already uses for bfloat16 layers) takes 0.6 ms on two. On one thread
MKL's is the faster step (`ONEDNN_FROM_THREADS`). `benchmarks/onednn_linear.py` measures both, per layer size and per
decode step.

The same layers, the same weights and state dict: only the forward of each float32 `nn.Linear` is replaced, on
the instance, by one that calls oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, what inductor calls for bfloat16
layers) for float32 CPU tensors outside autograd, and `F.linear` otherwise (training, other dtypes and devices, a
tensor-parallel shard). Results equal `F.linear`'s up to float32 rounding (another summation order). Applies to any
model, ours or transformers' (the benchmarks apply it to both sides of a comparison). `mla-dsa serve` applies it;
nothing else does by default: it replaces methods on the user's modules, and the gain depends on the CPU's MKL.
"""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

# With fewer threads than this the default routes no layer: one thread's decode step ran slower with oneDNN's layers.
# Measured (`benchmarks/onednn_linear.py`: the bench model, then a SmolLM2 conversion, at 4K, float32, the compiled
# decode step under freezing, ms with MKL's layers / layers of 2 M weights and more on oneDNN / every layer on oneDNN):
# an AVX2 EPYC (SmolLM2's half-cache conversion; benchmarks/results_onednn_linear_avx2.json), 1 thread 11.8 / 12.9 /
# 13.4 and 79.2 / 87.4 / 95.3, 2 threads 10.9 / 9.1 / 8.6 and 75.3 / 74.0 / 69.5 (eager 134.5 / 135.1 / 129.2); an
# AVX-512 EPYC (its full-width conversion; results_onednn_linear.json), 1 thread 10.6 / 11.2 / 10.9 and 81.7 / 84.3 /
# 92.7, 2 threads 10.0 / 8.4 / 8.5 and 72.9 / 73.8 / 75.5 (eager 116.4 / 106.4 / 99.3). So: none on one thread (the
# fastest on both CPUs); every layer from two on (the fastest on the AVX2 one; within 4 % of the fastest on the other).
ONEDNN_FROM_THREADS = 2


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (x86 and Arm CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_has_bf16_matmul() -> bool:
    """Whether PyTorch multiplies bfloat16 matrices with oneDNN on this CPU (AVX-512 and up). Elsewhere (AVX2 CPUs) it
    falls back to a reference loop: on one such CPU a bf16 [512, 8192] @ [8192, 576] product took 60x float32's and
    a bf16 [512, 576] @ [576, 8192] 7x; `train-indexer --bf16` 3.4x float32's time per step on the embedded model."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without oneDNN
        return False


def _onednn_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    plain = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
    # F.linear for autograd (oneDNN's op has no backward) and for a wrong input width (its error names the shapes)
    if (
        not plain
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or x.shape[-1] != weight.shape[1]
    ):
        return F.linear(x, weight, self.bias)
    rows = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, self.bias, "none", [], "")
    return rows.view(*x.shape[:-1], rows.shape[-1])


def use_onednn_linear(model: nn.Module, min_weight_elements: int | None = None) -> int:
    """Routes every float32 CPU `nn.Linear` of `model` with at least `min_weight_elements` weights (exactly that
    class: a LoRA or quantized wrapper's own forward is left alone, its base layer is not) through oneDNN; returns
    how many layers. `None`: by this process's thread count now (`torch.get_num_threads()`, so call it after setting
    that): every layer from `ONEDNN_FROM_THREADS` threads on, none below, where MKL's was faster. Does nothing (0)
    where this PyTorch has no oneDNN. Applying it twice changes nothing more."""
    if not onednn_available():
        return 0
    if min_weight_elements is None:
        if torch.get_num_threads() < ONEDNN_FROM_THREADS:
            return 0
        min_weight_elements = 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu" \
                and module.weight.numel() >= min_weight_elements:  # fmt: skip
            module.forward = types.MethodType(_onednn_linear_forward, module)
            count += 1
    return count


__all__ = ["onednn_available", "use_onednn_linear"]
