"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations

from deltasparse.benchmark import cuda_graphed


def cpu_model() -> str:
    """The CPU's model name (the one the C++ build cache is keyed by)."""
    from deltasparse.engine.kernels.cpp import cpu_name

    return cpu_name()


# ``fn(x)`` replaying a CUDA graph of a model on a static input copy (the library's helper)
graphed_model = cuda_graphed
