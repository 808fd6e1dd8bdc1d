"""Per-frame models and their name registry (``ds.models.create(name, **kw)``)."""

from .convnet import ConvNet, convnet, convnet_pw
from .dsconvnet import DSConvNet, dsconvnet
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .neck import YoloNeck
from .registry import create, list_models, register_model, uses_tokens
from .tv import (
    convnext_tiny,
    efficientnet_b0,
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
    regnet_y_400mf,
    resnet18,
    resnet50,
)
from .vit import VisionTransformer, vit_tiny

__all__ = [
    "ConvNet",
    "DSConvNet",
    "convnet",
    "convnet_pw",
    "dsconvnet",
    "MobileNetV1",
    "create",
    "list_models",
    "mobilenet_v1",
    "mobilenet_v2",
    "register_model",
    "resnet18",
    "resnet50",
    "uses_tokens",
    "VisionTransformer",
    "YoloNeck",
    "convnext_tiny",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_y_400mf",
    "vit_tiny",
]
