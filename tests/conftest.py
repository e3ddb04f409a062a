import sys
from pathlib import Path

import pytest
import transformers

# Test helpers (peers.py) import by name from this folder.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
