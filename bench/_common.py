"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations


def cpu_model() -> str:
    """The CPU's model name (the one the C++ build cache is keyed by)."""
    from deltasparse.engine.kernels.cpp import cpu_name

    return cpu_name()


def gpu_env() -> dict:
    """The GPU and the torch, CUDA and triton versions, for a GPU benchmark's result."""
    import torch

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda}  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env
