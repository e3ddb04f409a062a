"""`--verify`: SRC through transformers' own class and the converted checkpoint through ours, on the same input."""

import inspect
import re
from pathlib import Path

import torch

from ..modeling.configuration_mla_dsa import MlaDsaConfig
from ..modeling.modeling_mla_dsa import index_scores, selected_keys_mask
from .export import export_config, export_refusals, permute_indexer_rope, permutes_indexer_rope
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
        raise ConversionError(converted, f"--verify failed: max logit difference {diff:.3e} > {tolerance:.1e}"
                                         f"{_known_difference(source, config)}")  # fmt: skip
    return diff


def _known_difference(source: SourceCheckpoint, config: MlaDsaConfig) -> str:
    """Why SRC's class and ours differ by design, where they do."""
    moe = any(config.is_moe_layer(layer) for layer in range(config.num_hidden_layers))
    if source_family(source) == "deepseek_v2" and config.norm_topk_prob and config.num_experts_per_tok > 1 and moe:
        return ("; expected for this config: transformers' DeepseekV2 ignores norm_topk_prob=True (it scales the "
                "top-k expert weights by routed_scaling_factor), where DeepSeek-V2's own code, and ours, normalise "
                "them to sum 1 (DeepSeek's published V2 configs say false); --verify-tolerance accepts it")  # fmt: skip
    return ""


SPARSE_CHECK_TOKENS = 64  # the sparse check's input; index_topk a quarter of it, so the selection decides


def verify_sparse(converted: Path, config: MlaDsaConfig, opts: ConvertOptions) -> float | None:
    """--verify's check of the path the dense check never runs: the output with DSA on, against transformers' own
    class for its format (DeepSeek-V3.2's, or GLM-5's for interleaved or shared indexers) on the same weights, on
    random input of `SPARSE_CHECK_TOKENS` tokens with `index_topk` a quarter of it, in both attention modes.

    The two break exact ties among index scores differently (a key every head's ReLU zeroes scores 0.0), so it holds
    two things that ties do not change: transformers' indexer ranks every visible key in an order our index scores
    agree with (read in its order, ours never rise: an indexer computed otherwise -- its RoPE layout, its norm, its
    weights -- fails), and transformers' model attending to our selection gives our logits. Returns the max logit
    difference, or None where transformers' classes cannot express the model (said why)."""
    from ..loading import load_checkpoint
    from ..modeling.modeling_mla_dsa import MlaDsaForCausalLM

    glm = config.indexer_types or config.indexer_rope_interleave
    export = opts.export or ("glm_moe_dsa" if glm else "deepseek_v32")
    refusals = export_refusals(config, export)
    if refusals:
        print(f"verify sparse: not checked, transformers' {export} class cannot express this model: {refusals[0]}")
        return None
    seq_len = min(SPARSE_CHECK_TOKENS, config.max_position_embeddings)
    top_k = max(1, seq_len // 4)
    run_as = {"index_topk": top_k, "indexer_cache_dtype": "auto", "latent_cache_dtype": "auto"}  # no cache rounding
    # its indexers rank every key (index_topk = seq_len); it attends to our top-k
    peer = _peer_model(converted, config, export, seq_len, exported=opts.export is not None)
    ours = load_checkpoint(converted, MlaDsaForCausalLM, dtype=torch.float32, **run_as).eval()  # (after: peak memory)
    ours_chose, peer_ranked = {}, {}

    def record_ours(module, args, kwargs, selection):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        queries, weights = module.queries(bound["hidden_states"], bound["query_latent"], *bound["position_embeddings"])
        scores = index_scores(queries, weights, bound["keys"], module.softmax_scale)  # [B, S, T]
        visible = bound["visible"].mask(0, scores.shape[1])[..., : scores.shape[2]].expand_as(scores)
        ours_chose[module.layer_idx] = (selection, scores.masked_fill(~visible, float("-inf")))

    def take_ours(module, args, kwargs, ranking):
        peer_ranked[module.layer_idx] = ranking.long()  # [B, S, T]: every key, best first
        return ours_chose[module.layer_idx][0].indices.to(ranking.dtype)

    input_ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(opts.seed))
    hooks = [m.register_forward_hook(record_ours, with_kwargs=True) for n, m in ours.named_modules()
             if n.endswith(".self_attn.indexer")]  # fmt: skip
    hooks += [m.register_forward_hook(take_ours, with_kwargs=True) for n, m in peer.named_modules()
              if n.endswith(".self_attn.indexer")]  # fmt: skip
    diff = 0.0
    try:
        with torch.no_grad():
            for mode in ("mha", "absorbed"):  # a prefill's path, and a decode's (gathered latent rows)
                expected = ours(input_ids, attention_mode=mode).logits
                diff = max(diff, (expected - peer(input_ids).logits).abs().max().item())
    finally:
        for hook in hooks:
            hook.remove()
    if sorted(ours_chose) != sorted(peer_ranked) or not ours_chose:
        raise ConversionError(converted, f"--verify failed: indexers ran in layers {sorted(ours_chose)} of ours and "
                                         f"{sorted(peer_ranked)} of transformers' {export} class")  # fmt: skip
    rise, rows, differ = 0.0, 0, 0
    for layer, (selection, scores) in ours_chose.items():
        in_their_order = scores.gather(-1, peer_ranked[layer])  # [B, S, T], masked keys (-inf) last
        finite = torch.isfinite(in_their_order)
        best_before = in_their_order.cummin(-1).values  # ours never rise along their ranking, but by rounding
        rises = torch.where(finite, in_their_order - best_before, torch.zeros_like(in_their_order))
        rise = max(rise, rises.amax().item() / max(1.0, in_their_order[finite].abs().max().item()))
        num_keys = scores.shape[-1]
        ours_set = selected_keys_mask(selection.indices, num_keys) & torch.isfinite(scores)
        theirs_set = selected_keys_mask(peer_ranked[layer][..., :top_k], num_keys) & torch.isfinite(scores)
        rows += scores.shape[0] * scores.shape[1]
        differ += (ours_set != theirs_set).any(-1).sum().item()
    tolerance = opts.verify_tolerance or 1e-4 * max(1.0, expected.abs().max().item())
    print(f"verify sparse: max |logit difference| = {diff:.3e} (tolerance {tolerance:.1e}; MHA and absorbed modes) "
          f"against transformers' {export} class attending to our top-{top_k} of {seq_len} keys; its indexer's "
          f"ranking agrees with our index scores within {rise:.1e} (relative), its top-{top_k} differing from ours by "
          f"ties in {differ} of {rows} query rows")  # fmt: skip
    if not rise <= 1e-4:
        raise ConversionError(converted, f"--verify failed: transformers' {export} indexer ranks keys in an order our "
                                         f"index scores disagree with (by {rise:.1e}, relative): the indexers "
                                         "differ")  # fmt: skip
    if not diff <= tolerance:
        raise ConversionError(converted, f"--verify failed: sparse max logit difference {diff:.3e} > {tolerance:.1e}")
    return diff


