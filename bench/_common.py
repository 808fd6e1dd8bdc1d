"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations

import torch
from torch import nn


def cpu_model() -> str:
    """The CPU's model name (the one the C++ build cache is keyed by)."""
    from deltasparse.engine.kernels.cpp import cpu_name

    return cpu_name()


def graphed_model(model: nn.Module, example: torch.Tensor):
    """``fn(x)`` replaying a CUDA graph of ``model`` on a static input copy."""
    static_x = example.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        static_y = model(static_x)

    def fn(x):
        static_x.copy_(x)
        g.replay()
        return static_y

    return fn
