"""Shared pytest fixtures."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


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
    """Small tensors: one intra-op thread is ~7x faster than two on this shared 2-core machine (measured).

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
