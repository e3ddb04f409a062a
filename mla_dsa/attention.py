"""The absorbed MLA attention, tuned for CPUs: what `import mla_dsa` puts in the checkpoints' place.

Every checkpoint's code looks the absorbed attention up in transformers' attention registry under
`ABSORBED_ATTENTION` and carries a plain implementation of its own (`absorbed_attention_forward`). This one computes
the same numbers faster on a CPU, and is registered over it when the package is imported, so the tuning lives here,
where a release can change it, not in the code frozen into checkpoints:

- a long prefill gathers every query chunk's selected latent rows into one reused buffer (a fresh large allocation
  per chunk costs more than the gather itself on CPU);
- a decode step (one query per sequence) puts the rows on the long side of both matmuls, [k, C] @ [C, H] and
  [R, k] @ [k, H]: the same numbers as the [H, C] @ [C, k] form, which MKL runs at 0.6x the speed on AVX2 CPUs (an
  output of only H rows; a 16K-context step 29.8 -> 28.1 ms) and at the same speed on AVX-512 ones.

On other devices it is the checkpoint's implementation. Shapes as there: B batch, s queries, H heads, T keys, k
selected keys, C = R + dr the latent row, R `kv_lora_rank`.
"""

import threading

import torch
from transformers import AttentionInterface

from .modeling.cache_mla_dsa import unpack_latent_rows
from .modeling.modeling_mla_dsa import ABSORBED_ATTENTION, absorbed_attention_forward, gather_rows, masked_softmax

# The gather buffer of this thread's last prefill, reused while its shape, dtype and device fit (one entry: every
# layer and query chunk of a prefill asks for the same one).
_local = threading.local()


def cpu_absorbed_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                           indices: torch.Tensor | None = None, **kwargs):  # fmt: skip
    """`absorbed_attention_forward`'s contract, faster on a CPU (see the module's docstring)."""
    if indices is None or query.device.type != "cpu" or torch.is_grad_enabled():
        return absorbed_attention_forward(module, query, key, value, attention_mask, scaling, dropout, indices)
    rows = key[:, 0]  # [B, T, C]
    if query.shape[2] > 1:  # a prefill: the checkpoints' computation, gathering into the reused buffer
        buffer = _gather_buffer(rows, indices)
        return absorbed_attention_forward(module, query, key, value, attention_mask, scaling, dropout, indices, buffer)
    gathered = gather_rows(rows, indices.clamp(min=0))  # [B, 1, k, C]
    if gathered.dtype == torch.uint8:
        gathered = unpack_latent_rows(gathered, module.kv_lora_rank, query.dtype)
    return _decode_step(query.transpose(1, 2), gathered, indices >= 0, scaling, module.kv_lora_rank), None


def _gather_buffer(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A contiguous [B, >= s, k, C] buffer for `gather_rows` to write into."""
    batch_size, queries, k = indices.shape
    buffer = getattr(_local, "rows", None)
    fits = buffer is not None and buffer.dtype == rows.dtype and buffer.device == rows.device
    if not (fits and buffer.shape[0] == batch_size and buffer.shape[1] >= queries
            and buffer.shape[2:] == (k, rows.shape[-1])):  # fmt: skip
        buffer = _local.rows = rows.new_empty(batch_size, queries, k, rows.shape[-1])
    return buffer


def _decode_step(query, rows, valid, scaling: float, kv_lora_rank: int) -> torch.Tensor:
    """query [B, 1, H, C] against its gathered rows [B, 1, k, C] -> [B, 1, H, R], rows on the long side."""
    rows = rows.flatten(0, 1)  # [B, k, C]
    scores = torch.bmm(rows, query.flatten(0, 1).transpose(1, 2)).transpose(1, 2)  # [B, H, k], keys-major
    probs = masked_softmax(scores * scaling, valid)  # valid [B, 1, k]
    latent_out = torch.bmm(rows[..., :kv_lora_rank].transpose(1, 2), probs.transpose(1, 2))  # [B, R, H]
    return latent_out.transpose(1, 2).unsqueeze(1)


def register() -> None:
    """Puts the CPU implementation in the registry under `ABSORBED_ATTENTION` (over the checkpoints' own)."""
    AttentionInterface.register(ABSORBED_ATTENTION, cpu_absorbed_attention)


__all__ = ["cpu_absorbed_attention", "register"]
