"""The MLA+DSA cache: per layer, only the compressed latent `[c_KV ; k_R]` and the indexer keys, in the model's dtype
or in DeepSeek-V3.2's FP8 layouts.

Per token and layer it holds `kv_lora_rank + qk_rope_head_dim` latent numbers and `index_head_dim` indexer-key
numbers, instead of the `2 * heads * head_dim` of a multi-head cache. Buffers grow by doubling, so appending a token
is amortized O(1) and `update` returns views, never a concatenation of the whole history.

Both layers are transformers' indexed cache layers (`DynamicIndexedLayer`, `StaticIndexedLayer`, as its DeepseekV32
and GlmMoeDsa use) and hold what they hold where transformers' layers hold it: `keys` the latent rows [B, 1, T, C]
(C = `kv_lora_rank + qk_rope_head_dim`, or V3.2's FP8-packed row), `values` zero-width [B, 1, T, 0] (MLA's values are
the latent's first `kv_lora_rank` columns), `indexer_keys` the indexer keys [B, T, Di].

`MlaDsaCacheLayer` registers itself as the cache layer of type `LAYER_TYPE` (transformers >= 5.14), and
`MlaDsaConfig.layer_types` names it for every layer, so `DynamicCache(config=model.config)` - what `generate()`
builds - holds these layers too; `MlaDsaStaticCacheLayer` registers as the static layer of the same type, so
`generate(cache_implementation="static")` preallocates latent and indexer keys for a compiled decode step.

FP8 (as DeepSeek-V3.2's inference code and FlashMLA store it):
- Indexer keys: rotated by a Hadamard transform (orthogonal, so q.k is unchanged, and outliers spread over all dims),
  then rounded to float8 e4m3 with one float32 scale per block of 128 values. A cached key is one uint8 row
  `[head_dim e4m3 bytes | 4 bytes per scale]`, so a key and its scales never part.
- Latent rows (FlashMLA's sparse-decode layout): the `kv_lora_rank` latent values in e4m3 with one float32 scale per
  128 (no rotation), then the `qk_rope_head_dim` RoPE values in bfloat16: `[512 e4m3 | 4 x 4 scale bytes | 64 x 2
  bf16 bytes]` = 656 bytes per token for DeepSeek-V3.2's shapes.
"""

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicIndexedLayer,
    StaticIndexedLayer,
    StaticLayer,
)

from .configuration_mla_dsa import LAYER_TYPE

# transformers keeps one cache layer class per layer type for the whole process, and every checkpoint's code is a module
# of its own: each model names its own module's layers in its config (`OWN_LAYER_TYPE`), so two checkpoints loaded side
# by side (a model and its assistant, two conversions) each build theirs. A config without a model names LAYER_TYPE
# (below).
OWN_LAYER_TYPE = f"{LAYER_TYPE}:{__name__}"

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


_MIN_CAPACITY = 64


class LatentRows:
    """What both cache layers do alike with their `latent` and `index_keys` buffers [batch, slots, *]."""

    latent: torch.Tensor | None
    index_keys: torch.Tensor | None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.latent = self.latent.repeat_interleave(repeats, dim=0)
            self.index_keys = self.index_keys.repeat_interleave(repeats, dim=0)
            self._publish()

    def offload(self) -> None:
        if self.is_initialized:
            self.latent = self.latent.to("cpu", non_blocking=True)
            self.index_keys = self.index_keys.to("cpu", non_blocking=True)
            self._publish()

    def prefetch(self) -> None:
        if self.is_initialized and self.latent.device != self.device:
            self.latent = self.latent.to(self.device, non_blocking=True)
            self.index_keys = self.index_keys.to(self.device, non_blocking=True)
            self._publish()

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__}.update(latent, index_keys) caches a token's latent row and indexer key together"
        )

    def _publish(self) -> None:
        """Keeps transformers' names (`keys`, `values`, `indexer_keys`) on what the layer holds."""

    def bytes_per_token(self) -> int:
        """Bytes one cached token costs in this layer (latent row plus indexer key)."""
        if not self.is_initialized:
            return 0
        return _row_bytes(self.latent) + _row_bytes(self.index_keys)


