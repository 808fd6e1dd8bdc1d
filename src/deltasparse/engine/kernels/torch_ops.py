"""The ``torch`` backend: pixel-granular gather -> dense GEMM -> write back, in plain torch ops.

Work is skipped per pixel (a row of the channels-last buffer): the rows to recompute are
gathered into a dense matrix, multiplied with the packed weights in one GEMM (one batched
GEMM for grouped convs) and written back. Above a measured density the dense path is used
instead (channels-last ``F.conv2d`` / one GEMM over all rows), so a dense stream costs about
what the dense model costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import HALF, Backend, opmath
from .specs import ConvSpec, LinearSpec, PoolSpec

__all__ = ["CppBackend", "TorchBackend", "dense_conv", "dense_pool", "nchw_view"]


def nchw_view(x: torch.Tensor, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` view (channels-last strides) of the first ``B*H*W`` rows of ``x``."""
    h, w = hw
    c = x.shape[1]
    return x[: batch * h * w].view(batch, h, w, c).permute(0, 3, 1, 2)


def rows_of(y: torch.Tensor) -> torch.Tensor:
    """``(B*H*W, C)`` rows of a ``(B, C, H, W)`` tensor (a view when it is channels-last)."""
    b, c, h, w = y.shape
    return y.permute(0, 2, 3, 1).reshape(b * h * w, c)


def dense_conv(x: torch.Tensor, spec: ConvSpec, bias: bool = True) -> torch.Tensor:
    g = spec.geom
    y = F.conv2d(
        nchw_view(x, g.batch, g.in_hw),
        spec.weight,
        spec.bias if bias else None,
        g.stride,
        g.padding,
        g.dilation,
        spec.groups,
    )
    return rows_of(y)


