"""A name → constructor registry of per-frame models (timm-style)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["create", "list_models", "register_model", "uses_tokens"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_TOKEN_MODELS: set[str] = set()


def register_model(name: str, *, tokens: bool = False):
    """Register a constructor; ``tokens=True`` for transformers (token gates, not pixel ones)."""

    def deco(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        if tokens:
            _TOKEN_MODELS.add(name)
        return fn

    return deco


def uses_tokens(name: str) -> bool:
    """Whether the registered model is a transformer (``DeltaConfig(kind="token")``)."""
    return name in _TOKEN_MODELS


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``create("mobilenet_v1", num_classes=101)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)