class MlaDsaCacheLayer(LatentRows, DynamicIndexedLayer):
    """One layer's latent rows `latent` [batch, capacity, kv_lora_rank + qk_rope_head_dim] and indexer keys
    `index_keys` [batch, capacity, index_head_dim]; the first `length` positions along dim 1 are filled, and `keys`
    [B, 1, length, C], `values` [B, 1, length, 0] and `indexer_keys` [B, length, Di] are views of them."""

    _layer_type = OWN_LAYER_TYPE  # transformers >= 5.14 registers the class under this name
    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.latent: torch.Tensor | None = None
        self.index_keys: torch.Tensor | None = None
        self.length = 0

    def _publish(self) -> None:
        if not self.is_initialized:
            self.keys = self.values = self.indexer_keys = None
            return
        self.keys = self.latent[:, : self.length].unsqueeze(1)  # [B, 1, T, C]
        self.values = self.keys[..., :0]
        self.indexer_keys = self.index_keys[:, : self.length]

    def lazy_initialization(self, latent: torch.Tensor, index_keys: torch.Tensor) -> None:
        batch_size = latent.shape[0]
        capacity = max(_MIN_CAPACITY, latent.shape[1])
        self.latent = latent.new_zeros(batch_size, capacity, latent.shape[-1])
        self.index_keys = index_keys.new_zeros(batch_size, capacity, index_keys.shape[-1])
        self.dtype, self.device = latent.dtype, latent.device
        self.indexer_dtype, self.indexer_device = index_keys.dtype, index_keys.device
        self.length = 0
        self.is_initialized = self.is_indexer_initialized = True

    def update(
        self, latent: torch.Tensor, index_keys: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends `latent` [B, S, R + rope] and `index_keys` [B, S, Di]; returns views of everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(latent, index_keys)
        if latent.shape[0] != self.latent.shape[0]:
            raise ValueError(
                f"MlaDsaCache holds a batch of {self.latent.shape[0]} but got {latent.shape[0]} new rows; "
                "use batch_select_indices / batch_repeat_interleave to change the batch"
            )
        new_length = self.length + latent.shape[1]
        if new_length > self.latent.shape[1]:
            self._grow(new_length)
        self.latent[:, self.length : new_length] = latent
        self.index_keys[:, self.length : new_length] = index_keys
        self.length = new_length
        self._publish()
        return self.latent[:, :new_length], self.index_keys[:, :new_length]

    def _grow(self, min_capacity: int) -> None:
        capacity = max(min_capacity, 2 * self.latent.shape[1])
        self.latent = _resized(self.latent, capacity, self.length)
        self.index_keys = _resized(self.index_keys, capacity, self.length)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.latent = self.index_keys = None
        self.length = 0
        self.is_initialized = self.is_indexer_initialized = False
        self._publish()

    def crop(self, max_length: int) -> None:
        """`crop(-n)` removes the last n tokens and `crop(0)` nothing (transformers 5, as assisted decoding calls
        it); a positive value keeps the first `max_length` tokens (the older convention)."""
        if max_length <= 0:
            max_length = self.length + max_length
        self.length = max(0, min(self.length, max_length))
        self._publish()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.latent.device)
            self.latent = self.latent.index_select(0, indices)
            self.index_keys = self.index_keys.index_select(0, indices)
            self._publish()


