"""Window geometry of convolutions and pools on channels-last row buffers.

The engine stores every activation map ``(B, C, H, W)`` as a row buffer ``(B*H*W + 1, C)``:
row ``b*H*W + y*W + x`` holds the channels of one pixel and the extra last row is all zeros,
so a gather that falls into the zero padding of a convolution reads that row instead of
branching. A :class:`WindowGeom` describes one sliding-window op (kernel, stride, padding,
dilation) between an input grid and an output grid and builds, once and when first read, two
integer tables:

* ``taps``    ``(P_out, kh*kw)``: the input row of every tap of every output (``P_in`` = the
  zero row where the tap falls into padding);
* ``inverse`` ``(P_in, kh*kw)``: the output that each input pixel reaches through each tap
  (``P_out`` = "none", a dump slot).

``reachable(active_inputs)`` lists the output rows whose window contains at least one changed
input: exactly the outputs that must be recomputed (from ``inverse``, or on the CPU with the C++
ops loaded from the window's arithmetic, without reading a table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["WindowGeom", "out_size"]


def out_size(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool = False) -> int:
    """PyTorch's output length of a sliding window (conv and pool formula)."""
    span = d * (k - 1) + 1
    if not ceil_mode:
        return (n + 2 * p - span) // s + 1
    o = -(-(n + 2 * p - span) // s) + 1
    # PyTorch: the last window must start inside the input or the left padding.
    if (o - 1) * s >= n + p:
        o -= 1
    return o


@dataclass(eq=False)
class WindowGeom:
    """One sliding window between an input grid ``(B,H,W)`` and an output grid ``(B,Ho,Wo)``."""

    batch: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _taps: torch.Tensor | None = field(default=None, repr=False)
    _valid: torch.Tensor | None = field(default=None, repr=False)
    _inverse: torch.Tensor | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple:
        return (
            self.batch, self.in_hw, self.out_hw, self.kernel, self.stride, self.padding,
            self.dilation, str(self.device),
        )  # fmt: skip

    @property
    def p_in(self) -> int:
        return self.batch * self.in_hw[0] * self.in_hw[1]

    @property
    def p_out(self) -> int:
        return self.batch * self.out_hw[0] * self.out_hw[1]

    @property
    def k2(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def is_identity(self) -> bool:
        """A 1x1, stride-1, unpadded window: output row r reads input row r only."""
        return (
            self.kernel == (1, 1)
            and self.stride == (1, 1)
            and self.padding == (0, 0)
            and self.in_hw == self.out_hw
        )

    def _build(self) -> None:
        (h, w), (ho, wo) = self.in_hw, self.out_hw
        (kh, kw), (sh, sw) = self.kernel, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        dev = self.device
        iy = torch.arange(ho, device=dev)[:, None] * sh - ph + torch.arange(kh, device=dev) * dh
        ix = torch.arange(wo, device=dev)[:, None] * sw - pw + torch.arange(kw, device=dev) * dw
        vy = (iy >= 0) & (iy < h)
        vx = (ix >= 0) & (ix < w)
        # (Ho, Wo, kh, kw) -> (Ho*Wo, k2)
        sp = (iy[:, None, :, None] * w + ix[None, :, None, :]).reshape(ho * wo, kh * kw)
        valid = (vy[:, None, :, None] & vx[None, :, None, :]).reshape(ho * wo, kh * kw)
        base = (torch.arange(self.batch, device=dev) * (h * w))[:, None, None]
        taps = (sp[None] + base).reshape(self.p_out, kh * kw)
        valid = valid[None].expand(self.batch, -1, -1).reshape(self.p_out, kh * kw)
        taps = torch.where(valid, taps, torch.full_like(taps, self.p_in))
        self._taps = taps.contiguous()
        self._valid = valid.contiguous()

    def _build_inverse(self) -> None:
        # only where it is read: the C++ ops find reachable outputs without it
        k2, dev = self.k2, self.device
        inv = torch.full((self.p_in + 1, k2), self.p_out, dtype=torch.long, device=dev)
        out_idx = torch.arange(self.p_out, device=dev)[:, None].expand(-1, k2)
        tap_idx = torch.arange(k2, device=dev)[None, :].expand(self.p_out, -1)
        inv[self.taps, tap_idx] = out_idx  # one tap maps distinct outputs to distinct inputs
        self._inverse = inv[: self.p_in].contiguous()

    @property
    def taps(self) -> torch.Tensor:
        if self._taps is None:
            self._build()
        return self._taps

    @property
    def valid(self) -> torch.Tensor:
        if self._valid is None:
            self._build()
        return self._valid

    @property
    def inverse(self) -> torch.Tensor:
        if self._inverse is None:
            self._build_inverse()
        return self._inverse

    def reachable(self, active: torch.Tensor) -> torch.Tensor:
        """Sorted output rows whose window holds at least one of the ``active`` input rows."""
        if self.is_identity:
            return active
        if active.numel() == 0:
            return active
        if active.device.type == "cpu" and _cpp_loaded():  # from the arithmetic: no table
            return torch.ops.deltasparse.reachable(active, self.batch, *self.in_hw, *self.out_hw,
                                                   *self.kernel, *self.stride, *self.padding,
                                                   *self.dilation)  # fmt: skip
        cand = self.inverse.index_select(0, active).reshape(-1)
        if cand.numel() * 16 < self.p_out:  # few candidates: sort them, skip the O(P) mask
            r = torch.unique(cand)
            return r[:-1] if int(r[-1]) == self.p_out else r
        mask = torch.zeros(self.p_out + 1, dtype=torch.bool, device=active.device)
        mask[cand] = True
        return mask[: self.p_out].nonzero().squeeze(1)

    def table_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self._taps, self._valid, self._inverse)
            if t is not None
        )


def reached_samples(active: torch.Tensor, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    """The samples (sorted) holding one of the sorted ``active`` rows of a (batch, h, w) map:
    the outputs of a whole-map window (global pooling, flatten)."""
    if active.device.type == "cpu" and _cpp_loaded():  # ~5x faster than unique_consecutive
        h, w = hw
        return torch.ops.deltasparse.reachable(active, batch, h, w, 1, 1, h, w, 1, 1, 0, 0, 1, 1)
    return torch.unique_consecutive(active // (hw[0] * hw[1]))


def _cpp_loaded() -> bool:
    """Whether the C++ ops are loaded (the C++ backend loads them; never built from here)."""
    from . import cpp

    return cpp.load(build=False) is not None


class GeometryCache:
    """Per-engine cache so that layers of equal geometry share their tables (no globals)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, WindowGeom] = {}

    def get(self, geom: WindowGeom) -> WindowGeom:
        return self._cache.setdefault(geom.key, geom)

    def nbytes(self) -> int:
        return sum(g.table_bytes() for g in self._cache.values())
