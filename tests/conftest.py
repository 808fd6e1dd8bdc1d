"""Shared test setup: every test starts from the same random state, on one intra-op thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads stall each other
    whenever another process takes a core (measured: a MobileNet stream 20x slower under
    load), which made timings erratic and the suite slow. Results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
