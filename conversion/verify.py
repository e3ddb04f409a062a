"""`--verify`: SRC through transformers' own class and the converted checkpoint through ours, on the same input."""

from pathlib import Path

import torch

from ..modeling.configuration_mla_dsa import MlaDsaConfig
from .plan import ConvertOptions, model_dtype, output_dtype, source_family
from .source import SCALE_SUFFIX, ConversionError, SourceCheckpoint


def verify_logits(source: SourceCheckpoint, converted: Path, config: MlaDsaConfig, opts: ConvertOptions) -> float:
    """Runs SRC (transformers' own class where one exists) and the converted model (an export: through transformers'
    DeepseekV32ForCausalLM) with every token selected on a
    short random input, in float32; raises ConversionError above tolerance. Returns the max logit difference."""
    from ..loading import load_checkpoint
    from ..modeling.modeling_mla_dsa import MlaDsaForCausalLM

    generator = torch.Generator().manual_seed(opts.seed)
    input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    reference = _reference_model(source, config, opts)
    if opts.export is None:
        converted_model = load_checkpoint(converted, MlaDsaForCausalLM, dtype=torch.float32, use_sparse_attention=False)
    else:  # the export through transformers' own class, every key selected
        converted_model = _exported_model(converted, opts.export)
    with torch.no_grad():
        expected = reference(input_ids).logits.float()
        actual = converted_model.eval()(input_ids).logits.float()
    diff = (expected - actual).abs().max().item()
    tolerance = opts.verify_tolerance or 1e-4 * max(1.0, expected.abs().max().item())
    print(f"verify: max |logit difference| = {diff:.3e} (tolerance {tolerance:.1e})")
    if not diff <= tolerance:
        raise ConversionError(converted, f"--verify failed: max logit difference {diff:.3e} > {tolerance:.1e}")
    return diff


def _exported_model(converted: Path, export: str) -> torch.nn.Module:
    import transformers

    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[transformers.CONFIG_MAPPING[export]]
    model, info = model_class.from_pretrained(converted, dtype=torch.float32, index_topk=1 << 30,
                                              output_loading_info=True)  # fmt: skip
    problems = {kind: sorted(names)[:3] for kind, names in info.items() if names}
    if problems:
        raise ConversionError(converted, f"transformers' {model_class.__name__} does not load the export: {problems}")
    return model


def _reference_model(source: SourceCheckpoint, config: MlaDsaConfig, opts: ConvertOptions) -> torch.nn.Module:
    """SRC through transformers' class for its model type, run in float32 on the source tensors rounded to the
    output dtype exactly as the conversion rounds them (FP8 dequantized, --dtype cast). transformers' own loading
    turns the per-expert checkpoint tensors into its fused expert layout (its checkpoint conversion mapping)."""
    import transformers

    from ..modeling.modeling_mla_dsa import MlaDsaForCausalLM

    model_type = source_family(source)
    if model_type == "mla_dsa":
        model_class = MlaDsaForCausalLM
        peer_config = MlaDsaConfig(**{**config.to_dict(), "use_sparse_attention": False})
    else:
        fields = {k: v for k, v in source.config.items() if k not in ("model_type", "quantization_config")}
        peer_config = transformers.AutoConfig.for_model(model_type, **{**fields, "dtype": "float32"})
        if model_type in ("deepseek_v32", "glm_moe_dsa"):
            peer_config.index_topk = 1 << 30  # every key selected: the dense reference
        model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(peer_config)]
    dtype_of_model = model_dtype(source, opts)
    state = {}
    for name, info in source.tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            dtype = output_dtype(info, opts, dtype_of_model)
            state[name] = source.read(name, fp8_dtype=dtype).to(dtype).float()
    source.close()
    model, info = model_class.from_pretrained(None, config=peer_config, state_dict=state, dtype=torch.float32,
                                              output_loading_info=True)  # fmt: skip
    if info["missing_keys"]:
        raise ConversionError("verify", f"reference model is missing {sorted(info['missing_keys'])[:3]}")
    return model.eval()


__all__ = ["verify_logits"]
