"""Checkpoint fixtures for the conversion tests: read/write safetensors checkpoint directories by hand.

- `read_checkpoint` / `write_checkpoint`: every tensor of a directory (one file or sharded with an index json), and
  the inverse, keeping the shard layout.
- `make_fp8_checkpoint`: a bf16 checkpoint block-quantized to FP8 exactly as DeepSeek publishes V3/V3.2/R1.
- `add_mtp_layer`: multi-token-prediction tensors (`model.layers.{num_hidden_layers}.*`) added by hand.
- `write_synthetic_checkpoint`: a large deepseek_v3-format checkpoint written tensor by tensor (no model built).
- `snapshot`: content hash and mtime of every file of a directory (SRC must never change).
"""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config

from mla_dsa import MlaDsaConfig
from mla_dsa.conversion.fp8 import quantize_block_fp8
from mla_dsa.conversion.plan import expected_tensors

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
INDEXER_PARAMS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")


# ------------------------------------------------------------------------------------------------ reading, writing
def weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index json or the single model.safetensors."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {name: "model.safetensors" for name in handle.keys()}


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by name."""
    directory = Path(directory)
    tensors = {}
    for shard in sorted(set(weight_map(directory).values())):
        with safe_open(str(directory / shard), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def read_shards(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Shard file name -> its tensors."""
    directory = Path(directory)
    shards = {}
    for shard in sorted(set(weight_map(directory).values())):
        with safe_open(str(directory / shard), framework="pt") as handle:
            shards[shard] = {name: handle.get_tensor(name) for name in handle.keys()}
    return shards


def write_shards(directory: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    """Writes each shard (replacing what is there) and, for more than one, the index json (as save_pretrained)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / shard), metadata={"format": "pt"})
    index = directory / INDEX_NAME
    if len(shards) > 1 or index.exists():
        mapping = {name: shard for shard, tensors in shards.items() for name in tensors}
        total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}))


def edit_config(directory: Path, **changes) -> dict:
    """Sets keys of config.json (a value of None deletes the key); returns the new dict."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
    return config


def add_tokenizer_files(directory: Path) -> None:
    """A tokenizer.json / tokenizer_config.json / special_tokens_map.json, as a hub checkpoint has them."""
    directory = Path(directory)
    vocab = {f"<t{i}>": i for i in range(97)}
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<t0>"}}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<t1>", "eos_token": "<t2>"})
    )
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<t1>", "eos_token": "<t2>"}))


# ----------------------------------------------------------------------------------------------------------- FP8
def is_fp8_quantized(name: str, shape) -> bool:
    """The 2-D linear weights of attention, MLP and experts that DeepSeek's FP8 checkpoints quantize: not norms,
    embeddings, lm_head, the router gate or the indexer's weights_proj (its wq_b and wk are quantized, as in
    DeepSeek-V3.2's release)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    if ".self_attn." not in name and ".mlp." not in name:
        return False
    if "norm" in name or name.endswith(".mlp.gate.weight") or name.endswith("indexer.weights_proj.weight"):
        return False
    return True


def make_fp8_checkpoint(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copies the checkpoint at `src_dir` into `dst_dir` with every `is_fp8_quantized` weight stored as
    float8_e4m3fn plus a float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)] in the same shard, and
    `quantization_config` in config.json. Returns the names of the quantized weights."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    quantized = []
    shards = {}
    for shard, tensors in read_shards(src_dir).items():
        out = {}
        for name, tensor in tensors.items():
            if is_fp8_quantized(name, tensor.shape):
                weight, scale = quantize_block_fp8(tensor)
                assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
                assert scale.shape == (math.ceil(tensor.shape[0] / 128), math.ceil(tensor.shape[1] / 128))
                out[name], out[name + SCALE_SUFFIX] = weight, scale
                quantized.append(name)
            else:
                out[name] = tensor
        shards[shard] = out
    for extra in src_dir.iterdir():
        if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != INDEX_NAME:
            shutil.copyfile(extra, dst_dir / extra.name)
    if (src_dir / INDEX_NAME).exists():
        (dst_dir / INDEX_NAME).write_text("{}")  # rewritten by write_shards
    write_shards(dst_dir, shards)
    edit_config(dst_dir, quantization_config=FP8_QUANTIZATION_CONFIG)
    return sorted(quantized)


def dequantize_reference(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = W_fp8 * scale of its 128x128 block, in float32, then cast (written independently of mla_dsa's)."""
    rows = torch.arange(weight.shape[0]) // 128
    cols = torch.arange(weight.shape[1]) // 128
    return (weight.float() * scale_inv.float()[rows][:, cols]).to(dtype)


