"""What every forward of the model checks and derives from its arguments, and the one rule for what it returns.

Shapes: B batch, S new tokens, T cached + new tokens.
"""

import torch

from .settings_mla_dsa import TRAINING_MOVED


def packed_segment_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, S] index of the packed sequence each position belongs to, where position ids restart within a row (a
    DataCollatorWithFlattening batch, TRL's padding_free)."""
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # [B, S - 1]
    # All zeros for an ordinary row (the same mask as none): asking whether any row restarts would make the host wait.
    return torch.nn.functional.pad(restarts.long(), (1, 0)).cumsum(-1)


def refuse_training_arguments(kwargs: dict) -> None:
    """`indexer_stage=` (and its name before 0.4.0, `indexer_loss=`): the model no longer computes training losses."""
    for name in ("indexer_stage", "indexer_loss"):
        if name in kwargs:
            raise ValueError(f"{name}= is no longer a model argument: {TRAINING_MOVED}")


def output_flags(config, hidden_states: bool | None, attentions: bool | None) -> tuple[bool, bool]:
    """A forward's output flags: each one passed wins, else the config's (transformers' rule)."""
    return (
        config.output_hidden_states if hidden_states is None else hidden_states,
        config.output_attentions if attentions is None else attentions,
    )


def check_input_ids(input_ids: torch.Tensor) -> None:
    """Shape and dtype only: reading the values would make the host wait for the device at every step. Out-of-range
    ids are reported by `out_of_range_ids` once the embedding lookup has failed."""
    if input_ids.dim() != 2:
        raise ValueError(f"MlaDsaModel: input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"MlaDsaModel: input_ids must be an integer tensor, got {input_ids.dtype}")


def out_of_range_ids(input_ids: torch.Tensor, vocab_size: int) -> ValueError:
    """The error for token ids outside the vocabulary (raised after the lookup failed, so it may read them)."""
    return ValueError(
        f"MlaDsaModel: token ids must lie in [0, vocab_size={vocab_size}), got "
        f"[{int(input_ids.min())}, {int(input_ids.max())}]"
    )


def key_padding_mask_of(attention_mask: torch.Tensor | None, batch_size: int, num_keys: int, static: bool = False,
                        num_queries: int | None = None) -> torch.Tensor | None:  # fmt: skip
    """What the attention and the indexer mask by: None without a mask; [B, T] bool, True at real tokens, for a 2D
    mask; [B or 1, S, T] bool, True where a query may see a key, for a custom 4D mask [B or 1, 1, S, T] (transformers'
    own models take one as it is, boolean or additive with 0 where a key is seen): it then replaces causality,
    padding and packing. An all-ones mask is kept as it is: finding that out would make the host wait for the device.
    With a static cache (T its fixed size) a 2D mask of the tokens so far is padded to T: the slots past them are
    later than every query, which the causal mask hides anyway."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        expected = (num_queries, num_keys)
        if attention_mask.shape[1] != 1 or tuple(attention_mask.shape[2:]) != expected or \
                attention_mask.shape[0] not in (1, batch_size):  # fmt: skip
            raise ValueError(
                f"MlaDsaModel: a 4D attention_mask must be [batch or 1, 1, new tokens, past + new tokens] = "
                f"({batch_size}, 1, {num_queries}, {num_keys}), got shape {tuple(attention_mask.shape)}"
            )
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return visible[:, 0]
    if static and attention_mask.dim() == 2 and attention_mask.shape[0] == batch_size:
        attention_mask = padded_to_keys(attention_mask, num_keys)
    if attention_mask.dim() != 2 or attention_mask.shape != (batch_size, num_keys):
        raise ValueError(
            f"MlaDsaModel: attention_mask must be 2D [batch, past + new tokens] = ({batch_size}, {num_keys}) or a "
            f"custom 4D mask, got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def padded_to_keys(attention_mask: torch.Tensor, num_keys: int) -> torch.Tensor:
    """A 2D mask [B, t] of the tokens so far, as [B, num_keys] (a static cache's size); the added slots are False.
    A mask of that size already (what generate() passes with a static cache) is returned as it is."""
    missing = num_keys - attention_mask.shape[1]
    return torch.nn.functional.pad(attention_mask, (0, missing)) if missing > 0 else attention_mask


__all__ = [
    "check_input_ids",
    "key_padding_mask_of",
    "out_of_range_ids",
    "output_flags",
    "packed_segment_ids",
    "padded_to_keys",
    "refuse_training_arguments",
]
