"""Shared plumbing of the inserted sparsity layers: input checks, clip/frame layouts, stats.

A layer built directly takes clips ``(B, T, C, ...)``. Layers that :func:`deltasparse.convert`
places inside a per-frame model take frames ``(N, C, ...)``; inside :class:`~deltasparse.VideoModel`
they are told the clip length ``T`` (``N = B * T``, batch-major) and see the true time axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerStats", "SparsityLayer"]

_LAYOUTS = ("clip", "frame")


@dataclass
class LayerStats:
    """Counts of a layer's last forward.

    ``nonzero`` and ``total`` are Python ints (a device sync happens on access only);
    ``nonzero_tensor`` keeps the on-device count for summing without a sync.
    """

    nonzero_tensor: torch.Tensor
    total: int
    fan_out: float

    @property
    def nonzero(self) -> int:
        return int(self.nonzero_tensor.item())

    @property
    def density(self) -> float:
        return self.nonzero / self.total if self.total else float("nan")

    @property
    def ops(self) -> float:
        """Operations of delta (or sparse) inference: ``fan_out * nonzero``."""
        return self.fan_out * self.nonzero

    @property
    def dense_ops(self) -> float:
        return self.fan_out * self.total

    def __getitem__(self, key: str):
        if key not in ("nonzero", "total", "fan_out", "density"):
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return ("nonzero", "total", "fan_out")

    def to_dict(self) -> dict:
        return {"nonzero": self.nonzero, "total": self.total, "fan_out": self.fan_out}


_F32_EXACT = 1 << 24  # float32 holds every integer below this exactly


def count_nonzero(
    x: torch.Tensor, *, sgn: torch.Tensor | None = None, finite: bool | None = None
) -> torch.Tensor:
    """``torch.count_nonzero(x)`` (a 0-dim int64 tensor on ``x``'s device), fast on CPU.

    On CPU ``torch.count_nonzero`` is a scalar loop, 20-30x slower than an elementwise op; it
    was most of the layers' training overhead. Here the count is ``sum(sgn(x)**2)``, taken as
    float32 dot products over chunks short enough (< 2**24) to be exact, added in float64.
    ``sgn`` maps NaN to 0, so a non-finite input (a diverged run) takes torch's exact path,
    which counts NaN as nonzero. Callers that have ``sgn(x)`` or know whether ``x`` is finite
    pass them to save a pass.
    """
    if x.device.type != "cpu" or x.numel() == 0:
        return torch.count_nonzero(x)
    if finite is None:
        finite = bool(torch.isfinite(x.sum(dtype=torch.float32)))
    if not finite:
        return torch.count_nonzero(x)
    s = torch.sgn(x) if sgn is None else sgn
    if s.dtype == torch.float32:
        flat = s.reshape(-1)
        if flat.numel() < _F32_EXACT:
            return torch.dot(flat, flat).to(torch.int64)
        parts = [torch.dot(c, c) for c in flat.split(_F32_EXACT - 1)]
        return torch.stack(parts).sum(dtype=torch.float64).to(torch.int64)
    # half precision: sum |sgn| in float32 over trailing dims short enough to stay exact
    split, inner = s.dim(), 1
    while split > 0 and inner * s.shape[split - 1] < _F32_EXACT:
        split -= 1
        inner *= s.shape[split]
    if split == s.dim():  # a single dim too long for exact float32 sums
        return torch.count_nonzero(x)
    partial = s.abs().sum(dim=tuple(range(split, s.dim())), dtype=torch.float32)
    return partial.sum(dtype=torch.float64).to(torch.int64)


def check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} expects a floating-point tensor (float32, bfloat16 or float16), got "
            f"{x.dtype}; convert the input with x.float() first"
        )


class SparsityLayer(nn.Module):
    """Base class of the inserted layers: layout handling, ``fan_out``, ``stats``, ``loss``."""

    def __init__(self, sparsity_weight: float, fan_out: float, input_layout: str) -> None:
        super().__init__()
        if input_layout not in _LAYOUTS:
            raise ValueError(f"input_layout must be one of {_LAYOUTS}, got {input_layout!r}")
        if fan_out is None or float(fan_out) < 0:
            raise ValueError(f"fan_out must be a non-negative number, got {fan_out!r}")
        self.sparsity_weight = float(sparsity_weight)
        self.fan_out = float(fan_out)
        self.input_layout = input_layout
        # Set by VideoModel for the duration of one forward; never persisted.
        self.clip_len: int | None = None
        self.stats: LayerStats | None = None
        self.loss: torch.Tensor | None = None

    # -- layout ---------------------------------------------------------------------------
    def _to_clip(self, x: torch.Tensor) -> tuple[torch.Tensor | None, tuple]:
        """Return the input as ``(B, T, C, ...)``, or ``None`` for frames outside a clip."""
        name = type(self).__name__
        check_float(x, name)
        if self.input_layout == "clip":
            if x.dim() < 3:
                raise ValueError(
                    f"{name} expects a clip (B, T, C, ...) with at least 3 dims, got shape "
                    f"{tuple(x.shape)}; for frames (N, C, ...) build it with input_layout='frame'"
                )
            return x, tuple(x.shape)
        if x.dim() < 2:
            raise ValueError(
                f"{name} (frame layout) expects frames (N, C, ...) with at least 2 dims, got "
                f"shape {tuple(x.shape)}"
            )
        if self.clip_len is None:
            return None, tuple(x.shape)
        t = self.clip_len
        if x.shape[0] % t:
            raise ValueError(
                f"{name}: {x.shape[0]} frames are not a whole number of clips of length {t}"
            )
        return x.reshape(x.shape[0] // t, t, *x.shape[1:]), tuple(x.shape)

    @staticmethod
    def _check_time(x: torch.Tensor, name: str) -> None:
        if x.shape[1] < 2:
            raise ValueError(
                f"{name} needs a time axis of length >= 2 (dim 1 of (B, T, C, ...)), got T="
                f"{x.shape[1]}; temporal deltas need at least two frames"
            )

    def extra_repr(self) -> str:
        return (
            f"sparsity_weight={self.sparsity_weight:g}, fan_out={self.fan_out:g}, "
            f"input_layout={self.input_layout!r}"
        )
