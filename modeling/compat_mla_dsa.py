"""What differs between the transformers releases this payload runs on (5.14 to the newest), in one place.

Every checkpoint carries a frozen copy of this payload, so each difference is decided here by what the installed
transformers provides, never by comparing version numbers.

- The cache's name. transformers 5.24 renamed the cache argument of every model's `forward` and the cache field of
  every model output from `past_key_values` to `cache` (`past_key_values` stays accepted, with a FutureWarning,
  until 5.40); `generate()` passes and reads the new name. `CACHE_NAME` is the name the running transformers uses,
  read off its own `CausalLMOutputWithPast`. Our forwards take `cache` and also `past_key_values` (which warns only
  where transformers has deprecated it); outputs are built with `cache_field`, so they carry the field that version's
  generation and users read (5.24's outputs also answer to `.past_key_values`, with transformers' own warning).
- The cache `generate()` builds. From 5.14 a `CacheLayerMixin` subclass that sets `_layer_type` registers itself,
  and `DynamicCache(config)` (what `generate()` makes, with no private hook of ours) builds that class for every
  entry of `config.layer_types`: `MlaDsaConfig.layer_types` names `MlaDsaCacheLayer`. Before 5.14 there is no
  such registry, which is why 5.14 is the oldest release we support.
- Cache layer methods. 5.14 to 5.24 share the abstract methods of `CacheLayerMixin`; 5.24 calls `crop` with the
  number of tokens to remove (`crop(-n)`, `crop(0)` = nothing) where older releases also pass a length to keep.
  `MlaDsaCacheLayer.crop` reads both.
- Hub kernels. 5.25 made `from_pretrained` kernelize by default (`use_kernels` unset means on, unless the
  `USE_HUB_KERNELS` variable turns it off) and made the `kernels` package a requirement; where that package is
  absent (an install with `--no-deps`, a registry without a matching `kernels`), every load, transformers' own
  models included, fails with "Kernels are not available". Our layers have no hub kernels, so where the package is
  absent `loading_kwargs` loads with `use_kernels=False`, what 5.14 to 5.24 do by default. An explicit
  `use_kernels` or `kernel_config` is left to transformers.
"""

import importlib.util
import warnings

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
DEPRECATED_CACHE_NAME = "past_key_values" if CACHE_NAME == "cache" else None
# Every name a cache goes by in some supported release (Trainer drops these outputs at evaluation, device
# placement leaves them alone).
CACHE_NAMES = ["cache", "past_key_values"]


def take_cache(cache, kwargs: dict, owner: str):
    """The cache a forward was given as `cache` or as `past_key_values` (popped from `kwargs`).

    `past_key_values` warns where the running transformers has deprecated it, as transformers' own models do."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is None:
        return cache
    if cache is not None:
        raise ValueError(f"{owner}: got both `cache` and `past_key_values`; pass the cache once, as `cache`")
    if DEPRECATED_CACHE_NAME is not None:
        warnings.warn(
            f"`past_key_values` is deprecated for `{owner}` (as in transformers' own models since 5.24); use `cache`",
            FutureWarning,
            stacklevel=3,
        )
    return legacy


def cache_field(cache) -> dict:
    """`{name: cache}` under the output field name of the running transformers."""
    return {CACHE_NAME: cache}


def kernels_installed() -> bool:
    return importlib.util.find_spec("kernels") is not None


def loading_kwargs(kwargs: dict, installed: bool | None = None) -> dict:
    """`from_pretrained` keyword arguments that load without hub kernels where the `kernels` package is absent."""
    installed = kernels_installed() if installed is None else installed
    if installed or kwargs.get("use_kernels") is not None or kwargs.get("kernel_config") is not None:
        return kwargs
    return {**kwargs, "use_kernels": False}


__all__ = [
    "CACHE_NAME",
    "CACHE_NAMES",
    "DEPRECATED_CACHE_NAME",
    "cache_field",
    "kernels_installed",
    "loading_kwargs",
    "take_cache",
]
