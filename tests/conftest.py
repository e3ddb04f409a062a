import importlib.util
import os

import pytest
import torch
import transformers

# transformers 5.25 loads every model with hub kernels unless told otherwise and then needs the `kernels` package;
# where it is absent, the peers (transformers' own classes) load as on 5.14-5.24. Ours need no variable
# (compat_mla_dsa.loading_kwargs), which test_compat checks with it unset.
if importlib.util.find_spec("kernels") is None:
    os.environ.setdefault("USE_HUB_KERNELS", "0")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: intra-op threads only add synchronisation, which costs seconds per test on a
    loaded 2-core machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
