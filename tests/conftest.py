import importlib.util
import os
import tempfile

# Under pytest-xdist each worker copies remote code into a modules cache of its own: two workers loading checkpoints
# of the same folder name (tmp_path_factory's) would otherwise write the same files in transformers' one cache at once.
# Set before transformers is imported, which reads it then.
if "PYTEST_XDIST_WORKER" in os.environ:
    _modules = os.path.join(tempfile.gettempdir(), f"mla-dsa-tests-hf-modules-{os.environ['PYTEST_XDIST_WORKER']}")
    os.environ.setdefault("HF_MODULES_CACHE", _modules)

import pytest
import torch
import transformers

# transformers 5.25 loads every model with hub kernels unless told otherwise and then needs the `kernels` package;
# where it is absent, the peers (transformers' own classes) load as on 5.14-5.24. Ours need no variable
# (mla_dsa.loading.loading_kwargs), which test_compat checks with it unset.
if importlib.util.find_spec("kernels") is None:
    os.environ.setdefault("USE_HUB_KERNELS", "0")

# Under pytest-xdist (`pytest -n 2`, the README's command) each worker takes its share of the cores, and so do the
# processes it starts: two workers each running torch's two threads on 2 cores wait on each other's descheduled
# threads. (An explicit OMP_NUM_THREADS is kept.)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture(scope="session")
def v32_checkpoint(tmp_path_factory):
    """A tiny DeepSeek-V3.2 checkpoint written by transformers' own class (DSA selects 5 keys): read-only."""
    from peers import save_peer

    directory = tmp_path_factory.mktemp("v32_session")
    save_peer("deepseek_v32", directory, index_topk=5)
    return directory


@pytest.fixture(scope="session")
def v32_topk4(tmp_path_factory):
    """A tiny DeepSeek-V3.2 checkpoint written by transformers' own class (DSA selects 4 keys): read-only."""
    from peers import save_peer

    directory = tmp_path_factory.mktemp("v32_topk4_session")
    save_peer("deepseek_v32", directory, index_topk=4)
    return directory


@pytest.fixture(scope="session")
def ours_v32_topk4(v32_topk4, tmp_path_factory):
    """The same weights as our checkpoint (written by our `save_pretrained`, payload beside them): read-only."""
    import mla_dsa

    directory = tmp_path_factory.mktemp("ours_v32_topk4_session") / "checkpoint"
    mla_dsa.MlaDsaForCausalLM.from_pretrained(v32_topk4).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def byte_dsa(tmp_path_factory):
    """A byte-level DSA checkpoint (256-token vocabulary, top-4 selection) that text files can train: read-only."""
    from peers import save_byte_level_dsa

    root = tmp_path_factory.mktemp("bytes_session")
    return save_byte_level_dsa(root / "dense", root / "dsa", index_topk=4)
