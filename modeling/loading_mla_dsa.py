"""What `from_pretrained` checks beyond transformers: local weight files that are truncated or corrupt (one
ValueError naming the file, before transformers reads them, through safetensors' own header validation), a
checkpoint with no indexer at all, and a checkpoint whose code (the payload beside its weights) is older than the
installed mla-dsa.
"""

import importlib.metadata
import json
import re
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from transformers.utils import logging

from .configuration_mla_dsa import FIRST_PAYLOAD_VERSION, PAYLOAD_VERSION_KEY, MlaDsaConfig

logger = logging.get_logger(__name__)


def warn_if_indexer_missing(model: nn.Module, missing: set[str], path) -> None:
    indexer_keys = {name for name in model.state_dict() if ".self_attn.indexer." in name}
    if indexer_keys and indexer_keys <= missing:
        layers = {int(m.group(1)) for key in indexer_keys if (m := re.search(r"layers\.(\d+)\.", key))}
        logger.warning(
            f"{path} has no DSA indexer weights for {len(layers)} layer(s) ({len(indexer_keys)} tensors): they were "
            "initialized randomly. Train the indexer (mla-dsa train-indexer) before relying on sparse attention, or "
            "run dense: use_sparse_attention=False (to from_pretrained, or to each forward / generate call)."
        )


def warn_if_code_is_older(config: MlaDsaConfig, directory: Path) -> None:
    """Once per checkpoint: with mla-dsa installed, a checkpoint whose code (the payload beside its weights) is older
    than the package runs that old code under trust_remote_code, which newer transformers releases may break."""
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


__all__ = ["check_weight_file", "warn_if_code_is_older", "warn_if_indexer_missing", "weight_files"]
