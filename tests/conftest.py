import pytest
import torch
import transformers


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