# ----------------------------------------------------------------------------------------------------------- MTP
def add_mtp_layer(directory: Path, own_shard: bool = False, fp8: bool = False) -> list[str]:
    """Adds DeepSeek-V3's multi-token-prediction layer `model.layers.{num_hidden_layers}.*` (a decoder layer plus
    embed/enorm/hnorm/eh_proj/shared_head) to the checkpoint: into its last shard, or into a shard of its own.
    With `fp8`, its linear weights are block-quantized with scales. Returns the added names."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    layer, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    rank, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    generator = torch.Generator().manual_seed(123)
    prefix = f"model.layers.{layer}."
    shapes = {
        "embed_tokens.weight": (vocab, hidden),
        "enorm.weight": (hidden,),
        "hnorm.weight": (hidden,),
        "eh_proj.weight": (hidden, 2 * hidden),
        "self_attn.kv_a_proj_with_mqa.weight": (rank + rope, hidden),
        "self_attn.kv_a_layernorm.weight": (rank,),
        "input_layernorm.weight": (hidden,),
        "mlp.gate.weight": (config.get("n_routed_experts") or 4, hidden),
        "mlp.experts.0.down_proj.weight": (hidden, config["moe_intermediate_size"]),
        "shared_head.norm.weight": (hidden,),
        "shared_head.head.weight": (vocab, hidden),
    }
    shards = read_shards(directory)
    dtype = next(t.dtype for tensors in shards.values() for t in tensors.values() if t.is_floating_point())
    dtype = torch.bfloat16 if dtype.itemsize == 1 else dtype
    added = {}
    for suffix, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.05).to(dtype)
        name = prefix + suffix
        if fp8 and is_fp8_quantized(name, shape) and "eh_proj" not in name:
            added[name], added[name + SCALE_SUFFIX] = quantize_block_fp8(tensor)
        else:
            added[name] = tensor
    if own_shard:
        if not (directory / INDEX_NAME).exists():  # turn a single-file checkpoint into a sharded one
            shards = {"model-00001-of-00002.safetensors": shards.pop("model.safetensors")}
            (directory / "model.safetensors").unlink()
        shards["model-mtp.safetensors"] = added
    else:
        shards[sorted(shards)[-1]].update(added)
    write_shards(directory, shards)
    return sorted(added)


# ---------------------------------------------------------------------------------------------- large checkpoints
def synthetic_v3_config(**overrides) -> DeepseekV3Config:
    """A deepseek_v3 config with many layers and large-ish dims (~500 MB of bf16 weights by default)."""
    fields = dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=192,
        num_hidden_layers=20,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=256,
        q_lora_rank=384,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
    )
    return DeepseekV3Config(**{**fields, **overrides})


def write_synthetic_checkpoint(directory: Path, config: DeepseekV3Config, shard_bytes: int) -> dict:
    """Writes `config` and random bf16 tensors with exactly the names and shapes it implies (e_score_correction_bias
    in float32, as DeepSeek's), in shards of about `shard_bytes`, with an index json. Never builds a model.
    Returns {"total": bytes of tensors, "shards": number of shard files, "largest": bytes of the largest file}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    fields = {k: v for k, v in config.to_dict().items() if k in MlaDsaConfig.__annotations__}
    shapes = {
        name: shape
        for name, shape in expected_tensors(MlaDsaConfig(**fields)).items()
        if ".self_attn.indexer." not in name
    }
    largest = max(math.prod(shape) for shape in shapes.values())
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(largest + 65536, generator=generator) * 0.02).to(torch.bfloat16)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    mapping = {}
    offset = 0
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            count = math.prod(shapes[name])
            offset = (offset + 7919) % 65536
            tensor = pool[offset : offset + count].reshape(shapes[name]).clone()
            if name.endswith("e_score_correction_bias"):
                tensor = tensor.float()
            tensors[name] = tensor
            mapping[name] = shard
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
    total = sum(math.prod(s) * (4 if n.endswith("e_score_correction_bias") else 2) for n, s in shapes.items())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": mapping}))
    files = [directory / shard for shard in set(mapping.values())]
    return {"total": total, "shards": len(files), "largest": max(f.stat().st_size for f in files)}


# ---------------------------------------------------------------------------------------------------- snapshots
def snapshot(directory: Path) -> dict[str, tuple]:
    """Relative path -> (sha256, size, mtime_ns, mode) of every file, symlink and folder under `directory`,
    hidden ones included; a symlink is recorded by its target, never followed."""
    directory = Path(directory)
    state = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            rel = str(path.relative_to(directory))
            if path.is_symlink():
                state[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir", info.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                state[rel] = (digest, info.st_size, info.st_mtime_ns, info.st_mode)
    return state


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `directory` (hidden ones included)."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }
