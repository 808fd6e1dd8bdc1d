"""MobileNet v1 (Howard et al., 2017), the model of arXiv 2107.07305's UCF101 experiments.

Pure PyTorch. Every ReLU6 is its own module, so ``convert()`` places a delta layer after conv1
and after every depthwise and pointwise ReLU6, where the paper put them.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model

__all__ = ["MobileNetV1", "mobilenet_v1"]

# (out_channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]  # fmt: skip


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=False),
    )


class MobileNetV1(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        dropout: float = 0.0,
        min_channels: int = 8,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")

        def ch(c: int) -> int:
            return max(min_channels, int(c * width_mult))

        c = ch(32)
        layers: list[nn.Module] = [_conv_bn(in_channels, c, 3, 2)]
        for c_out, stride in _BLOCKS:
            layers.append(
                nn.Sequential(
                    _conv_bn(c, c, 3, stride, groups=c),  # depthwise
                    _conv_bn(c, ch(c_out), 1, 1),  # pointwise
                )
            )
            c = ch(c_out)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c, num_classes)
        self.num_features = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(self.dropout(self.flatten(self.pool(x))))


@register_model("mobilenet_v1")
def mobilenet_v1(num_classes: int = 1000, width_mult: float = 1.0, **kwargs) -> MobileNetV1:
    """MobileNet v1 with ``width_mult`` scaling the channels (paper: 1.0)."""
    return MobileNetV1(num_classes=num_classes, width_mult=width_mult, **kwargs)
