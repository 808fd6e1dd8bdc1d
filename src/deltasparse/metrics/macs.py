"""Exact effective MACs: replay a binarised activation (or delta) map through the path to each
consumer and run the consumer with all-ones weights, the way NeuroBench counts synaptic
operations, so that padding and stride count exactly.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._graph import Consumer
from .._opset import classify, node_arg
from ..engine.kernels.geometry import upsample_sources

__all__ = ["consumer_macs", "replay_path"]


def _meta_shape(node: fx.Node, batch: int) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        raise RuntimeError(f"no shape recorded for node '{node.name}' (run ShapeProp first)")
    return (batch, *tuple(meta.shape)[1:])


_arg = node_arg


def _replay_new_kinds(node: fx.Node, x: torch.Tensor, modules: dict, n: int, gm=None):
    """Products, permutes, layer norms and upsampling (None: another kind)."""
    kind, p = classify(node, modules, gm)
    if kind == "mul":  # a per-sample scale reaches every pixel of its sample
        return x.expand(_meta_shape(node, n))
    if kind == "permute":
        return x.permute(*p["dims"])
    if kind == "layernorm":  # one changed channel changes every channel of its pixel
        dim = 1 if p["axis"] == "channels" else -1
        return x.amax(dim, keepdim=True).expand_as(x)
    if kind == "upsample":
        b, c, h, w = x.shape
        ho, wo = _meta_shape(node, n)[2:]
        scales = None if p["size"] is not None or p["recompute"] else p["scale"]
        idx, _ = upsample_sources(b, (h, w), (ho, wo), p["mode"], p["align_corners"], scales)
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        hit = rows[idx.to(x.device)].amax(1)  # (B*Ho*Wo, C): any source changed
        return hit.view(b, ho, wo, c).permute(0, 3, 1, 2)
    return None


def _replay_node(node: fx.Node, prev: fx.Node, x: torch.Tensor, modules: dict,
                 gm=None) -> torch.Tensor:  # fmt: skip
    n = x.shape[0]
    y = _replay_new_kinds(node, x, modules, n, gm)
    if y is not None:
        return y
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            return m(x)
        if isinstance(m, nn.AvgPool2d):
            return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
        if isinstance(m, nn.AvgPool1d):
            return F.max_pool1d(x, m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return F.adaptive_max_pool2d(x, m.output_size)
        if isinstance(m, nn.AdaptiveAvgPool1d):
            return F.adaptive_max_pool1d(x, m.output_size)
        if isinstance(m, nn.Flatten):
            return x.reshape(_meta_shape(node, n))
        return x  # batch norm, dropout, identity, activations keep the nonzero pattern
    fn = node.target
    if node.op == "call_function":
        if fn is F.max_pool2d:
            return F.max_pool2d(
                x,
                _arg(node, 1, "kernel_size", None),
                _arg(node, 2, "stride", None),
                _arg(node, 3, "padding", 0),
                _arg(node, 4, "dilation", 1),
                _arg(node, 5, "ceil_mode", False),
            )
        if fn is F.avg_pool2d:
            return F.max_pool2d(
                x,
                _arg(node, 1, "kernel_size", None),
                _arg(node, 2, "stride", None),
                _arg(node, 3, "padding", 0),
                ceil_mode=_arg(node, 4, "ceil_mode", False),
            )
        if fn in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            return F.adaptive_max_pool2d(x, _arg(node, 1, "output_size", None))
        if fn is torch.flatten:
            return x.reshape(_meta_shape(node, n))
        if fn is torch.cat:
            parts = []
            for a in node.args[0] if node.args else node.kwargs["tensors"]:
                parts.append(x if a is prev else x.new_zeros(_meta_shape(a, n)))
            return torch.cat(parts, dim=_arg(node, 1, "dim", 0))
        if fn in (operator.add, operator.iadd, torch.add):
            return x
        return x  # relu, relu6, hardtanh, dropout
    if fn in ("view", "reshape", "flatten"):
        return x.reshape(_meta_shape(node, n))
    if fn == "mean":
        dim = _arg(node, 1, "dim", None)
        keep = _arg(node, 2, "keepdim", False)
        return x.amax(dim=dim, keepdim=keep) if dim is not None else x.amax()
    return x


def replay_path(consumer: Consumer, x: torch.Tensor, modules: dict) -> torch.Tensor:
    prev = consumer.source
    for node in consumer.path:
        x = _replay_node(node, prev, x, modules, consumer.graph_module)
        prev = node
    return x


def consumer_macs(consumer: Consumer, binary: torch.Tensor, modules: dict) -> int:
    """MACs that ``consumer`` performs on the nonzero entries of ``binary`` (0/1 map)."""
    x = replay_path(consumer, binary, modules)
    m = consumer.module
    if isinstance(m, nn.Linear):
        return int(x.sum(dtype=torch.float64).item()) * m.out_features
    ones = torch.ones_like(m.weight, dtype=x.dtype)
    conv = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
    y = conv(x, ones, None, m.stride, m.padding, m.dilation, m.groups)
    return int(y.sum(dtype=torch.float64).item())
