"""The DSA choices of one forward: defaults from the config, overridden by the call's arguments.

The config holds only what is persisted with a checkpoint; what a caller picks for one call - dense or sparse
attention, another k, the attention mode - is an argument of `forward` / `generate`
(`model.generate(ids, index_topk=512)`), never a config field flipped at run time.
"""

from dataclasses import dataclass

from .configuration_mla_dsa import ATTENTION_MODES

# Where the indexer's training losses are (the model computes none): the installed package, outside every checkpoint.
TRAINING_MOVED = (
    "the indexer's training losses are computed by the mla_dsa package, not by the model: "
    "`with mla_dsa.IndexerLoss(model, stage) as indexer_loss: out = model(...)`, then `indexer_loss.kl`"
)


@dataclass(frozen=True)
class DsaSettings:
    """use_sparse_attention: attend only to the `index_topk` keys the indexer selects (no effect where the context
    is no longer than k). attention_mode: "auto" | "mha" | "absorbed" (see `attention_mla_dsa.py`)."""

    use_sparse_attention: bool
    index_topk: int
    attention_mode: str

    @classmethod
    def resolve(
        cls,
        config,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
    ) -> "DsaSettings":
        if isinstance(getattr(config, "indexer_loss", None), str):  # the switch of payloads before 0.4.0
            raise ValueError(f"config.indexer_loss is no longer read: {TRAINING_MOVED}")
        if use_sparse_attention is None:
            use_sparse_attention = config.use_sparse_attention
        index_topk = config.index_topk if index_topk is None else index_topk
        if isinstance(index_topk, bool) or not isinstance(index_topk, int) or index_topk <= 0:
            raise ValueError(f"index_topk must be a positive integer, got {index_topk!r}")
        attention_mode = config.attention_mode if attention_mode is None else attention_mode
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
        return cls(bool(use_sparse_attention), index_topk, attention_mode)


__all__ = ["DsaSettings", "TRAINING_MOVED"]
