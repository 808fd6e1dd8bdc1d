"""A small depthwise-separable CNN for streams (the structure of MobileNet v1, three stages).

Built for delta inference (Yousefzadeh & Sifalakis, arXiv 2107.07305; DESIGN.md §4): every
spatial mixing is a cheap depthwise 3x3 conv and every channel mixing a pointwise 1x1 conv,
with a ReLU -- so a Delta Activation Layer -- between them. A changed pixel spreads to its 3x3
neighbourhood only through the depthwise conv (9 MACs per channel), and the gate after it
passes on only the neighbours whose change exceeds the step; the pointwise conv, where the
MACs are, recomputes just those pixels, as a dense GEMM over gathered rows. In a full 3x3 conv
every reached row costs ``9 * C_in * C_out`` MACs with no gate in between. The stem is a
stride-2 3x3 conv, as in MobileNet.
"""

from __future__ import annotations

from torch import nn

from .convnet import FeaturesThenClassifier
from .registry import register_model

__all__ = ["DSConvNet", "dsconvnet"]


def _cbr(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]  # fmt: skip


class DSConvNet(FeaturesThenClassifier):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3,
                 stem: int = 32, channels: tuple[int, ...] = (64, 128, 256),
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        c = max(8, int(stem * width_mult))
        layers: list[nn.Module] = _cbr(in_channels, c, 3, stride=2)
        for i, c_out in enumerate(channels):
            c_out = max(8, int(c_out * width_mult))
            layers += _cbr(c, c, 3, groups=c) + _cbr(c, c_out, 1)
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c = c_out
        self.features = nn.Sequential(*layers)
        self._head(c, num_classes, dropout)


@register_model("dsconvnet")
def dsconvnet(num_classes: int = 10, width_mult: float = 1.0, **kwargs) -> DSConvNet:
    """Stride-2 stem (32), then three depthwise-separable stages (64, 128, 256 channels x
    ``width_mult``) with max pooling between them."""
    return DSConvNet(num_classes=num_classes, width_mult=width_mult, **kwargs)
