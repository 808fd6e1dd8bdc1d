"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations


def cpu_model() -> str:
    """The CPU's model name (the one the C++ build cache is keyed by)."""
    from deltasparse.engine.kernels.cpp import cpu_name

    return cpu_name()
