"""Kernels of the delta engine: a backend ladder ``reference`` -> ``torch`` -> ``triton``."""

from __future__ import annotations

import torch

from .base import OP_KINDS, Backend
from .geometry import GeometryCache, WindowGeom
from .reference import ReferenceBackend
from .specs import ConvSpec, LinearSpec, PoolSpec
from .torch_ops import CppBackend, TorchBackend
from .triton_gpu import TritonBackend, has_triton

__all__ = [
    "BACKENDS",
    "OP_KINDS",
    "Backend",
    "ConvSpec",
    "CppBackend",
    "GeometryCache",
    "LinearSpec",
    "PoolSpec",
    "ReferenceBackend",
    "TorchBackend",
    "TritonBackend",
    "WindowGeom",
    "get_backend",
    "has_triton",
]

BACKENDS: dict[str, type[Backend]] = {
    "reference": ReferenceBackend,
    "torch": TorchBackend,
    "cpp": CppBackend,
    "triton": TritonBackend,
}


def get_backend(name: str | Backend, device: torch.device | str = "cpu") -> Backend:
    """Resolve a backend name.

    ``auto``: triton on CUDA when available; on CPU the fused C++ op when it builds; else torch.
    """
    if isinstance(name, Backend):
        return name
    device = torch.device(device)
    if name == "auto":
        if TritonBackend.available(device):
            name = "triton"
        elif CppBackend.available(device):
            name = "cpp"
        else:
            name = "torch"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown DeltaEngine backend {name!r}; choose one of "
            f"{', '.join(['auto', *BACKENDS])}"
        )
    return BACKENDS[name](device)
