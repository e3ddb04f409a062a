"""`mla-dsa convert SRC OUT.gguf --export gguf --llama-cpp DIR`: a GGUF for llama.cpp's DeepSeek-V3.2 sparse attention
(arch `deepseek32`: lightning indexer, top-k, latent cache), written by llama.cpp's own converter.

SRC is exported to DeepSeek-V3.2's format first (`--export deepseek_v32`, in a hidden directory beside OUT), then the
`convert_hf_to_gguf.py` of the llama.cpp checkout DIR converts that, in a process of its own (it imports DIR's
`gguf-py`, newer than the registry's `gguf`). Four things our checkpoints hold that its DeepSeek-V3.2 converter does
not expect are handled in that process, on its classes, without editing DIR (`adjust_converter`):

1. It asserts `tokenizer.add_bos_token`, which transformers 5 no longer reads from tokenizer_config.json once a
   tokenizer.json exists: the GGUF records instead whether the tokenizer starts a text with BOS.
2. A byte-level tokenizer (256 ids, no merges: the embedded model's) has no pre-tokenizer llama.cpp knows: it is
   written as a GPT-2 vocabulary of its byte symbols with one merge that yields no token, so every byte keeps its id.
3. llama.cpp normalizes the query and key/value latents with `rms_norm_eps`, transformers (and we) with 1e-6. On a GQA
   conversion (`linear_latent_norm`: the latents sit in the norm's linear regime, where the output scales with
   1/sqrt(eps)) the two norms' weights are rescaled by sqrt(rms_norm_eps / 1e-6).
4. Those conversions' latent down-projections are scaled below float16's normal range: they stay float32 in an f16
   GGUF.

What llama.cpp cannot run is refused before anything is written (`llama_cpp_refusals`). Run as a script, this file is
that converter process: `python llama_cpp.py LLAMA_CPP_DIR EXPORT_DIR --outfile F --outtype T`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

GGUF_TYPES = ("f32", "f16", "bf16")
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV32 q_a_layernorm / kv_a_layernorm


def llama_cpp_refusals(config: dict) -> list[str]:
    """Why llama.cpp's deepseek32 graph cannot run an export with this config.json (empty when it can)."""
    reasons = []
    head_dim = config["index_head_dim"]
    if head_dim < 64 or head_dim & (head_dim - 1):
        reasons.append(f"index_head_dim={head_dim}: llama.cpp rotates the indexer's queries and keys with a Hadamard "
                       "matrix and aborts unless the head is a power of two of at least 64 (convert with "
                       "--index-head-dim 64 or 128)")  # fmt: skip
    if not config.get("qk_nope_head_dim"):
        reasons.append("qk_nope_head_dim=0: llama.cpp's deepseek32 loader needs the position-free part of the query")
    if config.get("attention_bias"):
        reasons.append("attention_bias=True (a GQA source's q/k/v biases): llama.cpp's DeepSeek graphs load "
                       "q_a_proj, kv_a_proj_with_mqa and o_proj weights without biases")  # fmt: skip
    rope_type = (config.get("rope_scaling") or {}).get("rope_type", (config.get("rope_scaling") or {}).get("type"))
    if rope_type not in (None, "default", "yarn"):
        hint = " (convert a GQA source with --qk-rope-head-dim set to its head_dim)" if rope_type == "longrope" else ""
        reasons.append(f"rope_scaling type {rope_type!r}: llama.cpp's deepseek32 graph applies no per-frequency "
                       f"factors{hint}")  # fmt: skip
    return reasons


def check_llama_cpp_checkout(directory: str | os.PathLike) -> None:
    """A ConversionError unless DIR holds llama.cpp's converter and its gguf-py."""
    from .source import ConversionError

    if not (Path(directory) / "convert_hf_to_gguf.py").is_file() or not (Path(directory) / "gguf-py").is_dir():
        raise ConversionError(directory, "not a llama.cpp checkout (no convert_hf_to_gguf.py and gguf-py); pass the "
                                         "llama.cpp source directory with --llama-cpp or LLAMA_CPP_DIR")  # fmt: skip


