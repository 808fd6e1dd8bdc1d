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
