"""Lazy, header-first reading of a safetensors checkpoint directory (one file or sharded with an index json).

Nothing is loaded until asked for: the tensor table comes from the safetensors headers, and `read` pulls one tensor,
dequantizing block-FP8 weights with their `weight_scale_inv`. At most one shard is kept open (mmap'd) at a time, so
memory stays about one tensor plus the page cache the OS can drop.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import ConversionError
from .fp8 import dequantize_block_fp8


def tokenizer_code_files(directory: Path) -> set[str]:
    """The files of code its `tokenizer_config.json` names (`auto_map`): Kimi-K2's and Moonlight's tokenizers are
    classes of their own, which DST's tokenizer cannot load without. The model's code is never carried (ours replaces
    it)."""
    try:
        auto_map = json.loads((directory / "tokenizer_config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    references = [ref for refs in auto_map.values() for ref in (refs if isinstance(refs, list) else [refs])]
    # "module.Class", or "repo--module.Class" for code in another repository (not here, so not carried)
    return {ref.rsplit(".", 1)[0] + ".py" for ref in references if isinstance(ref, str) and "--" not in ref}


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
# Files of SRC that are not carried into DST: weights and code (rewritten), the configs the converter writes anew.
NOT_CARRIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".py", ".pyc")
TRAINING_RUN_FILE = "mla-dsa-training.json"  # train-indexer's record of the run in its OUT: not a model file
NOT_CARRIED_NAMES = ("config.json", INDEX_NAME, TRAINING_RUN_FILE)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPES


class SourceCheckpoint:
    """A checkpoint directory: its config dict, its shards in order, and a table of every tensor it holds."""

    def __init__(self, path: Path | str, follow_symlinks: bool = False):
        self.path = Path(path)
        self.follow_symlinks = follow_symlinks
        if not self.path.is_dir():
            raise ConversionError(self.path, "not a directory")
        self._check_link(self.path / "config.json")
        self.config = read_json(self.path / "config.json")
        self.weight_map = self._read_weight_map()
        for extra in self.extra_files():
            self._check_link(extra)
        self.shards = list(dict.fromkeys(self.weight_map.values()))  # in index order, each once
        self.tensors = self._read_headers()
        self._open_name: str | None = None
        self._open_handle = None

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(index_path, "has no weight_map")
            for shard in set(weight_map.values()):
                self._check_shard_name(index_path, shard)
            return dict(sorted(weight_map.items(), key=lambda item: (_shard_order(item[1]), item[0])))
        single = self.path / SINGLE_NAME
        if not single.exists():
            raise ConversionError(self.path, f"no {INDEX_NAME} and no {SINGLE_NAME}: not a safetensors checkpoint")
        self._check_link(single)
        with open_safetensors(single) as handle:
            return {name: SINGLE_NAME for name in handle.keys()}

    def _check_shard_name(self, index_path: Path, shard: str) -> None:
        """Shard names are plain file names inside the checkpoint: no paths, no traversal, no symlinks out."""
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
            raise ConversionError(index_path, f"shard name {shard!r} is not a plain file name")
        target = self.path / shard
        self._check_link(target)
        if not target.exists():
            raise ConversionError(target, "shard listed in the index is missing")

    def _check_link(self, path: Path) -> None:
        """Every file read or carried over may be a symbolic link only with follow_symlinks: none is followed, or
        skipped, silently."""
        if path.is_symlink() and not self.follow_symlinks:
            raise ConversionError(path, "is a symbolic link; refusing to follow it (--follow-symlinks allows it, "
                                        "e.g. for a Hugging Face cache snapshot)")  # fmt: skip

    def extra_files(self) -> list[Path]:
        """Tokenizer (its own code too), generation config, license, README...: the files DST carries over unchanged."""
        tokenizer_code = tokenizer_code_files(self.path)
        return [
            path
            for path in sorted(self.path.iterdir())
            if path.is_file()
            and not path.name.startswith(".")
            and (not path.name.endswith(NOT_CARRIED_SUFFIXES) or path.name in tokenizer_code)
            and path.name not in NOT_CARRIED_NAMES
        ]

    def _read_headers(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            shard_path = self.path / shard
            with open_safetensors(shard_path) as handle:
                present = set(handle.keys())
                for name in [name for name, where in self.weight_map.items() if where == shard]:
                    if name not in present:
                        raise ConversionError(shard_path, f"tensor {name} listed in the index is not in this shard")
                    piece = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise ConversionError(shard_path, f"tensor {name} has unsupported dtype {piece.get_dtype()}")
                    tensors[name] = TensorInfo(name, shard, dtype, tuple(piece.get_shape()))
        return tensors

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def read(self, name: str, fp8_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """One tensor; an FP8 weight comes back dequantized to `fp8_dtype` with its block scale."""
        info = self.tensors[name]
        tensor = self._get(info)
        if not info.is_fp8:
            return tensor
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.tensors:
            raise ConversionError(self.path / info.shard, f"FP8 tensor {name} has no {scale_name}")
        block = tuple(self.config.get("quantization_config", {}).get("weight_block_size", (128, 128)))
        try:
            return dequantize_block_fp8(tensor, self._get(self.tensors[scale_name]), fp8_dtype, block)
        except ValueError as err:
            raise ConversionError(self.path / info.shard, f"{name}: {err}") from None

    def _get(self, info: TensorInfo) -> torch.Tensor:
        if self._open_name != info.shard:
            self.close()
            self._open_handle = open_safetensors(self.path / info.shard)
            self._open_name = info.shard
        try:
            return self._open_handle.get_tensor(info.name)
        except (SafetensorError, OSError) as err:
            raise ConversionError(self.path / info.shard, f"cannot read tensor {info.name}: {err}") from None

    def close(self) -> None:
        if self._open_handle is not None:
            self._open_handle.__exit__(None, None, None)
        self._open_handle = self._open_name = None


def open_safetensors(path: Path):
    """safe_open (a context manager), with a truncated or corrupt file turned into a ConversionError naming it:
    safetensors checks on opening that the header's offsets cover exactly the file."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise ConversionError(path, f"unreadable safetensors file (truncated or corrupt?): {err}") from None


def read_json(path: Path) -> dict:
    if not path.exists():
        raise ConversionError(path, "missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(path, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(path, "does not hold a JSON object")
    return data


def _shard_order(shard: str) -> tuple[int, str]:
    match = re.search(r"(\d+)-of-\d+", shard)
    return (int(match.group(1)) if match else 0, shard)


__all__ = ["ConversionError", "SourceCheckpoint", "TensorInfo", "read_json"]
