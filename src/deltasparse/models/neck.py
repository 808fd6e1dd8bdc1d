"""A YOLO-style detector in pure PyTorch (no detection head decoding): a CSP-like backbone with
SiLU, an SPPF block (three chained 5x5 max pools, concat), and a PAN-style neck that upsamples
the deep map (nearest, x2), concatenates it with the shallower ones and returns the stride-8
prediction map ``(B, anchors * (5 + classes), H/8, W/8)``. It exercises what detection necks
stream through the engine: upsampling, concat, max pooling and residual adds."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["YoloNeck"]


def _cbs(c_in: int, c_out: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.SiLU())  # fmt: skip


class _Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = _cbs(c, c, 1), _cbs(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class _C3(nn.Module):
    """CSP bottleneck: two 1x1 branches, bottlenecks on one, concat, 1x1 fuse."""

    def __init__(self, c_in: int, c_out: int, n: int = 1) -> None:
        super().__init__()
        h = c_out // 2
        self.cv1, self.cv2 = _cbs(c_in, h), _cbs(c_in, h)
        self.m = nn.Sequential(*[_Bottleneck(h) for _ in range(n)])
        self.cv3 = _cbs(2 * h, c_out)

    def forward(self, x):
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


class _SPPF(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.cv1, self.cv2 = _cbs(c, h), _cbs(4 * h, c)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], dim=1))


class YoloNeck(nn.Module):
    """``width``: channels of the stride-2 stem (the others scale with it)."""

    def __init__(self, classes: int = 3, anchors: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = _cbs(3, w, 3, 2)                                  # /2
        self.b1 = nn.Sequential(_cbs(w, 2 * w, 3, 2), _C3(2 * w, 2 * w))  # /4
        self.b2 = nn.Sequential(_cbs(2 * w, 4 * w, 3, 2), _C3(4 * w, 4 * w))  # /8 (P3)
        self.b3 = nn.Sequential(_cbs(4 * w, 8 * w, 3, 2), _C3(8 * w, 8 * w))  # /16 (P4)
        self.b4 = nn.Sequential(_cbs(8 * w, 8 * w, 3, 2), _SPPF(8 * w))  # /32 (P5)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lat5 = _cbs(8 * w, 4 * w)
        self.td4 = _C3(12 * w, 4 * w)
        self.lat4 = _cbs(4 * w, 2 * w)
        self.td3 = _C3(6 * w, 4 * w)
        self.head = nn.Conv2d(4 * w, anchors * (5 + classes), 1)

    def forward(self, x):
        p3 = self.b2(self.b1(self.stem(x)))
        p4 = self.b3(p3)
        p5 = self.lat5(self.b4(p4))
        n4 = self.lat4(self.td4(torch.cat([self.up(p5), p4], dim=1)))
        n3 = self.td3(torch.cat([self.up(n4), p3], dim=1))
        return self.head(n3)
