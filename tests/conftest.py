import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Corpora and measured GEMM choices go to a session directory, not the user's cache."""
    if "GRIFFINLM_CACHE" not in os.environ:
        os.environ["GRIFFINLM_CACHE"] = str(tmp_path_factory.mktemp("griffinlm-cache"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
