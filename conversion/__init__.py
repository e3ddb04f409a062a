"""Conversion of dense MLA checkpoints into DSA checkpoints."""

from pathlib import Path


class ConversionError(Exception):
    """A problem with the input or output, reported as one line naming the file."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem
