import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist runs the suite in one worker process per core (pyproject's
# addopts: `-n auto`). Each worker gets its share of the cores as intra-op
# threads, so workers do not oversubscribe the machine (OpenMP threads spin on
# a busy core). Set before torch starts its thread pool; children (the CLI's and
# the benchmarks' subprocesses, distributed ranks) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test captures its models afresh: the same HF forward code compiled for
    many model instances would otherwise count against dynamo's recompile limit."""
    from slimfit_fx import capture

    capture.reset_dynamo()
    yield