class MlaDsaStaticCacheLayer(LatentRows, StaticIndexedLayer):
    """One layer's latent rows `[batch, max_cache_len, kv_lora_rank + qk_rope_head_dim]` and indexer keys
    `[batch, max_cache_len, index_head_dim]`, allocated once and written in place at `cumulative_length` (a device
    scalar, as transformers' StaticLayer), so a decode step has the same shapes and no host-side length.

    Attention sees all `max_cache_len` rows: rows past the current length belong to positions later than every query,
    so the causal mask hides them (and `crop` only moves the length back). `keys` [B, 1, max_cache_len, C] is the
    latent buffer, `indexer_keys` [B, max_cache_len, Di] the indexer-key buffer."""

    _layer_type = OWN_LAYER_TYPE  # a StaticLayer subclass registers as the static layer of this type
    is_compileable = True
    is_croppable = True
    is_sliding = False

    def lazy_initialization(self, latent: torch.Tensor, index_keys: torch.Tensor) -> None:
        """The buffers are allocated by transformers' own StaticIndexedLayer, which marks them (and the length) as
        fixed addresses for torch.compile: CUDA graphs then replay a compiled step's in-place writes on them
        (unmarked, a compiled step skips CUDA graphs). Its keys `[B, 1, slots, *]` hold the latent rows (its values
        are zero-width), its indexer keys `[B, slots, Di]` the indexer keys."""
        StaticLayer.lazy_initialization(self, latent.unsqueeze(1), latent[..., :0].unsqueeze(1))
        self.lazy_initialization_indexer(index_keys)
        self.device, self.dtype = latent.device, latent.dtype

    @property
    def latent(self) -> torch.Tensor | None:  # [B, slots, kv_lora_rank + qk_rope_head_dim]
        return self.keys[:, 0] if self.is_initialized else None

    @latent.setter
    def latent(self, rows: torch.Tensor) -> None:
        self.keys = rows.unsqueeze(1)

    @property
    def index_keys(self) -> torch.Tensor | None:  # [B, slots, index_head_dim]
        return self.indexer_keys if self.is_initialized else None

    @index_keys.setter
    def index_keys(self, keys: torch.Tensor) -> None:
        self.indexer_keys = keys

    def update(
        self, latent: torch.Tensor, index_keys: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes `latent` [B, S, R + rope] and `index_keys` [B, S, Di] at the next S slots; returns the whole
        buffers [B, max_cache_len, ...]."""
        if not self.is_initialized:
            self.lazy_initialization(latent, index_keys)
        slots = torch.arange(latent.shape[1], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(latent.shape[1])  # in place: the compiled step keeps one tensor
        self.indexer_cumulative_length.add_(latent.shape[1])  # transformers' count of indexer keys, kept in step
        # Written through `keys` itself, as transformers' StaticLayer writes: torch.compile turns an in-place write
        # into a view of a graph input (`self.latent`) into two copies of the whole buffer per layer and step
        self.keys.index_copy_(2, slots, latent.to(self.keys.dtype).unsqueeze(1))
        self.index_keys.index_copy_(1, slots, index_keys.to(self.index_keys.dtype))
        return self.latent, self.index_keys

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.index_keys.zero_()
        self.cumulative_length.zero_()
        self.indexer_cumulative_length.zero_()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """In place (the buffers keep their addresses): beam search reorders rows without a new graph."""
        if self.is_initialized:
            indices = indices.to(self.device)
            self.keys.copy_(self.keys.index_select(0, indices))
            self.index_keys.copy_(self.index_keys.index_select(0, indices))


CACHE_LAYERS = (MlaDsaCacheLayer, MlaDsaStaticCacheLayer)


# A config no model has named its layers in (`DynamicCache(config=AutoConfig.from_pretrained(...))`) names LAYER_TYPE:
# the layers of the first checkpoint code that registered it in this process. Never taken over (`_layer_type` None
# registers nothing): releases up to 0.7.5 name LAYER_TYPE in their models' configs too, and a model of theirs handed a
# later release's layers refuses them.
_LAYER_TYPE_FREE = LAYER_TYPE not in DYNAMIC_LAYER_TYPE_MAPPING


class _ConfigOnlyCacheLayer(MlaDsaCacheLayer):
    _layer_type = LAYER_TYPE if _LAYER_TYPE_FREE else None


class _ConfigOnlyStaticCacheLayer(MlaDsaStaticCacheLayer):
    _layer_type = LAYER_TYPE if _LAYER_TYPE_FREE else None


def cache_lengths(cache, seq_len: int) -> tuple[int | torch.Tensor, int]:
    """(tokens cached before this forward, keys attention sees after it). A growing cache gives ints; a static one
    gives its length as a device scalar (a copy: the layers advance theirs in place) and its fixed size."""
    if cache is None:
        return 0, seq_len
    size = static_cache_size(cache)
    if size is not None:
        return cache.layers[0].cumulative_length.clone(), size
    past_len = cache.get_seq_length()
    return past_len, past_len + seq_len


def static_cache_size(cache) -> int | None:
    """The fixed number of slots of a static cache of our layers, or None for any other cache (or none)."""
    layers = getattr(cache, "layers", None)
    if layers and isinstance(layers[0], MlaDsaStaticCacheLayer):
        return layers[0].max_cache_len
    return None


class MlaDsaCache(Cache):
    """Latent KV + indexer-key cache for `MlaDsaForCausalLM`, one `MlaDsaCacheLayer` per decoder layer.

    >>> cache = MlaDsaCache(model.config)
    >>> out = model(input_ids, cache=cache, use_cache=True)

    `DynamicCache(config=model.config)` holds the same layers; anything else is refused by the model (`check_cache`).
    """

    def __init__(self, config=None, num_hidden_layers: int | None = None, **kwargs):
        if num_hidden_layers is None:
            if config is None:
                raise ValueError("MlaDsaCache needs the model config (or num_hidden_layers)")
            num_hidden_layers = config.num_hidden_layers
        super().__init__(layers=[MlaDsaCacheLayer() for _ in range(num_hidden_layers)])
        self.config = config

    def update(self, latent: torch.Tensor, index_keys: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(latent, index_keys)

    def bytes_per_token_per_layer(self) -> int:
        """Exact bytes one token costs in one layer, read off the tensors held (0 before the first update).

        Equals `(kv_lora_rank + qk_rope_head_dim + index_head_dim) * itemsize` for one dtype throughout."""
        sizes = {layer.bytes_per_token() for layer in self.layers if layer.is_initialized}
        if not sizes:
            return 0
        if len(sizes) > 1:  # layers that share another's top-k cache no indexer keys
            raise ValueError(
                f"cache layers differ in bytes per token ({sorted(sizes)}): see bytes_per_token_by_layer()"
            )
        return sizes.pop()

    def bytes_per_token_by_layer(self) -> list[int]:
        """Exact bytes one token costs in each layer (0 before the first update): a layer that shares another's
        top-k (`indexer_types`) holds its latent row only."""
        return [layer.bytes_per_token() for layer in self.layers]

    def memory_bytes(self) -> int:
        """Bytes of the cached tokens (not of the spare capacity) over all layers and the batch."""
        return sum(
            layer.bytes_per_token() * layer.length * layer.latent.shape[0]
            for layer in self.layers
            if layer.is_initialized
        )

    @property
    def batch_size(self) -> int:
        sizes = {layer.latent.shape[0] for layer in self.layers if layer.is_initialized}
        return sizes.pop() if len(sizes) == 1 else -1


def check_cache(cache, num_layers: int, owner: str) -> None:
    """Raises unless `cache` holds one `MlaDsaCacheLayer` per decoder layer (latent + indexer keys)."""
    layers = getattr(cache, "layers", None)
    if (
        isinstance(cache, Cache)
        and layers is not None
        and len(layers) == num_layers
        and all(isinstance(layer, CACHE_LAYERS) for layer in layers)
    ):
        return
    found = type(cache).__name__
    if layers is not None:
        found += f" with {len(layers)} layers ({', '.join(sorted({type(layer).__name__ for layer in layers}))})"
    raise ValueError(
        f"{owner}: the cache must be an MlaDsaCache (one MlaDsaCacheLayer of latent + indexer keys per each of the "
        f"{num_layers} layers), got {found}; pass MlaDsaCache(model.config), DynamicCache(config=model.config), "
        "StaticCache(config=model.config, max_cache_len=...) or None"
    )


def _resized(buffer: torch.Tensor, capacity: int, length: int) -> torch.Tensor:
    grown = buffer.new_zeros(buffer.shape[0], capacity, buffer.shape[2])
    grown[:, :length] = buffer[:, :length]
    return grown


def _row_bytes(buffer: torch.Tensor) -> int:
    return buffer.shape[-1] * buffer.element_size()


__all__ = ["MlaDsaCache", "MlaDsaCacheLayer", "MlaDsaStaticCacheLayer"]