def _peer_model(converted: Path, config: MlaDsaConfig, export: str, index_topk: int, exported: bool
                ) -> torch.nn.Module:  # fmt: skip
    """transformers' class for `export` with the output's weights, float32: an export is that format already; ours is
    read as the export would write it."""
    if exported:
        return _exported_model(converted, export, index_topk)
    import transformers
    from safetensors.torch import load_file

    from ..loading import weight_files

    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[transformers.CONFIG_MAPPING[export]]
    peer_config = transformers.CONFIG_MAPPING[export].from_dict({**export_config(config, export),
                                                                  "index_topk": index_topk})  # fmt: skip
    permute = permutes_indexer_rope(config, export)
    state = {}
    for shard in sorted(set(weight_files(converted).values())):  # not the conversion's own files beside them
        for name, tensor in load_file(converted / shard).items():
            tensor = permute_indexer_rope(name, tensor, config, export == "glm_moe_dsa") if permute else tensor
            state[name] = tensor.float()
    model, info = model_class.from_pretrained(None, config=peer_config, state_dict=state, dtype=torch.float32,
                                              output_loading_info=True)  # fmt: skip
    _check_loaded(converted, model_class, info)
    return model.eval()


def _exported_model(converted: Path, export: str, index_topk: int = 1 << 30) -> torch.nn.Module:
    """The export through transformers' own class (by default every key selected)."""
    import transformers

    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[transformers.CONFIG_MAPPING[export]]
    model, info = model_class.from_pretrained(converted, dtype=torch.float32, index_topk=index_topk,
                                              output_loading_info=True)  # fmt: skip
    _check_loaded(converted, model_class, info)
    return model.eval()


def _check_loaded(converted: Path, model_class: type, info: dict) -> None:
    problems = {kind: sorted(names)[:3] for kind, names in info.items() if names}
    if problems:
        raise ConversionError(converted, f"transformers' {model_class.__name__} does not load the output: {problems}")


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
    layers = source.config.get("num_hidden_layers")
    for name, info in source.tensors.items():
        mtp = re.match(r"model\.layers\.(\d+)\.", name)  # multi-token-prediction layers: dropped by the conversion
        if mtp and layers is not None and int(mtp.group(1)) >= layers:
            continue
        if not name.endswith(SCALE_SUFFIX):
            dtype = output_dtype(info, opts, dtype_of_model)
            state[name] = source.read(name, fp8_dtype=dtype).to(dtype).float()
    source.close()
    model, info = model_class.from_pretrained(None, config=peer_config, state_dict=state, dtype=torch.float32,
                                              output_loading_info=True)  # fmt: skip
    if info["missing_keys"]:
        raise ConversionError("verify", f"reference model is missing {sorted(info['missing_keys'])[:3]}")
    return model.eval()


__all__ = ["verify_logits", "verify_sparse"]
