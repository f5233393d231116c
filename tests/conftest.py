import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test captures its models afresh: the same HF forward code compiled for
    many model instances would otherwise count against dynamo's recompile limit."""
    from slimfit_fx import capture

    capture.reset_dynamo()
    yield