def export_gguf(export_dir: str | os.PathLike, out_file: str | os.PathLike, llama_cpp_dir: str | os.PathLike,
                outtype: str = "bf16") -> Path:  # fmt: skip
    """Converts a DeepSeek-V3.2 export to OUT with llama.cpp's converter (in a subprocess), written to a partial file
    and renamed into place. DIR and `outtype` are checked by `convert_to_gguf`, before the export."""
    from .source import ConversionError

    config = json.loads((Path(export_dir) / "config.json").read_text())
    refusals = llama_cpp_refusals(config)
    if refusals:
        raise ConversionError(out_file, "llama.cpp cannot run this model: " + "; ".join(refusals))
    out_file = Path(out_file)
    partial = out_file.with_name(f".{out_file.name}.partial")
    command = [sys.executable, __file__, str(llama_cpp_dir), str(export_dir), "--outfile", str(partial),
               "--outtype", outtype]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        last = [line for line in result.stderr.strip().splitlines() if line.strip()][-3:]
        raise ConversionError(out_file, "llama.cpp's converter failed: " + " | ".join(last))
    partial.replace(out_file)
    return out_file


def convert_to_gguf(src: str | os.PathLike, dst: str | os.PathLike, options: dict) -> Path:
    """`convert_checkpoint(src, dst, export="gguf", llama_cpp=DIR, gguf_type=...)`: SRC exported to DeepSeek-V3.2's
    format in a hidden directory beside DST (kept by an interruption for `resume`, removed once DST is written), then
    converted by DIR's converter. `options` are `convert_checkpoint`'s."""
    import shutil

    from .convert import convert_checkpoint
    from .source import ConversionError

    options = dict(options)
    options.pop("export")
    llama_cpp_dir = options.pop("llama_cpp", None) or os.environ.get("LLAMA_CPP_DIR")
    gguf_type = options.pop("gguf_type", None) or "bf16"
    dst = Path(dst).resolve()
    if dst.suffix != ".gguf":
        raise ConversionError(dst, "--export gguf writes one file: DST must end in .gguf")
    if not llama_cpp_dir:
        raise ConversionError(dst, "--export gguf runs llama.cpp's own converter: pass its source checkout with "
                                   "--llama-cpp DIR (or LLAMA_CPP_DIR)")  # fmt: skip
    if gguf_type not in GGUF_TYPES:
        raise ConversionError(dst, f"--gguf-type must be one of {list(GGUF_TYPES)}, got {gguf_type!r}")
    check_llama_cpp_checkout(llama_cpp_dir)
    if dst.exists() and not options.get("overwrite"):
        raise ConversionError(dst, "exists; pass --overwrite to replace it")
    staging = dst.parent / f".{dst.name}.deepseek_v32"
    resume = bool(options.pop("resume", False)) and staging.exists()
    options["overwrite"] = not resume
    convert_checkpoint(src, staging, export="deepseek_v32", resume=resume, **options)
    try:
        export_gguf(staging, dst, llama_cpp_dir, gguf_type)
    except ConversionError:  # a refusal or the converter's failure: rerunning as it is cannot help
        shutil.rmtree(staging)
        raise
    shutil.rmtree(staging)  # an interruption keeps it, for --resume
    return dst


# ---- the converter process (everything below runs with DIR's gguf-py and converter imported) ----


