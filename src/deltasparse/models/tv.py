"""torchvision models (ResNet-18/50, MobileNet v2/v3, EfficientNet-B0, RegNetY-400MF,
ConvNeXt-Tiny), available with the ``vision`` extra."""

from __future__ import annotations

from torch import nn

from .registry import register_model

__all__ = ["convnext_tiny", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_large",
           "mobilenet_v3_small", "regnet_y_400mf", "resnet18", "resnet50"]


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


@register_model("mobilenet_v3_small")
def mobilenet_v3_small(num_classes: int = 1000, **kwargs) -> nn.Module:
    """Hardswish, squeeze-excitation with a Hardsigmoid scale."""
    return _tv("mobilenet_v3_small", num_classes, **kwargs)


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(num_classes: int = 1000, **kwargs) -> nn.Module:
    return _tv("mobilenet_v3_large", num_classes, **kwargs)


@register_model("efficientnet_b0")
def efficientnet_b0(num_classes: int = 1000, **kwargs) -> nn.Module:
    """SiLU, squeeze-excitation with a Sigmoid scale, stochastic depth."""
    return _tv("efficientnet_b0", num_classes, **kwargs)


@register_model("regnet_y_400mf")
def regnet_y_400mf(num_classes: int = 1000, **kwargs) -> nn.Module:
    """Grouped 3x3 convs, squeeze-excitation, residual adds."""
    return _tv("regnet_y_400mf", num_classes, **kwargs)


@register_model("convnext_tiny")
def convnext_tiny(num_classes: int = 1000, **kwargs) -> nn.Module:
    """7x7 depthwise convs, channels-last LayerNorm + GELU MLP, layer scale, LayerNorm2d."""
    return _tv("convnext_tiny", num_classes, **kwargs)
