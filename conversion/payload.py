"""The payload: the files of `modeling/` that every checkpoint carries for `trust_remote_code`.

Defined once, by the rule `save_pretrained` follows (transformers' `custom_object_save`): the files `auto_map` names
and, recursively, every sibling they import relatively. The converter and `upgrade-code` copy exactly these.
"""

import ast
from pathlib import Path

from ..modeling import configuration_mla_dsa
from ..modeling.configuration_mla_dsa import AUTO_MAP

PAYLOAD_DIR = Path(configuration_mla_dsa.__file__).parent


def payload_files() -> list[Path]:
    """The installed payload's files, sorted by name."""
    todo = sorted({f"{target.split('.')[0]}.py" for target in AUTO_MAP.values()})
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_relative_imports(PAYLOAD_DIR / name))
    return [PAYLOAD_DIR / name for name in sorted(seen)]


def _relative_imports(path: Path) -> list[str]:
    """File names of the siblings `path` imports as `from .sibling import X`."""
    tree = ast.parse(path.read_text())
    return [f"{node.module}.py" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]


__all__ = ["PAYLOAD_DIR", "payload_files"]
