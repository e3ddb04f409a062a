"""Writing a planned conversion into `.DST.mla-dsa-partial`, resumably: each output shard is written atomically and
recorded in a state file, so after a kill `--resume` skips finished shards and yields the same bytes; then the
metadata (config.json, the payload, the index json, tokenizer and generation files), the check that every planned
tensor is in place, and the final rename to DST.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..modeling.configuration_mla_dsa import MlaDsaConfig
from .calibrate import CalibrationOptions, calibrate_indexers
from .export import export_config, permute_indexer_rope, permutes_indexer_rope
from .indexer_init import init_indexer
from .payload import payload_files
from .plan import ConvertOptions, OutputShard, OutputTensor
from .source import INDEX_NAME, ConversionError, SourceCheckpoint, read_json

STATE_NAME = ".mla-dsa-convert-state.json"
# --indexer-init calibrate: each layer's fitted indexer, a file each, kept in the partial directory as its fit ends
# so that --resume fits no layer again (the fits are most of a conversion's time), and the fit's report, which stays
# in DST (how its indexers were made).
CALIBRATED_NAME = ".mla-dsa-calibrated-indexers"
CALIBRATION_REPORT = "indexer_calibration.json"
_FORMAT_VERSION = 1


def _fingerprint(source: SourceCheckpoint, plan: list[OutputShard], opts: ConvertOptions) -> str:
    """Identifies one conversion: same SRC, options and plan. A partial conversion resumes only if it matches."""
    described = {
        "version": _FORMAT_VERSION,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("resume", "overwrite", "verify", "progress")},
        "source": sorted((i.name, i.shard, str(i.dtype), i.shape) for i in source.tensors.values()),
        "sizes": {shard: (source.path / shard).stat().st_size for shard in source.shards},
        "calibration": [(str(p), Path(p).stat().st_size) for p in opts.calibration_data or ()],
        "plan": [(s.filename, [(t.name, str(t.dtype), t.shape, t.source) for t in s.tensors]) for s in plan],
    }
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


def write_shards(source, config, plan: list[OutputShard], partial: Path, opts: ConvertOptions) -> None:
    fingerprint = _fingerprint(source, plan, opts)
    state = start_state(partial, fingerprint, opts.resume)
    todo = [shard for shard in plan if not _is_done(partial, shard, state)]
    calibrated = calibrated_indexers(source, config, todo, partial, opts)  # before the shards' progress bar
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="converting shards", unit="shard",
               disable=not opts.progress)  # fmt: skip
    produce = TensorMaker(source, config, opts, calibrated)
    for shard in todo:
        tensors = {}
        for tensor in shard.tensors:
            bar.set_postfix_str(tensor.name, refresh=False)
            tensors[tensor.name] = produce(tensor)
        tmp = partial / (shard.filename + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, partial / shard.filename)
        del tensors
        state["done"][shard.filename] = (partial / shard.filename).stat().st_size
        save_state(partial, state)
        bar.update(1)
    bar.close()


def calibrated_indexers(source, config, todo: list[OutputShard], partial: Path, opts: ConvertOptions) -> dict | None:
    """With --indexer-init calibrate and an indexer still to write: the fitted indexers by layer and suffix, fitted
    now (and kept in `partial`, with their report) or read back from an interrupted run's `partial`."""
    if opts.indexer_init != "calibrate" or not any(t.source is None for shard in todo for t in shard.tensors):
        return None
    kept = partial / CALIBRATED_NAME
    kept.mkdir(exist_ok=True)
    layer_files = {int(path.stem.split("-")[1]): path for path in kept.glob("layer-*.safetensors")}
    if (partial / CALIBRATION_REPORT).exists():  # the interrupted run had finished its fit
        return {layer: load_file(str(path)) for layer, path in layer_files.items()}
    fitted_before = {}
    for layer, path in layer_files.items():  # the layers whose fit it had finished
        with safe_open(path, "pt") as layer_file:
            tensors = {name: layer_file.get_tensor(name) for name in layer_file.keys()}
            fitted_before[layer] = (tensors, json.loads(layer_file.metadata()["report"]))

    def keep(layer: int, tensors: dict[str, torch.Tensor], report: dict) -> None:
        path = kept / f"layer-{layer}.safetensors"
        save_file(tensors, str(path.with_suffix(".tmp")), metadata={"report": json.dumps(report)})
        os.replace(path.with_suffix(".tmp"), path)

    fitted, report = calibrate_indexers(source, config, CalibrationOptions.of(opts), opts.seed, opts.progress,
                                        fitted_before=fitted_before, on_fitted=keep)  # fmt: skip
    (partial / CALIBRATION_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return fitted


class TensorMaker:
    """Makes each output tensor: a source tensor (dequantized, cast) or a new indexer tensor, its RoPE rows reordered
    for an export whose indexer rotates pairs the other way. The five indexer tensors of a layer come from one init
    call, kept until the next layer's are asked for, or from `calibrated` (--indexer-init calibrate)."""

    def __init__(self, source: SourceCheckpoint, config: MlaDsaConfig, opts: ConvertOptions,
                 calibrated: dict[int, dict[str, torch.Tensor]] | None = None):  # fmt: skip
        self.source, self.config, self.opts, self.calibrated = source, config, opts, calibrated
        self._layer: int | None = None
        self._indexer: dict[str, torch.Tensor] = {}

    def __call__(self, tensor: OutputTensor) -> torch.Tensor:
        made = self._make(tensor)
        if ".self_attn.indexer." in tensor.name and permutes_indexer_rope(self.config, self.opts.export):
            made = permute_indexer_rope(
                tensor.name, made, self.config, to_interleave=not self.config.indexer_rope_interleave
            )
        return made

    def _make(self, tensor: OutputTensor) -> torch.Tensor:
        if tensor.source is not None:
            return self.source.read(tensor.source, fp8_dtype=tensor.dtype).to(tensor.dtype).contiguous()
        if self.calibrated is not None:
            return self.calibrated[tensor.layer][tensor.name.split(".self_attn.indexer.")[1]].to(tensor.dtype)
        if self._layer != tensor.layer:
            self._layer = tensor.layer
            self._indexer = init_indexer(
                self.config, tensor.layer, self.opts.indexer_init, self.opts.seed,
                read=lambda name: self.source.read(name, torch.float32),
            )  # fmt: skip
        suffix = tensor.name.split(".self_attn.indexer.")[1]
        return self._indexer[suffix].to(tensor.dtype).contiguous()


def start_state(directory: Path, fingerprint: str, resume: bool, name: str = STATE_NAME, progress: str = "done",
                kept: tuple[str, ...] = (CALIBRATED_NAME, CALIBRATION_REPORT)) -> dict:  # fmt: skip
    """The state of a resumable write into `directory`, recorded in its file `name`: the interrupted run's, if
    `resume` and it was the same conversion (`fingerprint`), with everything but its state, its finished files
    (the keys of `state[progress]`) and `kept` removed (a kill inside a write leaves temporary files, ours or
    safetensors' own), or untouched if it finished (`state["complete"]`); else a fresh, empty directory."""
    state_path = directory / name
    if directory.exists() and resume and state_path.exists():
        state = read_json(state_path)
        if state.get("fingerprint") == fingerprint:
            for path in [] if state.get("complete") else directory.iterdir():
                if path.name not in (name, *kept) and path.name not in state[progress]:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            return state
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    state = {"fingerprint": fingerprint, progress: {}}
    save_state(directory, state, name)
    return state


def _is_done(partial: Path, shard: OutputShard, state: dict) -> bool:
    path = partial / shard.filename
    return shard.filename in state["done"] and path.exists() and path.stat().st_size == state["done"][shard.filename]


def save_state(directory: Path, state: dict, name: str = STATE_NAME) -> None:
    tmp = directory / (name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, directory / name)


def write_metadata(source: SourceCheckpoint, config: MlaDsaConfig, plan: list[OutputShard], partial: Path,
                   export: str | None = None) -> None:  # fmt: skip
    """config.json and the payload (or, for an export, the serving format's config.json alone), the index json, and
    SRC's tokenizer and generation files."""
    if export is None:
        config.save_pretrained(partial)
        for payload in payload_files():
            shutil.copyfile(payload, partial / payload.name)
    else:
        (partial / "config.json").write_text(json.dumps(export_config(config, export), indent=2, sort_keys=True) + "\n")
    if len(plan) > 1:
        total_size = sum(_nbytes(t) for shard in plan for t in shard.tensors)
        weight_map = {t.name: shard.filename for shard in plan for t in shard.tensors}
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for extra in source.extra_files():
        shutil.copyfile(extra, partial / extra.name)


def _nbytes(tensor: OutputTensor) -> int:
    count = 1
    for dim in tensor.shape:
        count *= dim
    return count * torch.empty(0, dtype=tensor.dtype).element_size()


def check_output(directory: Path, plan: list[OutputShard]) -> None:
    """Every planned tensor is in its shard with its dtype and shape, and the index json agrees."""
    written = SourceCheckpoint(directory)
    planned = {t.name: (shard.filename, t) for shard in plan for t in shard.tensors}
    if set(written.tensors) != set(planned):
        missing = sorted(set(planned) - set(written.tensors))
        extra = sorted(set(written.tensors) - set(planned))
        raise ConversionError(directory, f"output does not match the plan: missing {missing[:3]}, extra {extra[:3]}")
    for name, info in written.tensors.items():
        filename, tensor = planned[name]
        if info.shard != filename or info.shape != tensor.shape or info.dtype != tensor.dtype:
            raise ConversionError(directory / info.shard, f"tensor {name} is {info.dtype} {list(info.shape)} in "
                                                          f"{info.shard}; planned {tensor.dtype} {list(tensor.shape)} "
                                                          f"in {filename}")  # fmt: skip


def move_into_place(partial: Path, dst: Path) -> None:
    (partial / STATE_NAME).unlink(missing_ok=True)
    shutil.rmtree(partial / CALIBRATED_NAME, ignore_errors=True)
    if dst.exists():
        old = dst.parent / f".{dst.name}.mla-dsa-old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(partial, dst)
        shutil.rmtree(old)
    else:
        os.replace(partial, dst)


__all__ = ["check_output", "move_into_place", "write_metadata", "write_shards"]
