"""The DSA choices of one forward: defaults from the config, overridden by the call's arguments.

The config holds only what is persisted with a checkpoint; what a caller picks for one call - dense or sparse
attention, another k, the attention mode, an indexer training stage - is an argument of `forward` / `generate`
(`model.generate(ids, index_topk=512)`), never a config field flipped at run time.
"""

from dataclasses import dataclass

from .configuration_mla_dsa import ATTENTION_MODES

INDEXER_STAGES = (None, "dense", "sparse")


@dataclass(frozen=True)
class DsaSettings:
    """use_sparse_attention: attend only to the `index_topk` keys the indexer selects (no effect where the context
    is no longer than k). attention_mode: "auto" | "mha" | "absorbed" (see `attention_mla_dsa.py`). indexer_stage:
    None, or the training stage whose indexer loss the forward also computes - "dense" (warm-up: KL to the dense
    attention over all keys; attention dense unless `use_sparse_attention=True` is passed) or "sparse" (KL over the
    selected keys; attention sparse unless `use_sparse_attention=False` is passed)."""

    use_sparse_attention: bool
    index_topk: int
    attention_mode: str
    indexer_stage: str | None

    @classmethod
    def resolve(
        cls,
        config,
        use_sparse_attention: bool | None = None,
        index_topk: int | None = None,
        attention_mode: str | None = None,
        indexer_stage: str | None = None,
    ) -> "DsaSettings":
        if isinstance(getattr(config, "indexer_loss", None), str):  # the switch of payloads before 0.4.0
            raise ValueError("config.indexer_loss is no longer read: pass indexer_stage=... to the forward instead")
        if indexer_stage not in INDEXER_STAGES:
            raise ValueError(f"indexer_stage must be one of {INDEXER_STAGES}, got {indexer_stage!r}")
        if use_sparse_attention is None:
            use_sparse_attention = config.use_sparse_attention if indexer_stage is None else indexer_stage == "sparse"
        index_topk = config.index_topk if index_topk is None else index_topk
        if isinstance(index_topk, bool) or not isinstance(index_topk, int) or index_topk <= 0:
            raise ValueError(f"index_topk must be a positive integer, got {index_topk!r}")
        attention_mode = config.attention_mode if attention_mode is None else attention_mode
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
        return cls(bool(use_sparse_attention), index_topk, attention_mode, indexer_stage)


__all__ = ["DsaSettings", "INDEXER_STAGES"]
