"""`mla-dsa upgrade-code DIR`: refresh the code frozen into a checkpoint we wrote, leaving its weights alone.

A checkpoint carries the payload (`modeling/*.py`) of the mla-dsa release that wrote it, and `trust_remote_code`
runs that copy. When transformers changes under it (5.24 renamed the cache), the fix is new code, not new weights:
this replaces the payload files and `config.json`'s `auto_map` and version stamp with the installed release's. Each
file is written to a temporary sibling and renamed over the old one, config.json last (the new code reads the old
config), so an interrupted upgrade leaves every file either old or new, and running it again finishes it. Weight
files, the index, tokenizer and generation files are never opened for writing.
"""

import json
import os
from pathlib import Path

from ..modeling.configuration_mla_dsa import AUTO_MAP, PAYLOAD_VERSION, PAYLOAD_VERSION_KEY, MlaDsaConfig
from .payload import payload_files
from .source import ConversionError


def upgrade_code(directory: str | os.PathLike) -> list[str]:
    """Rewrites `directory`'s payload files and config.json for the installed mla-dsa; returns the files changed."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConversionError(directory, "not a checkpoint directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(config_path, f"not readable JSON ({err})") from err
    if config.get("model_type") != MlaDsaConfig.model_type:
        raise ConversionError(
            config_path,
            f"model_type is {config.get('model_type')!r}, not {MlaDsaConfig.model_type!r}: only checkpoints written "
            "by mla-dsa carry its code (convert other MLA checkpoints with `mla-dsa convert`)",
        )
    try:
        MlaDsaConfig.from_dict(config)  # the new code must read this config before anything is replaced
    except (ValueError, TypeError) as err:
        raise ConversionError(config_path, f"the installed mla-dsa cannot read it ({err})") from err

    changed = []
    current = payload_files()
    for source in current:
        target = directory / source.name
        new = source.read_bytes()
        if not target.is_file() or target.read_bytes() != new:
            _replace(target, new)
            changed.append(source.name)
    # Files of an older payload that the new one no longer has (merged or moved into the package): nothing imports
    # them any more, and left behind they would read as this checkpoint's code.
    for stale in sorted(set(directory.glob("*_mla_dsa.py")) - {directory / source.name for source in current}):
        stale.unlink()
        changed.append(f"{stale.name} (removed)")
    upgraded = dict(
        config, auto_map={**config.get("auto_map", {}), **AUTO_MAP}, **{PAYLOAD_VERSION_KEY: PAYLOAD_VERSION}
    )
    if upgraded != config:
        _replace(config_path, (json.dumps(upgraded, indent=2, sort_keys=True) + "\n").encode())
        changed.append(config_path.name)
    return changed


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.mla-dsa-upgrade")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConversionError(path, f"cannot write ({err.strerror or err})") from err


__all__ = ["upgrade_code"]
