"""Exact streaming delta inference (DESIGN.md §4): ``DeltaEngine`` and its kernels."""

from .engine import DeltaEngine
from .kernels import BACKENDS, Backend, get_backend, has_triton
from .plan import UnsupportedOpError
from .stats import EngineStats, FallbackWarning

__all__ = [
    "BACKENDS",
    "Backend",
    "DeltaEngine",
    "EngineStats",
    "FallbackWarning",
    "UnsupportedOpError",
    "get_backend",
    "has_triton",
]
