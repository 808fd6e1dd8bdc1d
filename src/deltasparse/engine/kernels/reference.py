"""The ``reference`` backend: every op computed densely with standard NCHW torch ops (the spec).

Its kernels compute the whole output and return the requested rows, so every faster kernel
can be checked against it row for row; an engine built with it computes every frame densely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend
from .specs import ConvSpec, LinearSpec, PoolSpec
from .torch_ops import dense_pool

__all__ = ["ReferenceBackend"]


def _nchw(x: torch.Tensor, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    h, w = hw
    c = x.shape[1]
    return x[: batch * h * w].reshape(batch, h, w, c).permute(0, 3, 1, 2).contiguous()


def _rows(y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    b, c, h, w = y.shape
    r = y.permute(0, 2, 3, 1).reshape(b * h * w, c)
    return r.contiguous() if rows is None else r.index_select(0, rows)


class ReferenceBackend(Backend):
    name = "reference"
    sparse = False
    crossover = {}

    def _bias(self, x: torch.Tensor, spec):
        return None if self.bias_in_finish(x.dtype) else spec.bias

    def linear(self, x: torch.Tensor, spec: LinearSpec, rows: torch.Tensor | None):
        y = F.linear(x[:-1], spec.wt.t(), self._bias(x, spec))
        return y if rows is None else y.index_select(0, rows)

    def conv(self, x: torch.Tensor, spec: ConvSpec, rows: torch.Tensor | None):
        g = spec.geom
        y = F.conv2d(
            _nchw(x, g.batch, g.in_hw),
            spec.weight.contiguous(),
            self._bias(x, spec),
            g.stride,
            g.padding,
            g.dilation,
            spec.groups,
        )
        return _rows(y, rows)

    depthwise = conv

    def pool(self, x: torch.Tensor, spec: PoolSpec, rows: torch.Tensor | None):
        # Pooling has no layout-dependent arithmetic: the torch backend's dense pool is exact.
        y = dense_pool(x, spec)
        return y.contiguous() if rows is None else y.index_select(0, rows)
