"""`python -m mla_dsa ...` (also `accelerate launch -m mla_dsa train-indexer ...`)."""

import sys

from .cli import main

sys.exit(main())
