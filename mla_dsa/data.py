"""Real text that is on every machine: the Python standard library's own source, read as bytes.

Files are split into train and held-out sets by a hash of their relative path, so the split is the same on every
machine and every Python version that has the file. A byte-level tokenizer (256 ids, id = byte value) is provided as a
real `PreTrainedTokenizerFast`, saved with the checkpoints that use it.
"""

import hashlib
import sysconfig
from pathlib import Path

import torch

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3  # NUL, STX, ETX: bytes that do not occur in Python source
HELD_OUT_PERCENT = 10


def stdlib_files(split: str = "train", root: Path | None = None) -> list[Path]:
    """Sorted `.py` files of the running interpreter's standard library (tests and site-packages excluded)."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("site-packages/", "test/", "idlelib/idle_test/", "lib2to3/tests/")):
            continue
        bucket = int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100
        if (bucket < HELD_OUT_PERCENT) == (split == "held_out"):
            files.append(path)
    return files


def read_corpus(files: list[Path], max_bytes: int | None = None) -> torch.Tensor:
    """The files' bytes, each followed by EOS, as one uint8 tensor (the first `max_bytes` of it)."""
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes().replace(b"\x00", b"") + bytes([EOS_ID])
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    joined = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


def text_files_corpus(paths: list[str | Path], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [N] of user text files, each followed by the tokenizer's EOS when it has one."""
    ids: list[int] = []
    for path in paths:
        ids.extend(tokenizer(Path(path).read_text(errors="replace"), add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def random_windows(corpus: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """[batch_size, seq_len] int64 windows at random offsets."""
    if len(corpus) <= seq_len:
        raise ValueError(f"corpus of {len(corpus)} tokens is too short for windows of {seq_len}")
    starts = torch.randint(0, len(corpus) - seq_len, (batch_size,), generator=generator)
    return torch.stack([corpus[s : s + seq_len] for s in starts.tolist()]).long()


def fixed_windows(corpus: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """[count, seq_len] windows spread evenly over the corpus: a deterministic evaluation set."""
    if len(corpus) <= seq_len:
        raise ValueError(f"corpus of {len(corpus)} tokens is too short for windows of {seq_len}")
    starts = torch.linspace(0, len(corpus) - seq_len - 1, count).long()
    return torch.stack([corpus[s : s + seq_len] for s in starts.tolist()]).long()


def byte_tokenizer():
    """A `PreTrainedTokenizerFast` whose ids are byte values (0..255): lossless for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # one printable character per byte, in GPT-2's mapping
    byte_to_char = _gpt2_byte_to_char()
    assert sorted(byte_to_char.values()) == sorted(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=byte_to_char[PAD_ID]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=byte_to_char[PAD_ID],
        bos_token=byte_to_char[BOS_ID],
        eos_token=byte_to_char[EOS_ID],
        clean_up_tokenization_spaces=False,
    )


def _gpt2_byte_to_char() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "byte_tokenizer",
    "fixed_windows",
    "random_windows",
    "read_corpus",
    "stdlib_files",
    "text_files_corpus",
]
