"""`--indexer-init calibrate`: fit each grafted indexer to its layer's attention on a few thousand tokens of text
before it is written, so the converted model selects well before any training.

1. Closed form: the indexer starts from `svd` (`indexer_init.py`), correlated with the layer's attention logits.
2. Short fit: SRC runs densely on the calibration windows one layer at a time, exactly as the source model computes
   them; each layer's head-summed attention p_t is recorded and the layer's indexer (only it) is fitted with Adam to
   the dense warm-up's objective, KL(p_t || softmax(I_t)) over every causal key, on the layer's own inputs. A full
   layer whose selection shared layers reuse (`indexer_types`) is fitted to all of their attentions (the sum of their
   KLs, as in training).

Streaming: one decoder layer is in memory at a time, in float32 (built on the meta device, filled from SRC's tensors),
and of its routed experts only the one running; beside it the calibration activations [windows, L, hidden] and one
layer group's attention targets [windows, L, L].
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..indexer_loss import IndexScorer, kl_to_target
from ..modeling.configuration_mla_dsa import MlaDsaConfig
from ..modeling.modeling_mla_dsa import (
    FUSED_EXPERTS,
    DsaSettings,
    MlaDsaDecoderLayer,
    MlaDsaExperts,
    MlaDsaRotaryEmbedding,
    VisibleKeys,
)
from .indexer_init import init_indexer
from .source import ConversionError, SourceCheckpoint

# The fit's per-head index scores [windows, queries, index heads, L] are built a block of queries at a time, within
# this many elements (256 MiB of float32); when there is more than one block, each runs under activation checkpointing.
_FIT_BLOCK_ELEMENTS = 1 << 26
# Blocks a window's queries are scored in at least, each against the keys before its end (the windows are causal).
_FIT_CAUSAL_BLOCKS = 4


@dataclass
class CalibrationOptions:
    data: list[str]  # text files, tokenized with SRC's tokenizer
    tokens: int = 4096
    seq_len: int = 512  # capped at SRC's max_position_embeddings
    steps: int = 100  # Adam steps per layer, full batch, cosine-decayed from `lr`
    lr: float = 1e-2
    trust_remote_code: bool = False  # the tokenizer may run the code it ships

    @classmethod
    def of(cls, opts) -> "CalibrationOptions":
        """The calibration settings of a conversion's `ConvertOptions`."""
        return cls(opts.calibration_data, opts.calibration_tokens, opts.calibration_seq_len, opts.calibration_steps,
                   opts.calibration_lr, opts.trust_remote_code)  # fmt: skip


