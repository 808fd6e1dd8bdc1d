"""A small VGG-style CNN (conv-BN-ReLU-maxpool stages) for quick experiments and the demo.

It trains from scratch in minutes on a laptop CPU, where MobileNet v1 (the paper's model) needs
far more data and epochs at low resolution. Every ReLU is its own module, so ``convert()``
places a layer after each stage.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model

__all__ = ["ConvNet", "convnet"]


class FeaturesThenClassifier(nn.Module):
    """``features`` (set by the subclass), then global average pooling, flatten, dropout and a
    linear ``classifier``: the head the in-repo CNNs share (module names kept in checkpoints)."""

    features: nn.Sequential

    def _head(self, channels: int, num_classes: int, dropout: float) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(self.dropout(self.flatten(x)))


class ConvNet(FeaturesThenClassifier):
    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        in_channels: int = 3,
        channels: tuple[int, ...] = (24, 48, 96, 192),
        dropout: float = 0.0,
        last_kernel: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            c = max(8, int(c * width_mult))
            k = last_kernel if i == len(channels) - 1 else 3
            layers += [
                nn.Conv2d(c_in, c, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self._head(c_in, num_classes, dropout)


@register_model("convnet")
def convnet(num_classes: int = 10, width_mult: float = 1.0, **kwargs) -> ConvNet:
    """Four conv-BN-ReLU-maxpool stages (24, 48, 96, 192 channels × ``width_mult``)."""
    return ConvNet(num_classes=num_classes, width_mult=width_mult, **kwargs)


@register_model("convnet_pw")
def convnet_pw(num_classes: int = 10, width_mult: float = 1.0, **kwargs) -> ConvNet:
    """``convnet`` with a pointwise (1x1) last stage: its compute stays at fine spatial
    granularity. On the last stage's 8x8 map (64x64 input) a 3x3 conv spreads one changed
    pixel to 9 of 64 rows (14% of the map), so a few changes there make the stage's third of
    the MACs run nearly dense in a delta engine; a 1x1 conv recomputes only the changed pixels.
    """
    return ConvNet(num_classes=num_classes, width_mult=width_mult, last_kernel=1, **kwargs)
