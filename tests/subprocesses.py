"""What a command run in its own process printed, less what is not ours."""

import re

# torch's logging format ("W1206 06:30:35.037000 29328 .v/lib/python3.11/site-packages/torch/utils/_pytree.py:630]
# ..."), from code under site-packages: records other installed packages cause while they import (torchao 0.18 on
# torch 2.14 logs two deprecation warnings when transformers imports it)
_THIRD_PARTY_LOG = re.compile(r"[WIE]\d{4} [\d:. ]+ \d+ \S*site-packages/")


def own_stderr(stderr: str) -> str:
    """`stderr` without torch's log records of installed packages."""
    return "\n".join(line for line in stderr.splitlines() if not _THIRD_PARTY_LOG.match(line))