def calibrate_indexers(
    source: SourceCheckpoint, config: MlaDsaConfig, opts: CalibrationOptions, seed: int, progress: bool = True,
    fitted_before: dict[int, tuple[dict[str, torch.Tensor], dict]] | None = None, on_fitted=None,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:  # fmt: skip
    """Float32 indexer tensors of every layer that has an indexer, by layer and suffix (as `init_indexer`), and a
    report (deterministic, kept in DST): tokens, windows, the fit's settings, and each fitted layer's KL before and
    after the fit. `fitted_before`: layers an interrupted run fitted, (tensors, report) by layer, not fitted again
    (every layer still runs densely: the next one's inputs); `on_fitted(layer, tensors, report)` is called as each
    fit ends."""
    fitted_before = fitted_before or {}
    windows = calibration_windows(source, config, opts)  # [N, L]
    visible = VisibleKeys(0, windows.shape[1], None, windows.device, None)
    fitted = {}
    report = {"tokens": int(windows.numel()), "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
              "steps": opts.steps, "lr": opts.lr, "layers": {}}  # fmt: skip
    pending: _Pending | None = None  # the last full layer: fitted once every layer that shares its selection ran
    # In fit steps: each layer's dense pass counts one, each full layer's fit `steps` (the fits are most of the time,
    # and the last one runs after every pass: a bar of passes read 100 % for the whole of it).
    full_layers = sum(not config.is_shared_indexer_layer(layer) for layer in range(config.num_hidden_layers))
    bar = tqdm(total=config.num_hidden_layers + full_layers * opts.steps, desc="calibrating indexers", unit="step",
               disable=not progress)  # fmt: skip

    def fit(group: _Pending) -> None:
        if group.layer in fitted_before:
            fitted[group.layer], report["layers"][group.layer] = fitted_before[group.layer]
            bar.update(opts.steps)
            return
        bar.set_postfix_str(f"fitting layer {group.layer}'s indexer", refresh=False)
        fitted[group.layer], report["layers"][group.layer] = group.fit(opts, visible, on_step=lambda: bar.update(1))
        if on_fitted is not None:
            on_fitted(group.layer, fitted[group.layer], report["layers"][group.layer])

    for layer_pass in dense_layer_passes(source, config, windows, seed):
        if layer_pass.indexer is not None:
            if pending is not None:
                fit(pending)
            pending = _Pending(layer_pass, [])
        if pending is not None:
            pending.targets.append(layer_pass.attention)
        bar.set_postfix_str(f"layer {layer_pass.layer} run densely", refresh=False)
        bar.update(1)
    if pending is not None:
        fit(pending)
    bar.close()
    return fitted, report


@dataclass
class LayerPass:
    """One layer of SRC run densely on the calibration windows [N, L]."""

    layer: int
    indexer: torch.nn.Module | None  # its `svd`-initialised indexer (float32), None for a shared layer
    attn_input: torch.Tensor  # [N, L, hidden] the attention's input (after input_layernorm)
    query_latent: torch.Tensor  # [N, L, q_lora_rank] c_Q, the indexer's query input (the hidden state without q-LoRA)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin [1, L, dr]
    attention: torch.Tensor  # [N, L, L] the head-summed attention, L1-normalised per query
    output: torch.Tensor  # [N, L, hidden] the layer's output


def dense_layer_passes(source: SourceCheckpoint, config: MlaDsaConfig, windows: torch.Tensor, seed: int = 0
                       ) -> Iterator[LayerPass]:  # fmt: skip
    """SRC's layers one at a time on `windows` [N, L], in float32, dense attention: each layer is built on the meta
    device, filled from SRC's tensors, run one window at a time, and dropped before the next."""
    # A layer outside a model is given no experts implementation: run the experts as transformers' eager loop.
    config = MlaDsaConfig.from_dict(config.to_dict(), experts_implementation="eager")
    hidden = source.read("model.embed_tokens.weight", torch.float32).float()[windows]  # [N, L, hidden]
    position_embeddings = MlaDsaRotaryEmbedding(config)(hidden[:1], torch.arange(windows.shape[1])[None])
    settings = DsaSettings.resolve(config, use_sparse_attention=False)
    for layer_idx in range(config.num_hidden_layers):
        layer = _load_layer(source, config, layer_idx, seed, torch.float32)
        layer_pass = _run_layer(layer, layer_idx, hidden, position_embeddings, settings)
        hidden = layer_pass.output
        yield layer_pass


def calibration_windows(source: SourceCheckpoint, config: MlaDsaConfig, opts: CalibrationOptions,
                        use: str = "--indexer-init calibrate") -> torch.Tensor:  # fmt: skip
    """[N, L] token ids: the first `tokens` tokens of the files, in consecutive windows of L; `use` names what reads
    them in an error."""
    from ..data import load_tokenizer, text_files_corpus

    tokenizer = load_tokenizer(source.path, use, trust_remote_code=opts.trust_remote_code)
    seq_len = min(opts.seq_len, config.max_position_embeddings)
    corpus = text_files_corpus(opts.data, tokenizer, max_tokens=max(opts.tokens, seq_len))
    if len(corpus) < seq_len:
        where = opts.data[0] if len(opts.data) == 1 else f"{len(opts.data)} calibration files"
        raise ConversionError(where, f"the calibration data has {len(corpus)} tokens, fewer than one window of "
                                     f"--calibration-seq-len {seq_len}")  # fmt: skip
    count = len(corpus) // seq_len
    return corpus[: count * seq_len].view(count, seq_len)


def _load_layer(source: SourceCheckpoint, config: MlaDsaConfig, layer_idx: int, seed: int, dtype: torch.dtype):
    """Decoder layer `layer_idx` with SRC's weights and (where it has one) an `svd`-initialised indexer; routed
    experts are read from SRC one at a time as the tokens reach them (`StreamedExperts`), never all at once."""
    with torch.device("meta"):
        layer = MlaDsaDecoderLayer(config, layer_idx)
    prefix = f"model.layers.{layer_idx}."
    if isinstance(getattr(layer.mlp, "experts", None), MlaDsaExperts):
        layer.mlp.experts = StreamedExperts(source, config, prefix + "mlp.experts.", dtype)
    indexer = {}
    if layer.self_attn.indexer is not None:
        indexer = init_indexer(config, layer_idx, "svd", seed, read=lambda name: source.read(name, torch.float32))
    state = {}
    for name, param in layer.state_dict().items():
        if name.startswith("self_attn.indexer."):
            tensor = indexer[name.removeprefix("self_attn.indexer.")]
        else:
            tensor = _read(source, prefix + name, dtype)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ConversionError(source.path, f"{prefix + name} is {list(tensor.shape)}, expected "
                                               f"{list(param.shape)}")  # fmt: skip
        state[name] = tensor.to(dtype)
    layer.load_state_dict(state, assign=True)
    return layer.eval()


def _read(source: SourceCheckpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    if name not in source.tensors:
        raise ConversionError(source.path, f"SRC has no tensor {name}")
    return source.read(name, dtype).to(dtype)


class StreamedExperts(torch.nn.Module):
    """A layer's routed experts read from SRC as needed: each expert the tokens selected is loaded (DeepSeek's
    per-expert tensors, which the converter's plan requires), run through our own `MlaDsaExperts` holding it alone
    (indices of other experts are skipped there), and dropped."""

    def __init__(self, source: SourceCheckpoint, config: MlaDsaConfig, prefix: str, dtype: torch.dtype):
        super().__init__()
        self.source, self.config, self.prefix, self.dtype = source, config, prefix, dtype

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            one = self._expert(expert)
            out += one(hidden_states, torch.where(top_k_index == expert, 0, -1), top_k_weights)
        return out

    def _expert(self, expert: int) -> MlaDsaExperts:
        with torch.device("meta"):
            one = MlaDsaExperts(self.config)
        for fused, parts in FUSED_EXPERTS.items():
            rows = [_read(self.source, f"{self.prefix}{expert}.{part}.weight", self.dtype) for part in parts]
            setattr(one, fused, torch.nn.Parameter(torch.cat(rows)[None], requires_grad=False))  # [1, rows, cols]
        return one


@torch.no_grad()
def _run_layer(layer: MlaDsaDecoderLayer, layer_idx: int, hidden: torch.Tensor, position_embeddings,
               settings: DsaSettings) -> LayerPass:  # fmt: skip
    attn_inputs, query_latents, attentions, outputs = [], [], [], []
    # the attention's probabilities [1, H, L, L], as transformers' output capture records them
    recording = layer.self_attn.register_forward_hook(lambda module, args, output: attentions.append(output[1]))
    try:
        for window in hidden.split(1):
            attn_input = layer.input_layernorm(window)
            attn_inputs.append(attn_input)
            query_latents.append(layer.self_attn._project_queries(attn_input)[0])
            outputs.append(layer(window, position_embeddings, settings, output_attentions=True))
    finally:
        recording.remove()
    attentions = [probs.mean(dim=1) for probs in attentions]  # [1, L, L]: heads summed, L1-normalised
    return LayerPass(layer_idx, layer.self_attn.indexer, torch.cat(attn_inputs), torch.cat(query_latents),
                     position_embeddings, torch.cat(attentions), torch.cat(outputs))  # fmt: skip


@dataclass
class _Pending:
    """A full layer's indexer, and the attention of each layer that uses its selection (itself, then shared ones)."""

    source: LayerPass
    targets: list[torch.Tensor]

    @property
    def layer(self) -> int:
        return self.source.layer

    def fit(self, opts: CalibrationOptions, visible: VisibleKeys, on_step=lambda: None
            ) -> tuple[dict[str, torch.Tensor], dict]:  # fmt: skip
        indexer = self.source.indexer.train()
        attn, query_latent = self.source.attn_input, self.source.query_latent
        mask = visible.mask(0, attn.shape[1]).expand(attn.shape[0], -1, -1)  # [N, L, L] causal
        optimizer = torch.optim.Adam(indexer.parameters(), lr=opts.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, opts.steps))
        kl_before = None
        for _ in range(opts.steps):
            loss = self._loss(indexer, attn, query_latent, mask)
            kl_before = loss.item() if kl_before is None else kl_before
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            on_step()
        with torch.no_grad():
            kl_after = self._loss(indexer, attn, query_latent, mask).item()
        tensors = {name: value.detach().float().clone() for name, value in indexer.state_dict().items()}
        report = {"kl_before": kl_after if kl_before is None else kl_before, "kl_after": kl_after}
        return tensors, {**report, "shared_layers": len(self.targets) - 1}

    def _loss(self, indexer, attn, query_latent, mask) -> torch.Tensor:
        """Mean over the group's layers and the queries of KL(p_t || softmax(I_t))."""
        cos, sin = self.source.position_embeddings
        keys = indexer.keys(attn, cos, sin, fp8=False)
        scorer = IndexScorer(*indexer.queries(attn, query_latent, cos, sin), keys, indexer.softmax_scale)
        windows, seq_len = attn.shape[:2]
        block = max(1, _FIT_BLOCK_ELEMENTS // (windows * indexer.n_heads * seq_len))
        checkpointed = block < seq_len  # blocks that bound memory; recomputed in backward
        # Causal windows: a block of queries scores only the keys before its end, so blocks of a quarter of the window
        # or less do 5/8 of the work of scoring every key, or less (1/2 at the limit).
        block = min(block, -(-seq_len // _FIT_CAUSAL_BLOCKS))
        total, count = 0.0, 0
        for start in range(0, seq_len, block):
            end = min(seq_len, start + block)
            targets = [target[:, start:end, :end] for target in self.targets]  # [N, chunk, end]
            args = (scorer, start, end, targets, mask[:, start:end, :end])
            kl_sum, rows = checkpoint(_chunk_kl, *args, use_reentrant=False) if checkpointed else _chunk_kl(*args)
            total, count = total + kl_sum, count + rows
        return total / count.clamp(min=1)


def _chunk_kl(scorer, start: int, end: int, targets: list[torch.Tensor], mask: torch.Tensor):
    """Summed KL of one query block's index scores to each target, and the number of (query, target) rows."""
    scores = scorer.scores(start, end, num_keys=end)  # [N, chunk, end]: the keys they see, scored once for every target
    sums, rows = zip(*(kl_to_target(target, scores, mask) for target in targets), strict=True)
    return torch.stack(sums).sum(), torch.stack(rows).sum()


__all__ = ["CalibrationOptions", "LayerPass", "calibrate_indexers", "calibration_windows", "dense_layer_passes"]
