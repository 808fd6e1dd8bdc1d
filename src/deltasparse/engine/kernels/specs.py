"""Op specifications handed to the kernels: weights in the packed layouts each path wants.

Specs are built once per engine from the user's modules (batch norm folded into *copies* of
the weights; the user's tensors are never written). A backend may attach its own packed
layouts through ``spec.extra`` (e.g. a Triton backend's blocked weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .geometry import WindowGeom

__all__ = ["ConvSpec", "LinearSpec", "PoolSpec"]


@dataclass(eq=False)
class LinearSpec:
    """``y = x @ wt + bias`` on rows: a ``Linear`` or a 1x1 stride-1 unpadded ``Conv2d``."""

    wt: torch.Tensor  # (C_in, C_out), contiguous
    bias: torch.Tensor | None  # (C_out,)
    extra: dict = field(default_factory=dict)

    @property
    def in_ch(self) -> int:
        return self.wt.shape[0]

    @property
    def out_ch(self) -> int:
        return self.wt.shape[1]

    @property
    def macs_per_row(self) -> int:
        return self.in_ch * self.out_ch


@dataclass(eq=False)
class ConvSpec:
    """A ``Conv2d`` with any kernel, stride, padding, dilation and groups.

    ``weight`` is the folded weight ``(C_out, C_in/g, kh, kw)`` (channels-last memory format,
    for the dense path). ``w_taps`` is the gather-GEMM layout: ``(k2*C_in, C_out)`` for
    ``groups == 1``, ``(g, k2*C_in/g, C_out/g)`` for grouped convs and ``(k2, C)`` for
    depthwise convs (``groups == C_in == C_out``).
    """

    geom: WindowGeom
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    w_taps: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def in_ch(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_ch(self) -> int:
        return self.weight.shape[0]

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_ch == self.out_ch

    @property
    def macs_per_row(self) -> int:
        return self.geom.k2 * self.weight.shape[1] * self.out_ch

    @classmethod
    def from_weight(
        cls, geom: WindowGeom, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> ConvSpec:
        c_out, cin_g, kh, kw = weight.shape
        k2 = kh * kw
        if groups > 1 and cin_g == 1 and c_out == groups:  # depthwise
            w_taps = weight.reshape(c_out, k2).t().contiguous()
        elif groups == 1:
            w_taps = weight.permute(2, 3, 1, 0).reshape(k2 * cin_g, c_out).contiguous()
        else:
            cout_g = c_out // groups
            w = weight.reshape(groups, cout_g, cin_g, kh, kw)
            w_taps = w.permute(0, 3, 4, 2, 1).reshape(groups, k2 * cin_g, cout_g).contiguous()
        return cls(
            geom=geom,
            weight=weight.contiguous(memory_format=torch.channels_last),
            bias=None if bias is None else bias.contiguous(),
            groups=groups,
            w_taps=w_taps,
        )


@dataclass(eq=False)
class PoolSpec:
    """Max or average pooling over a window (``ceil_mode`` and padding via the geometry)."""

    geom: WindowGeom
    mode: str  # "max" | "avg"
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    divisor: torch.Tensor | None = None  # (P_out, 1): PyTorch's divisor per output (avg)
    extra: dict = field(default_factory=dict)
