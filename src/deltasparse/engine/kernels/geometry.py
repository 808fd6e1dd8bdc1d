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

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["WindowGeom", "out_size", "upsample_size", "upsample_sources"]


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


# -- upsampling ---------------------------------------------------------------------------


def upsample_size(in_hw: tuple[int, int], size, scale) -> tuple[int, int]:
    """``F.interpolate``'s output size from ``size`` or ``scale_factor``."""
    if size is not None:
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    sh, sw = (scale, scale) if isinstance(scale, (int, float)) else (scale[0], scale[-1])
    return (int(math.floor(in_hw[0] * float(sh))), int(math.floor(in_hw[1] * float(sw))))


def _axis_sources(n_in: int, n_out: int, mode: str, align_corners: bool, scale: float | None,
                  f32=np.float32) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per output index along one axis: the input indices it reads ``(n_out, K)`` and their
    weights, as ATen's CPU kernels compute them (``UpSample.h``: the scale and source index in
    the opmath type, ``f32``: float32 for float32 and half inputs, float64 for float64; nearest
    always in float32)."""
    dst = np.arange(n_out)
    if mode in ("nearest", "nearest-exact"):
        if mode == "nearest" and n_out == n_in:
            src = dst
        elif mode == "nearest" and n_out == 2 * n_in:
            src = dst >> 1
        else:
            f = np.float32
            s = f(1.0 / scale) if scale else f(n_in) / f(n_out)
            pos = dst.astype(f) * s if mode == "nearest" else (dst.astype(f) + f(0.5)) * s
            src = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
        return src[:, None].astype(np.int64), np.ones((n_out, 1))
    # linear: area_pixel_compute_scale / area_pixel_compute_source_index / guard_index_and_lambda
    if align_corners:
        s = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
        real = s * dst.astype(f32)
    else:
        s = f32(1.0 / scale) if scale else f32(n_in) / f32(n_out)
        real = np.maximum(s * (dst.astype(f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    lam = np.clip(real - i0.astype(f32), f32(0), f32(1)).astype(np.float64)
    # a source of weight 0 is not read: point it at the other one, so that the rows an input
    # change reaches are exactly those it changes
    i1 = np.where(lam > 0, i0 + (i0 < n_in - 1), i0)
    return np.stack([i0, i1], 1), np.stack([1.0 - lam, lam], 1)


def upsample_sources(batch: int, in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str,
                     align_corners: bool = False, scales=None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(idx, weight)``, each ``(B*Ho*Wo, K)``: the input rows (``b*H*W + y*W + x``) every
    output row of an upsampling reads and their weights (``K`` = 1 nearest, 4 bilinear).
    ``scales``: the ``scale_factor`` that ``F.interpolate`` hands its kernel (``None`` when it
    computes from the sizes); ``dtype``: the map's (float64 computes the weights in float64)."""
    (h, w), (ho, wo) = in_hw, out_hw
    f = np.float64 if dtype == torch.float64 else np.float32
    sh, sw = (scales, scales) if scales is None or isinstance(scales, (int, float)) else (
        scales[0], scales[-1])
    ya, yw = _axis_sources(h, ho, mode, align_corners, sh, f)
    xa, xw = _axis_sources(w, wo, mode, align_corners, sw, f)
    # (Ho, Wo, Ky, Kx) -> (Ho*Wo, Ky*Kx)
    idx = ya[:, None, :, None] * w + xa[None, :, None, :]
    wt = yw[:, None, :, None] * xw[None, :, None, :]
    k = idx.shape[2] * idx.shape[3]
    idx = torch.from_numpy(idx.reshape(ho * wo, k))
    wt = torch.from_numpy(wt.reshape(ho * wo, k))
    offs = (torch.arange(batch) * (h * w)).repeat_interleave(ho * wo)[:, None]
    return (idx.repeat(batch, 1) + offs).contiguous(), wt.repeat(batch, 1).contiguous()
