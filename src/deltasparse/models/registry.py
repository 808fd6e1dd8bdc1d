"""A name → constructor registry of per-frame models (timm-style)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["create", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``create("mobilenet_v1", num_classes=101)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)