def dense_pool(x: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    g = spec.geom
    xv = nchw_view(x, g.batch, g.in_hw)
    if spec.mode == "max":
        y = F.max_pool2d(xv, g.kernel, g.stride, g.padding, g.dilation, spec.ceil_mode)
    else:
        y = F.avg_pool2d(
            xv, g.kernel, g.stride, g.padding, spec.ceil_mode, spec.count_include_pad,
            spec.divisor_override,
        )  # fmt: skip
    return rows_of(y)


# Below ~2M MACs a oneDNN call costs more in overhead than MKL's GEMM (measured, 2 threads).
_MIN_CONV_MACS = 1 << 21


def _bucket(n: int) -> int:
    """``n`` rounded up to one of 8 sizes per octave (at most 12.5% padding)."""
    step = 1 << max(4, n.bit_length() - 4)
    return -(-n // step) * step


def gather_taps(x: torch.Tensor, spec, rows: torch.Tensor) -> torch.Tensor:
    """``(n, k2, C)``: the input rows under every tap of the windows of ``rows``."""
    k2 = spec.geom.k2
    idx = spec.geom.taps.index_select(0, rows).reshape(-1)
    return x.index_select(0, idx).view(rows.numel(), k2, x.shape[1])


class TorchBackend(Backend):
    """Delta kernels in plain torch ops (CPU, and a correct but launch-bound GPU fallback)."""

    name = "torch"
    sparse = True
    # Measured with bench/engine_crossover.py (1 thread, MobileNet v1 layer shapes): a gathered
    # GEMM is never slower than the dense one, so 1x1 convs stay sparse up to 90% (the dense
    # path only saves the gathers); k x k im2col GEMMs cross at ~40%; the tap loop of a sparse
    # depthwise conv loses to the (memory-bound) dense one above ~10-20%.
    crossover = {"linear": 0.9, "conv": 0.4, "depthwise": 0.15, "pool": 0.3, "pointwise": 0.5}

    def prepare(self, spec) -> None:
        if isinstance(spec, LinearSpec) and spec.wt.device.type == "cpu":
            # oneDNN's 1x1 conv on rows viewed as a (1, C, 1, n) channels-last image: equal
            # to MKL's GEMM on 1 thread, 2-4x faster on 2 (bench/engine_crossover.py notes).
            c_in, c_out = spec.wt.shape
            w4 = spec.wt.t().reshape(c_out, c_in, 1, 1)
            spec.extra["w1x1"] = w4.contiguous(memory_format=torch.channels_last)

    def rows_computed(self, kernel: str, n: int, total: int, macs_per_row: int = 0) -> int:
        """Rows a kernel really computes for ``n`` requested rows (padding included)."""
        if kernel == "linear" and self.device.type == "cpu" and n < total:
            return min(_bucket(n), total) if n * macs_per_row >= _MIN_CONV_MACS else n
        return n

    def linear(self, x: torch.Tensor, spec: LinearSpec, rows: torch.Tensor | None):
        bias = None if self.bias_in_finish(x.dtype) else spec.bias
        w4 = spec.extra.get("w1x1")
        p = x.shape[0] - 1
        n = p if rows is None else int(rows.numel())
        if w4 is None or x.dtype != w4.dtype or n * spec.macs_per_row < _MIN_CONV_MACS:
            a = x[:p] if rows is None else x.index_select(0, rows)
            return a @ spec.wt if bias is None else torch.addmm(bias, a, spec.wt)
        if rows is None:
            a = x[:p]
        else:
            # oneDNN builds a kernel per shape: pad the row count to a few sizes (gathering
            # the zero row) so that a stream reuses them instead of compiling every frame.
            m = min(_bucket(n), p)
            if m > n:
                rows = torch.cat([rows, rows.new_full((m - n,), p)])
            a = x.index_select(0, rows)
        m, c = a.shape
        y = F.conv2d(a.view(1, 1, m, c).permute(0, 3, 1, 2), w4, bias)
        return y.permute(0, 2, 3, 1).reshape(m, -1)[:n]

    def conv(self, x: torch.Tensor, spec: ConvSpec, rows: torch.Tensor | None):
        with_bias = spec.bias is not None and not self.bias_in_finish(x.dtype)
        if rows is None:
            return dense_conv(x, spec, with_bias)
        n = rows.numel()
        g = gather_taps(x, spec, rows)  # (n, k2, C_in)
        if spec.groups == 1:
            if with_bias:
                return torch.addmm(spec.bias, g.view(n, -1), spec.w_taps)
            return g.view(n, -1) @ spec.w_taps
        groups, k2 = spec.groups, spec.geom.k2
        cin_g = spec.in_ch // groups
        a = g.view(n, k2, groups, cin_g).permute(2, 0, 1, 3).reshape(groups, n, k2 * cin_g)
        y = torch.bmm(a, spec.w_taps).permute(1, 0, 2).reshape(n, spec.out_ch)
        if with_bias:
            y += spec.bias
        return y

    def depthwise(self, x: torch.Tensor, spec: ConvSpec, rows: torch.Tensor | None):
        with_bias = spec.bias is not None and not self.bias_in_finish(x.dtype)
        if rows is None:
            return dense_conv(x, spec, with_bias)
        n = rows.numel()
        taps = spec.geom.taps.index_select(0, rows)  # (n, k2)
        half = x.dtype in HALF  # the taps summed in float32 (finish rounds the sum)
        y = x.new_zeros(n, spec.out_ch, dtype=opmath(x.dtype))
        if with_bias:
            y += spec.bias
        w = spec.w_taps.float() if half else spec.w_taps
        # One tap at a time keeps the temporaries at (n, C) instead of (n, k2, C).
        for j in range(spec.geom.k2):
            t = x.index_select(0, taps[:, j])
            y.addcmul_(t.float() if half else t, w[j])
        return y

    def pool(self, x: torch.Tensor, spec: PoolSpec, rows: torch.Tensor | None):
        if rows is None:
            return dense_pool(x, spec)
        g = gather_taps(x, spec, rows)  # (n, k2, C)
        if spec.mode == "max":
            valid = spec.geom.valid.index_select(0, rows)
            if not bool(valid.all()):
                g = g.masked_fill(~valid.unsqueeze(-1), float("-inf"))
            return g.amax(1)
        if x.dtype in HALF:  # summed in float32 (finish rounds the mean once)
            g = g.float()
        return g.sum(1) / spec.divisor.index_select(0, rows)


_NO_ROWS = torch.empty(0, dtype=torch.long)
_NO_BIAS = torch.empty(0)
_NO_FRAME_ROWS = torch.empty(0, dtype=torch.float32)  # frame_gate: do not store the rows


class CppBackend(TorchBackend):
    """The torch backend with the epilogue fused into one C++ pass (``kernels/cpp.py``).

    Agrees with ``torch`` to float rounding; picked by ``auto`` on CPU when the op builds.
    """

    name = "cpp"
    defers_bias = True  # added inside the fused epilogue (saves a pass)
    # The C++ depthwise kernel reads the k^2 taps in place, with the sums of 16-32 channels in
    # registers, and commits each block of rows while it is in cache. oneDNN's dense conv is
    # faster per row, but its result then goes through a separate epilogue over every row:
    # streamed, the demo's delta model runs 7-10% faster per step at 0.6-1.0 than at 0.35
    # (the value before the fused commit), measured side by side with
    # ``bench/engine_trained.py --crossover depthwise=...``.
    crossover = {**TorchBackend.crossover, "depthwise": 0.75}

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        if not self.available(device):
            raise RuntimeError(
                "DeltaEngine backend 'cpp' needs the C++ engine op, which could not be built "
                "(see the log; DELTASPARSE_NO_CPP=1 disables it); use backend='torch'"
            )
        from . import cpp

        self._op = cpp.load()
        # MKL's SGEMM, called per block of rows from the fused kernels (where torch links
        # MKL; elsewhere the inherited oneDNN / GEMM paths run and the fused ones do not)
        self._gemm = bool(torch.ops.deltasparse.has_sgemm())

    @classmethod
    def available(cls, device: torch.device | str = "cpu") -> bool:
        from . import cpp

        return torch.device(device).type == "cpu" and cpp.available()

    _float32 = True  # the engine's dtype (prepare): other dtypes take the inherited paths

    def crossover_for(self, dtype: torch.dtype) -> dict[str, float]:
        # the fused C++ kernels run float32 only; other dtypes run the torch paths
        return self.crossover if dtype == torch.float32 else TorchBackend.crossover

    def prepare(self, spec) -> None:
        super().prepare(spec)
        if isinstance(spec, LinearSpec):
            self._float32 = spec.wt.dtype == torch.float32

    def rows_computed(self, kernel: str, n: int, total: int, macs_per_row: int = 0) -> int:
        if kernel == "linear" and self._gemm and self._float32:
            return n  # the blocked GEMM computes exactly the listed rows (no padding)
        return super().rows_computed(kernel, n, total, macs_per_row)

    def linear(self, x, spec, rows):
        if not self._gemm or x.dtype != torch.float32:
            return super().linear(x, spec, rows)
        return self._gemm_rows(x, _NO_ROWS, rows, spec.wt, x.shape[0] - 1)

    def conv(self, x, spec, rows):
        if rows is None or spec.groups != 1 or not self._gemm or x.dtype != torch.float32:
            return super().conv(x, spec, rows)
        return self._gemm_rows(x, spec.geom.taps, rows, spec.w_taps, spec.geom.p_out)

    @staticmethod
    def _gemm_rows(x, taps, rows, w, p_out: int):
        r = _NO_ROWS if rows is None else rows
        return torch.ops.deltasparse.gemm_rows(x, taps, r, rows is None, w, p_out)

    def _fused(self, x, out, chain) -> tuple | None:
        """The chain's fused parameters when a fused kernel can run it (float32 throughout)."""
        if x.dtype != torch.float32 or out.buf.dtype != torch.float32:
            return None
        return chain.fused

    def _commit(self, kernel, x, taps, rows, w, bias, out, chain, first: bool, mode: int = 0):
        lo, hi, thr, thr_mode, gate = chain.fused
        r = _NO_ROWS if rows is None else rows
        b = _NO_BIAS if bias is None else bias
        if kernel == "gemm":
            changed = torch.ops.deltasparse.gemm_commit(x, taps, r, rows is None, w, b, out.buf,
                                                        lo, hi, thr, thr_mode, chain.hw,
                                                        not first, gate)  # fmt: skip
        else:
            changed = torch.ops.deltasparse.window_commit(x, taps, w, r, rows is None, mode, b,
                                                          out.buf, lo, hi, thr, thr_mode,
                                                          chain.hw, not first, gate)  # fmt: skip
        return None if first else changed

    def linear_commit(self, x, spec, rows, out, chain, first):
        if not self._gemm or self._fused(x, out, chain) is None:
            return NotImplemented
        return self._commit("gemm", x, _NO_ROWS, rows, spec.wt, spec.bias, out, chain, first)

    def conv_commit(self, x, spec, rows, out, chain, first):
        # every row: oneDNN's dense conv (the gathers of k^2 taps cost more than they save)
        if rows is None or self._fused(x, out, chain) is None:
            return NotImplemented
        if spec.depthwise:
            return self._commit("window", x, spec.geom.taps, rows, spec.w_taps, spec.bias, out,
                                chain, first)  # fmt: skip
        if spec.groups != 1 or not self._gemm:
            return NotImplemented
        return self._commit("gemm", x, spec.geom.taps, rows, spec.w_taps, spec.bias, out, chain,
                            first)  # fmt: skip

    def pool_commit(self, x, spec, rows, out, chain, first):
        if spec.mode != "max" or self._fused(x, out, chain) is None:
            return NotImplemented
        return self._commit("window", x, spec.geom.taps, rows, _NO_BIAS, None, out, chain,
                            first, mode=1)  # fmt: skip

    def gpool_commit(self, x, rows, out, chain, first):
        if self._fused(x.buf, out, chain) is None:
            return NotImplemented
        lo, hi, thr, thr_mode, gate = chain.fused
        r = _NO_ROWS if rows is None else rows
        changed = torch.ops.deltasparse.gpool_commit(x.buf, x.hw[0] * x.hw[1], r, rows is None,
                                                     _NO_BIAS, out.buf, lo, hi, thr, thr_mode,
                                                     chain.hw, not first, gate)  # fmt: skip
        return None if first else changed

    def depthwise(self, x, spec, rows):
        # every row: oneDNN's dense depthwise conv (~2.4x faster than the row kernel there)
        if rows is None or x.dtype != torch.float32:
            return super().depthwise(x, spec, rows)
        return self._window(x, spec, rows, spec.w_taps, 0)

    def pool(self, x, spec, rows):
        if x.dtype != torch.float32 or spec.mode != "max":
            return super().pool(x, spec, rows)
        return self._window(x, spec, rows, _NO_BIAS, 1)

    @staticmethod
    def _window(x, spec, rows, w, mode: int):
        r = _NO_ROWS if rows is None else rows
        return torch.ops.deltasparse.window_rows(x, spec.geom.taps, w, r, rows is None, mode)

    def finish_reads_only(self, chain, z) -> bool:
        # quant_commit reads z and writes the state; the torch fallback modifies z
        return chain.fused is not None and z.dtype == torch.float32 and z.is_contiguous()

    def fuses_frame_gate(self, chain, dtype) -> bool:
        """Whether :meth:`frame_gate` runs this input gate (its chain fused, float32)."""
        return chain.fused is not None and dtype == torch.float32

    def frame_gate(self, frame, inp, out, chain, first: bool):
        """Gate every pixel of ``frame`` (NCHW) into ``out`` in one C++ pass over the frame:
        what the input op's copy to rows and the gate's :meth:`finish` over all rows do, the
        rows themselves not stored (``inp``, the input's Value, has no other reader). Returns
        the changed rows of ``out`` (None on the first frame)."""
        lo, hi, thr, mode, gate = chain.fused
        # the input's rows are not stored: the gate is their only reader (InputGateOp)
        changed = torch.ops.deltasparse.frame_gate(frame, _NO_FRAME_ROWS, out.buf, lo, hi, thr,
                                                   mode, chain.hw, not first, gate)  # fmt: skip
        return None if first else changed

    def finish(self, out, rows, z, chain, first, bias=None):
        if z.dtype != torch.float32 or out.buf.dtype != torch.float32 or not z.is_contiguous():
            return super().finish(out, rows, z, chain, first, bias)
        params = chain.fused
        if params is None:
            if bias is not None:
                z += bias
                bias = None
            chain(z, rows, out.batch, out.buf)
            params = (float("-inf"), float("inf"), z.new_empty(0), 0, 0)
        lo, hi, thr, mode, gate = params
        hw = chain.hw
        r = _NO_ROWS if rows is None else rows
        b = _NO_BIAS if bias is None else bias
        mask = self._op(z, out.buf, r, b, lo, hi, thr, mode, hw, not first, gate)
        if first:
            return None
        return torch.ops.deltasparse.flagged(mask, r)
