"""torchvision models (ResNet-18/50, MobileNet v2), available with the ``vision`` extra."""

from __future__ import annotations

from torch import nn

from .registry import register_model

__all__ = ["mobilenet_v2", "resnet18", "resnet50"]


def _torchvision():
    try:
        import torchvision
    except Exception as exc:  # ImportError, or a broken install (operator not registered)
        raise ImportError(
            "this model needs torchvision, which is not installed (or fails to import: "
            f"{exc}); install the extra with: pip install 'deltasparse[vision]'"
        ) from exc
    return torchvision


def _tv(name: str, num_classes: int, **kwargs) -> nn.Module:
    # weights=None: no download at run time; load your own state_dict if you have one.
    return getattr(_torchvision().models, name)(weights=None, num_classes=num_classes, **kwargs)


@register_model("resnet18")
def resnet18(num_classes: int = 1000, **kwargs) -> nn.Module:
    return _tv("resnet18", num_classes, **kwargs)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, **kwargs) -> nn.Module:
    return _tv("resnet50", num_classes, **kwargs)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, **kwargs) -> nn.Module:
    return _tv("mobilenet_v2", num_classes, width_mult=width_mult, **kwargs)
