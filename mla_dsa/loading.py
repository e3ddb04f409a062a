"""Loading our checkpoints with the package's checks on top of transformers' `from_pretrained`.

The checkpoints' own code loads as transformers' models load (`MlaDsaForCausalLM.from_pretrained` is transformers',
with its load report); what the package adds lives here, where a release can change it, and is what its commands and
`mla_dsa.load_checkpoint` run:

- a truncated or corrupt local weight file, or a shard the index lists but the directory lacks, is one ValueError
  naming the file, before transformers reads it (transformers' own error names no file), through safetensors' own
  header validation;
- a tensor whose shape the config contradicts is one ValueError naming the tensor and the file
  (`ignore_mismatched_sizes=True` re-initializes it instead, as in transformers);
- a checkpoint with no indexer at all (a dense MLA one) gets one warning on how to train it, and loaded dense by choice
  (`use_sparse_attention=False`), no report of the indexer it will not use;
- a checkpoint whose code is older than the installed package gets one notice naming `mla-dsa upgrade-code`;
- where the `kernels` package is absent (an install with `--no-deps`), no hub kernels are asked for
  (`loading_kwargs`): transformers 5.25 kernelizes by default and then refuses to load any model without it.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from transformers.utils import logging

from .modeling.configuration_mla_dsa import FIRST_PAYLOAD_VERSION, PAYLOAD_VERSION_KEY

logger = logging.get_logger(__name__)


def load_checkpoint(path: str | os.PathLike, model_class: type | None = None, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` (MlaDsaForCausalLM unless given) with the checks above; with
    `output_loading_info=True`, (model, transformers' loading info)."""
    if model_class is None:
        from .modeling.modeling_mla_dsa import MlaDsaForCausalLM as model_class
    kwargs = loading_kwargs(kwargs)
    wants_info = kwargs.pop("output_loading_info", False)
    tolerate_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
    directory = Path(path) if path is not None and os.path.isdir(path) else None
    files = weight_files(directory) if directory is not None else {}
    for filename in sorted(set(files.values())):
        check_weight_file(directory / filename)
    # A dense checkpoint loaded to run dense: its missing indexer is never used, so transformers' load report (a table
    # of it) is not shown; anything else missing or unexpected still is.
    dense_by_choice = kwargs.get("use_sparse_attention") is False and bool(files)
    quiet = dense_by_choice and not any(".self_attn.indexer." in name for name in files)
    verbosity = logging.get_verbosity()
    if quiet:
        logging.set_verbosity_error()
    try:
        # Tolerant, then the first mismatch (from the loading info) is raised here: transformers' own mismatch error
        # is a RuntimeError pointing at its log report.
        model, info = model_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)  # fmt: skip
    finally:
        logging.set_verbosity(verbosity)
    if quiet:
        missing = sorted(key for key in info.get("missing_keys", ()) if ".self_attn.indexer." not in key)
        unexpected = sorted(info.get("unexpected_keys", ()))
        if missing or unexpected:
            logger.warning(
                f"{path}: missing tensors {missing} (initialized), unexpected tensors {unexpected} (ignored)"
            )
    for key, checkpoint_shape, model_shape in info.get("mismatched_keys", ()) if not tolerate_mismatch else ():
        where = directory / files[key] if key in files else path
        raise ValueError(f"{where}: tensor {key} has shape {list(checkpoint_shape)}, the config gives "
                         f"{list(model_shape)}")  # fmt: skip
    if directory is not None and (directory / "modeling_mla_dsa.py").is_file():  # it carries our code
        warn_if_code_is_older(model.config, directory)
    if model.config.use_sparse_attention:  # dense by choice: a missing indexer is never used
        warn_if_indexer_missing(model, set(info.get("missing_keys", ())), path)
    return (model, info) if wants_info else model


def kernels_installed() -> bool:
    return importlib.util.find_spec("kernels") is not None


def loading_kwargs(kwargs: dict, installed: bool | None = None) -> dict:
    """`from_pretrained` keyword arguments that load without hub kernels where the `kernels` package is absent (what
    transformers 5.14 to 5.24 do by default); an explicit `use_kernels` or `kernel_config` is left to transformers."""
    installed = kernels_installed() if installed is None else installed
    if installed or kwargs.get("use_kernels") is not None or kwargs.get("kernel_config") is not None:
        return kwargs
    return {**kwargs, "use_kernels": False}


def warn_if_indexer_missing(model: nn.Module, missing: set[str], path) -> None:
    indexer_keys = {name for name in model.state_dict() if ".self_attn.indexer." in name}
    if indexer_keys and indexer_keys <= missing:
        layers = {int(m.group(1)) for key in indexer_keys if (m := re.search(r"layers\.(\d+)\.", key))}
        logger.warning(
            f"{path} has no DSA indexer weights for {len(layers)} layer(s) ({len(indexer_keys)} tensors): they were "
            "initialized randomly. Train the indexer (mla-dsa train-indexer) before relying on sparse attention, or "
            "run dense: use_sparse_attention=False (to from_pretrained, or to each forward / generate call)."
        )


def warn_if_code_is_older(config, directory: Path) -> None:
    """Once per checkpoint: a checkpoint whose code (the payload beside its weights) is older than the package runs
    that old code under trust_remote_code, which newer transformers releases may break."""
    written_by = getattr(config, PAYLOAD_VERSION_KEY, None) or FIRST_PAYLOAD_VERSION
    try:
        installed = importlib.metadata.version("mla-dsa")
    except importlib.metadata.PackageNotFoundError:
        return
    if _release(written_by) < _release(installed):
        logger.warning_once(
            f"{directory} carries the code of mla-dsa {written_by}, older than the installed {installed}: run "
            f"`mla-dsa upgrade-code {directory}` to refresh it (weights are not touched)"
        )


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: 0.2.0 -> (0, 2, 0), 0.2.0.dev1 -> (0, 2, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def weight_files(directory: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name of a local checkpoint (empty if it has no safetensors)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text()).get("weight_map", {}))
    single = directory / "model.safetensors"
    if not single.exists():
        return {}
    return dict.fromkeys(_tensor_names(single), "model.safetensors")


def check_weight_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"{path}: weight file listed in the index is missing")
    _tensor_names(path)


def _tensor_names(path: Path) -> list[str]:
    """The tensors of a safetensors file, or one ValueError naming it if it is cut short or not safetensors at all:
    opening checks that the header's offsets cover exactly the file (safetensors maps files lazily, so a file cut
    short would otherwise surface only when its last tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({err})") from None


__all__ = ["check_weight_file", "load_checkpoint", "loading_kwargs", "weight_files"]