def adjust_converter(model_class, gguf, logger) -> None:
    """Adjustments 1-4 of the module docstring, on llama.cpp's DeepSeek-V3.2 converter class."""

    def byte_level(directory: Path) -> bool:
        path = directory / "tokenizer.json"
        model = json.loads(path.read_text(encoding="utf-8")).get("model", {}) if path.is_file() else {}
        return model.get("type") == "WordLevel" and len(model.get("vocab", {})) == 256 and not model.get("merges")

    def set_vocab(self) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.dir_model)
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
        if byte_level(Path(self.dir_model)):
            symbols = {index: token for token, index in tokenizer.get_vocab().items()}
            special = set(tokenizer.all_special_ids)
            tokens, types = [], []
            for index in range(self.hparams["vocab_size"]):
                tokens.append(symbols.get(index, f"[PAD{index}]"))
                kind = "CONTROL" if index in special else "NORMAL" if index in symbols else "UNUSED"
                types.append(getattr(gguf.TokenType, kind))
            self.gguf_writer.add_tokenizer_model("gpt2")
            self.gguf_writer.add_tokenizer_pre("gpt-2")
            self.gguf_writer.add_token_list(tokens)
            self.gguf_writer.add_token_types(types)
            self.gguf_writer.add_token_merges([f"{symbols[0]} {symbols[0]}"])  # its product is no token: inert
            gguf.SpecialVocab(self.dir_model, load_merges=False).add_to_gguf(self.gguf_writer)
        else:
            self._set_vocab_gpt2()  # llama.cpp's own, without the add_bos_token assert
        written = {key for shard in self.gguf_writer.kv_data for key in shard}
        if gguf.Keys.Tokenizer.ADD_BOS not in written:
            self.gguf_writer.add_add_bos_token(adds_bos)

    def latent_norm_scale(self) -> float:
        eps = float(self.hparams.get("rms_norm_eps", LATENT_NORM_EPS))
        return (eps / LATENT_NORM_EPS) ** 0.5 if self.hparams.get("linear_latent_norm") else 1.0

    modify_tensors = model_class.modify_tensors

    def modify_latent_norms(self, data_torch, name, bid):
        if name.endswith(("q_a_layernorm.weight", "kv_a_layernorm.weight")) and latent_norm_scale(self) != 1.0:
            data_torch = data_torch * latent_norm_scale(self)
        yield from modify_tensors(self, data_torch, name, bid)

    force_quant = model_class.tensor_force_quant

    def keep_latent_projections_float32(self, name, new_name, bid, n_dims):
        if (self.hparams.get("linear_latent_norm") and self.ftype == gguf.LlamaFileType.MOSTLY_F16
                and new_name.endswith(("attn_q_a.weight", "attn_kv_a_mqa.weight"))):  # fmt: skip
            return gguf.GGMLQuantizationType.F32
        return force_quant(self, name, new_name, bid, n_dims)

    model_class.set_vocab = set_vocab
    model_class.modify_tensors = modify_latent_norms
    model_class.tensor_force_quant = keep_latent_projections_float32
    logger.info("mla-dsa: DeepSeek-V3.2 converter adjusted (tokenizer, BOS, latent norms)")


def run_converter(llama_cpp_dir: str, argv: list[str]) -> None:
    directory = Path(llama_cpp_dir).resolve()
    here = Path(__file__).resolve().parent  # a script's own folder leads sys.path: ours must not shadow DIR's modules
    sys.path = [str(directory), str(directory / "gguf-py"), *(p for p in sys.path if Path(p or ".").resolve() != here)]
    import importlib

    try:  # DIR's modules (its `conversion` package, not ours)
        converter = importlib.import_module("convert_hf_to_gguf")
        gguf = importlib.import_module("gguf")
        logger = importlib.import_module("conversion.base").logger
        model_class = importlib.import_module("conversion.deepseek").DeepseekV32Model
    except (ImportError, AttributeError) as error:
        sys.exit(f"{directory}: no DeepSeek-V3.2 converter ({error}); llama.cpp with DSA (2026-10 or newer) is needed")
    adjust_converter(model_class, gguf, logger)
    sys.argv = [str(directory / "convert_hf_to_gguf.py"), *argv]
    converter.main()


if __name__ == "__main__":
    run_converter(sys.argv[1], sys.argv[2:])
