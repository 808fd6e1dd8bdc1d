"""Fixtures of the engine tests."""

import pytest
from engine_helpers import ALWAYS_SPARSE


@pytest.fixture(params=["default", "always_sparse"])
def crossover(request):
    return None if request.param == "default" else ALWAYS_SPARSE


def _backends():
    from deltasparse.engine.kernels import CppBackend

    return ["torch", "cpp"] if CppBackend.available() else ["torch"]


@pytest.fixture(params=_backends())
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads stall each other
    whenever another process takes a core, which made timings (not results) erratic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
