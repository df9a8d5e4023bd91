"""Shared pytest fixtures, found by pytest in every test folder. Plain helpers that test files import are in
``tests/support.py``: a conftest module is pytest's, and no test imports it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import MULTI_MODEL_STYLES, tiny_model_file


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same random state (torch, NumPy, Python), whichever tests ran before it: an
    unseeded ``torch.rand`` in one test must not make it pass or fail by the order or selection of the suite."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on small tensors: starting and synchronising threads costs more than such small
    ops themselves, the more so when other processes share the CPU (README, "Using the environment", has a figure).

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def multi_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-style model file (``MULTI_MODEL_STYLES``; distinct style tables), written once per module, for
    the tests of what stylize and the reports do with several styles."""
    path = tmp_path_factory.mktemp("multi") / "model.pth"
    return tiny_model_file(path, {"styles": MULTI_MODEL_STYLES}, residual_blocks=2, num_styles=3)
