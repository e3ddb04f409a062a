"""Real text that is on every machine: the Python standard library's own source, read as bytes.

Files are split into train and held-out sets by a hash of their relative path, so the split is the same on every
machine and every Python version that has the file. A byte-level tokenizer (256 ids, id = byte value) is provided as a
real `PreTrainedTokenizerFast`, saved with the checkpoints that use it.
"""

import ast
import hashlib
import os
import sysconfig
import textwrap
from pathlib import Path

import torch

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3  # NUL, STX, ETX: bytes that do not occur in Python source
HELD_OUT_PERCENT = 10
_FILES_PER_CALL = 64
_NOT_STDLIB = {"site-packages", "test", "idlelib/idle_test", "lib2to3/tests"}  # directories, relative


def stdlib_files(split: str = "train", root: Path | None = None) -> list[Path]:
    """Sorted `.py` files of the running interpreter's standard library (tests and site-packages excluded)."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        # pruned, not filtered: site-packages (torch, transformers, ...) holds far more files than the library
        subdirectories[:] = [name for name in subdirectories if (Path(directory) / name).relative_to(root).as_posix()
                             not in _NOT_STDLIB]  # fmt: skip
        for path in (Path(directory) / name for name in names if name.endswith(".py")):
            bucket = int(hashlib.sha256(path.relative_to(root).as_posix().encode()).hexdigest(), 16) % 100
            if (bucket < HELD_OUT_PERCENT) == (split == "held_out"):
                files.append(path)
    return sorted(files)


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
    """Token ids [N] of user text files, each followed by the tokenizer's EOS when it has one (the first
    `max_tokens`). Files are tokenized a group at a time, one call per group (a fast tokenizer's batch: 0.6x the time
    of a call per file on the standard library), each file on its own; groups grow from one file to
    `_FILES_PER_CALL`, so a few thousand tokens never tokenize dozens of files."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pieces, total, first, group = [], 0, 0, 1
    while first < len(paths):
        texts = [Path(path).read_text(errors="replace") for path in paths[first : first + group]]
        first, group = first + group, min(2 * group, _FILES_PER_CALL)
        for ids in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]:
            pieces.append(torch.tensor(ids + eos, dtype=torch.long))
            total += len(pieces[-1])
            if max_tokens is not None and total >= max_tokens:
                return torch.cat(pieces)[:max_tokens]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


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


def documented_functions(path: Path, min_lines: int = 3, max_lines: int = 40) -> list[tuple[str, str]]:
    """(request, code) pairs from one Python file: every public function or method with a docstring, as a request
    built from its signature and the docstring's first paragraph, and its source (dedented)."""
    text = Path(path).read_text(errors="replace")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines()
    nodes = [(None, node) for node in tree.body]
    nodes += [(cls.name, node) for cls in tree.body if isinstance(cls, ast.ClassDef) for node in cls.body]
    pairs = []
    for owner, node in nodes:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or not min_lines <= node.end_lineno - node.lineno <= max_lines:
            continue
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        code = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
        kind = f"method of the class `{owner}`" if owner else "function"
        summary = textwrap.shorten(docstring.split("\n\n")[0], 400, placeholder=" ...")
        pairs.append((f"Write a Python {kind} `{node.name}({ast.unparse(node.args)})`: {summary}", code))
    return pairs


def chat_code_files(files: list[Path], tokenizer, out_dir: str | Path) -> list[str]:
    """Instruction data for healing a chat model on code without unlearning the chat: for each source file, its
    `documented_functions` as user requests answered with a ```python block, rendered with the tokenizer's own chat
    template (its special tokens as text, which the tokenizer maps back to their ids) into OUT_DIR/NAME.txt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(files):
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": request},
                                                {"role": "assistant", "content": f"```python\n{code}\n```"}],
                                               tokenize=False)
                 for request, code in documented_functions(path)]  # fmt: skip
        if chats:
            target = out_dir / f"{index:04d}-{Path(path).stem}.txt"
            target.write_text("".join(chats))
            written.append(str(target))
    return written


def load_tokenizer(path: str | Path, use: str, trust_remote_code: bool = False):
    """The tokenizer saved in checkpoint `path`, or a `ConversionError` in one line naming the directory, what
    needs it (`use`) and transformers' reason (a directory without tokenizer files raised a traceback about
    sentencepiece). A tokenizer of its own code (Kimi-K2's, Moonlight's) loads only with `trust_remote_code`: asked
    explicitly, transformers refuses without prompting mid-command."""
    from transformers import AutoTokenizer, PreTrainedConfig

    from .conversion.source import ConversionError, tokenizer_code_files

    try:
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except AttributeError:  # transformers reading a config.json it has no class for (Kimi-K2's kimi_k2 with YaRN)
            config = PreTrainedConfig()  # tokenizer_config.json decides
            return AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers' reasons vary: one line, whichever it is
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        if Path(path).is_dir() and not any(Path(path).glob("tokenizer*")) and not (Path(path) / "vocab.json").exists():
            reason = "the directory holds no tokenizer files"
        if not trust_remote_code and Path(path).is_dir() and tokenizer_code_files(Path(path)):
            raise ConversionError(path, f"{use} reads the text with this checkpoint's tokenizer, which is code of its "
                                        f"own ({reason}): pass --trust-remote-code to run it") from None  # fmt: skip
        raise ConversionError(path, f"{use} reads the text with this checkpoint's tokenizer, which cannot be loaded "
                                    f"({reason}): save the model's tokenizer files (tokenizer.json, "
                                    "tokenizer_config.json) into it") from None  # fmt: skip


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
    "chat_code_files",
    "documented_functions",
    "fixed_windows",
    "load_tokenizer",
    "random_windows",
    "read_corpus",
    "stdlib_files",
    "text_files_corpus",
]
