"""Per-frame models and their name registry (``ds.models.create(name, **kw)``)."""

from .convnet import ConvNet, convnet, convnet_pw
from .dsconvnet import DSConvNet, dsconvnet
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .registry import create, list_models, register_model, uses_tokens
from .tv import mobilenet_v2, resnet18, resnet50
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
    "vit_tiny",
]
