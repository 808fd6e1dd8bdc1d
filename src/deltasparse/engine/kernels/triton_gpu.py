"""The ``triton`` backend: GPU kernels for the delta engine (CUDA only; DESIGN.md §4).

Implements the delta inference of the Delta Activation Layer (Yousefzadeh & Sifalakis,
arXiv 2107.07305) on NVIDIA GPUs with Triton kernels (:mod:`.triton_kernels`):

* ``linear`` -- gather the listed rows -> GEMM (+ bias) in one kernel (1x1 convs, ``Linear``);
* ``conv``   -- ``groups == 1`` k x k convs: implicit im2col of the listed output rows -> GEMM;
* ``depthwise`` -- the k^2 taps of the listed rows, weighted, in one kernel.

Dense calls (``rows is None``) and the other kinds (grouped convs, pooling) use the inherited
torch ops (cuDNN / cuBLAS). float32 GEMMs run in IEEE float32 (``precision="ieee"``, never
TF32), so results match the other backends to float rounding; bfloat16 and float16 GEMMs run
on the tensor cores with float32 accumulation, each op's result rounded once (``HALF``).

Called through the engine's per-op driver, these kernels still pay one host synchronisation
per op (the engine reads row counts on the host). :meth:`TritonBackend.graph_step` removes
it: it compiles a built runtime into device-side steps (changed-row masks, on-device row
compaction, fused gather -> GEMM -> chain -> commit kernels) and captures a whole step in a
CUDA graph (see :mod:`.triton_graph`).

triton is imported lazily (never at module import), so this module loads on CPU-only
machines without triton.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .base import HALF
from .specs import ConvSpec, LinearSpec
from .torch_ops import TorchBackend

__all__ = ["TritonBackend", "has_triton"]

log = logging.getLogger(__name__)


def has_triton() -> bool:
    """True when triton is importable and a CUDA device is present."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available()


def _kernels():
    from . import triton_kernels

    return triton_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # triton's CPU interpreter (tests of the kernels)
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# The activations of the fused chain in the order of triton_kernels._act's codes (pure
# Python here: GraphStep's decline rules read it without triton).
ACT_CODES = ("silu", "gelu", "gelu_tanh", "hardswish", "hardsigmoid", "sigmoid", "tanh",
             "leaky_relu", "elu", "mish", "prelu")  # fmt: skip


def act_code(step) -> int | None:
    """The index of an ops.Chain ``("act", apply, params, name)`` step in ACT_CODES."""
    name = step[3]
    if name == "gelu" and step[2].get("approximate", "none") == "tanh":
        name = "gelu_tanh"
    elif name == "gelu" and step[2].get("approximate", "none") != "none":
        return None
    return ACT_CODES.index(name) if name in ACT_CODES else None


# Overrides for experiments (bench/gpu/): {"gemm": (BM, BN, BK, warps), "dw": (BM, BC, warps),
# "stages": num_stages, "flat": False (the per-tap loop of taps_gemm_kernel)}.
TUNE: dict[str, tuple] = {}


def gemm_config(k: int, n: int, f64: bool, rows: int = 1 << 30) -> tuple[int, int, int, int]:
    """``(BM, BN, BK, num_warps)`` of the row GEMMs (no autotuning: it would run the kernel
    on live engine state). ``rows``: the op's output rows. Small tiles: a sparse step has few
    active rows per layer, so the latency of one program's serial K loop, not throughput,
    bounds a layer (bench/gpu/debug_kernels.py swept these on an H200)."""
    if f64:
        return 16, _pow2(n, 16, 32), _pow2(k, 4, 8), 4
    if "gemm" in TUNE:
        bm, bn, bk, nw = TUNE["gemm"]
        return bm, _pow2(n, 16, bn), _pow2(k, 16, bk), nw
    if rows <= 64:  # the classifier: a GEMV per sample, wide K steps
        return 16, _pow2(n, 16, 32), _pow2(k, 16, 128), 4
    return 32, _pow2(n, 16, 32), _pow2(k, 16, 64), 4


def window_kw(g) -> dict:
    """A window geometry (:class:`~.geometry.WindowGeom`) as the kernels' ``KH .. DW``
    constexprs."""
    return dict(KH=g.kernel[0], KW=g.kernel[1], SH=g.stride[0], SW=g.stride[1],
                PH=g.padding[0], PW=g.padding[1], DH=g.dilation[0], DW=g.dilation[1])  # fmt: skip


def _stages() -> dict:
    """``num_stages`` of the GEMM / depthwise launches where ``TUNE["stages"]`` sets it (a
    benchmark sweep); else Triton's default."""
    return {"num_stages": TUNE["stages"]} if "stages" in TUNE else {}


def dw_config(c: int, f64: bool, rows: int = 1 << 30) -> tuple[int, int, int]:
    """``(BM, BC, num_warps)`` of the depthwise kernel."""
    if f64:
        return 16, _pow2(c, 16, 64), 4
    if "dw" in TUNE:
        bm, bc, nw = TUNE["dw"]
        return bm, _pow2(c, 16, bc), nw
    return 16, _pow2(c, 16, 64), 4


class ChainArgs:
    """An op's fused pointwise chain as at most 4 (kind, parameter tensor) pairs."""

    MAX = 4

    def __init__(self, steps: list[tuple[int, torch.Tensor]], dummy: torch.Tensor,
                 hw: int = 1) -> None:  # fmt: skip
        if len(steps) > self.MAX:
            raise NotImplementedError(f"chain of {len(steps)} pointwise ops (max {self.MAX})")
        pad = self.MAX - len(steps)
        self.tensors = [t for _, t in steps] + [dummy] * pad
        self.kinds = [k for k, _ in steps] + [0] * pad
        self.hw = hw

    @classmethod
    def empty(cls, dummy: torch.Tensor) -> ChainArgs:
        return cls([], dummy)

    def kw(self) -> dict:
        return {f"K{i}": k for i, k in enumerate(self.kinds)}


def split_k(k: int, n: int, rows: int, f64: bool, flat: bool = True) -> int:
    """Parts of a graph GEMM's reduction (``k``: its length, ``rows``: the op's output rows):
    a sparse step lists few rows, so a long reduction is a serial loop on few programs; in
    parts it runs on more of them (``split_sum_kernel`` adds the parts in a fixed order: the
    same sums for every row on every step). 1 (unsplit) for float64, short reductions
    (< 1024), large maps (> 16384 rows: enough tiles already) and a per-tap conv loop;
    ``TUNE["split"]`` caps it (0: never)."""
    cap = TUNE.get("split", 4)
    if f64 or not flat or cap <= 1 or rows > 16384:
        return 1
    _, _, bk, _ = gemm_config(k, n, f64, rows)
    return max(1, min(cap, k // 512, _cdiv(k, bk)))


def _split_sum(ws, bias, idx, y, n_rows, cnt, mo, chain: ChainArgs, grid: int, bm: int,
               bn: int, nw: int) -> None:  # fmt: skip
    split, cap, n = ws.shape
    _kernels().split_sum_kernel[(grid,)](
        ws, ws if bias is None else bias, idx, ws if cnt is None else cnt, n_rows, y,
        ws if mo is None else mo, *chain.tensors, n, chain.hw, cap,
        HAS_BIAS=bias is not None, DYN=cnt is not None, FUSE=mo is not None,
        HALF=y.dtype in HALF, SPLIT=split, BM=bm, BN=bn, num_warps=nw, **chain.kw(),
    )  # fmt: skip


def launch_rows_gemm(x, wt, bias, idx, y, *, n_rows=0, cnt=None, mo=None,
                     chain: ChainArgs | None = None, grid: int | None = None,
                     precision: str = "ieee", rows_hint: int | None = None,
                     ws: torch.Tensor | None = None) -> None:  # fmt: skip
    """``y = x[idx[:n]] @ wt + bias`` (eager: ``y`` is ``(n, N)``), or with ``mo`` the fused
    chain + commit into the state ``y`` (graph: ``n`` read from ``cnt`` on the device).
    ``ws``: a float32 ``(split, rows, N)`` workspace: the reduction in ``split`` parts."""
    tk = _kernels()
    k, n = wt.shape
    f64 = x.dtype == torch.float64
    bm, bn, bk, nw = gemm_config(k, n, f64, rows_hint or n_rows)
    if grid is None:
        grid = _cdiv(n_rows, bm) * _cdiv(n, bn)
    grid = max(1, min(grid, 8 * sm_count(x.device)))
    split, cap = (1, 0) if ws is None else ws.shape[:2]
    chain = chain or ChainArgs.empty(x)
    s = chain.tensors
    tk.rows_gemm_kernel[(min(grid * split, 8 * sm_count(x.device)),)](
        x, wt, x if bias is None else bias, idx, x if cnt is None else cnt, n_rows, y,
        x if mo is None else mo, x if ws is None else ws, s[0], s[1], s[2], s[3], k, n,
        chain.hw, cap, HAS_BIAS=bias is not None, DYN=cnt is not None, FUSE=mo is not None,
        IS_F64=f64, PREC=precision, HALF=x.dtype in HALF, BM=bm, BN=bn, BK=bk, SPLIT=split,
        num_warps=nw, **_stages(), **chain.kw(),
    )  # fmt: skip
    if ws is not None:
        _split_sum(ws, bias, idx, y, n_rows, cnt, mo, chain, grid, bm, bn, nw)


_SPEC_BIAS = object()


def launch_taps_gemm(x, spec: ConvSpec, idx, y, *, n_rows=0, cnt=None, mo=None,
                     chain: ChainArgs | None = None, grid: int | None = None,
                     precision: str = "ieee", bias=_SPEC_BIAS,
                     ws: torch.Tensor | None = None) -> None:  # fmt: skip
    """A k x k conv on the listed rows (as :func:`launch_rows_gemm`; ``ws`` only where
    :func:`taps_flat`)."""
    tk = _kernels()
    bias = spec.bias if bias is _SPEC_BIAS else bias
    g = spec.geom
    c, n = spec.in_ch, spec.out_ch
    f64 = x.dtype == torch.float64
    bm, bn, bk, nw = gemm_config(c, n, f64, g.p_out)
    if grid is None:
        grid = _cdiv(n_rows, bm) * _cdiv(n, bn)
    grid = max(1, min(grid, 8 * sm_count(x.device)))
    flat = taps_flat(spec, f64)
    if ws is not None and not flat:
        raise ValueError("launch_taps_gemm: a split reduction needs the flat loop (taps_flat)")
    split, cap = (1, 0) if ws is None else ws.shape[:2]
    chain = chain or ChainArgs.empty(x)
    s = chain.tensors
    (h, w), (ho, wo) = g.in_hw, g.out_hw
    tk.taps_gemm_kernel[(min(grid * split, 8 * sm_count(x.device)),)](
        x, spec.w_taps, x if bias is None else bias, idx, x if cnt is None else cnt,
        n_rows, y, x if mo is None else mo, x if ws is None else ws, s[0], s[1], s[2], s[3],
        c, n, h, w, ho * wo, wo, chain.hw, cap, **window_kw(g), HAS_BIAS=bias is not None,
        DYN=cnt is not None, FUSE=mo is not None,
        IS_F64=f64, PREC=precision, HALF=x.dtype in HALF, BM=bm, BN=bn, BK=bk, FLAT=flat,
        SPLIT=split, num_warps=nw, **_stages(), **chain.kw(),
    )  # fmt: skip
    if ws is not None:
        _split_sum(ws, bias, idx, y, n_rows, cnt, mo, chain, grid, bm, bn, nw)


def taps_flat(spec: ConvSpec, f64: bool) -> bool:
    """Whether taps_gemm_kernel runs one reduction loop over every tap (``C % BK == 0``)."""
    bk = gemm_config(spec.in_ch, spec.out_ch, f64, spec.geom.p_out)[2]
    return TUNE.get("flat", True) and spec.in_ch % bk == 0


def launch_depthwise(x, spec: ConvSpec, idx, y, *, n_rows=0, cnt=None, mo=None,
                     chain: ChainArgs | None = None, grid: int | None = None,
                     bias=_SPEC_BIAS) -> None:  # fmt: skip
    tk = _kernels()
    bias = spec.bias if bias is _SPEC_BIAS else bias
    g = spec.geom
    c = spec.out_ch
    f64 = x.dtype == torch.float64
    bm, bc, nw = dw_config(c, f64, g.p_out)
    if grid is None:
        grid = _cdiv(n_rows, bm) * _cdiv(c, bc)
    grid = max(1, min(grid, 8 * sm_count(x.device)))
    chain = chain or ChainArgs.empty(x)
    s = chain.tensors
    (h, w), (ho, wo) = g.in_hw, g.out_hw
    tk.depthwise_kernel[(grid,)](
        x, spec.w_taps, x if bias is None else bias, idx, x if cnt is None else cnt,
        n_rows, y, x if mo is None else mo, s[0], s[1], s[2], s[3], c, h, w, ho * wo, wo,
        chain.hw, **window_kw(g), HAS_BIAS=bias is not None, DYN=cnt is not None, FUSE=mo is not None,
        IS_F64=f64, HALF=x.dtype in HALF, BM=bm, BC=bc, num_warps=nw, **_stages(),
        **chain.kw(),
    )  # fmt: skip


def launch_grouped(x, spec: ConvSpec, idx, y, *, n_rows=0, cnt=None, mo=None,
                   chain: ChainArgs | None = None, grid: int | None = None) -> None:  # fmt: skip
    """A grouped (not depthwise) conv on the listed rows (the whole-step graph's kernel)."""
    g = spec.geom
    c, n = spec.in_ch, spec.out_ch
    f64 = x.dtype == torch.float64
    bm, bn, nw = dw_config(n, f64, g.p_out)
    if grid is None:
        grid = _cdiv(n_rows, bm) * _cdiv(n, bn)
    grid = max(1, min(grid, 8 * sm_count(x.device)))
    chain = chain or ChainArgs.empty(x)
    s = chain.tensors
    (h, w), (ho, wo) = g.in_hw, g.out_hw
    _kernels().grouped_kernel[(grid,)](
        x, spec.w_taps, x if spec.bias is None else spec.bias, idx, x if cnt is None else cnt,
        n_rows, y, x if mo is None else mo, s[0], s[1], s[2], s[3], c, n, c // spec.groups,
        n // spec.groups, h, w, ho * wo, wo, chain.hw, **window_kw(g),
        HAS_BIAS=spec.bias is not None, DYN=cnt is not None,
        FUSE=mo is not None, IS_F64=f64, HALF=x.dtype in HALF, BM=bm, BN=bn, num_warps=nw,
        **_stages(), **chain.kw(),
    )  # fmt: skip


class TritonBackend(TorchBackend):
    """Triton kernels for the sparse paths of ``linear``, ``conv`` (groups 1), ``depthwise``.

    Args:
        device: a CUDA device.
        precision: float32 GEMM mode, ``"ieee"`` (default: exact float32 products, matching
            the other backends to rounding) or ``"tf32x3"`` (tensor cores, ~float32 accuracy).
    """

    name = "triton"
    defers_bias = False  # the kernels add the bias (before the chain, as the model does)
    graph_declined: str | None = None  # why the last graph_step() returned None

    def __init__(self, device: torch.device | str = "cuda", *, precision: str = "ieee") -> None:
        device = torch.device(device)
        if device.type != "cuda" or not self.available(device):
            why = (
                "triton is not installed"
                if importlib.util.find_spec("triton") is None
                else "no CUDA device is available"
                if not torch.cuda.is_available()
                else f"the model is on {device}, not on a CUDA device"
            )
            raise RuntimeError(
                f"DeltaEngine backend 'triton' needs triton and a CUDA device, but {why}; "
                "use backend='torch' (or 'auto', which picks the fastest available)"
            )
        if precision not in ("ieee", "tf32x3"):
            raise ValueError(f"precision must be 'ieee' or 'tf32x3', got {precision!r}")
        super().__init__(device)
        self.precision = precision

    @classmethod
    def available(cls, device: torch.device | str = "cuda") -> bool:
        return has_triton() and torch.device(device).type == "cuda"

    # -- sparse kernels ---------------------------------------------------------------------
    def linear(self, x: torch.Tensor, spec: LinearSpec, rows: torch.Tensor | None):
        if rows is None or not x.is_cuda:
            return super().linear(x, spec, rows)
        n = int(rows.numel())
        y = x.new_empty(n, spec.out_ch)
        if n:
            launch_rows_gemm(x, spec.wt, self._bias(spec, x), rows, y, n_rows=n,
                             precision=self.precision)  # fmt: skip
        return y

    def _bias(self, spec, x):
        return None if self.bias_in_finish(x.dtype) else spec.bias

    def conv(self, x: torch.Tensor, spec: ConvSpec, rows: torch.Tensor | None):
        if rows is None or spec.groups != 1 or not x.is_cuda:
            return super().conv(x, spec, rows)
        n = int(rows.numel())
        y = x.new_empty(n, spec.out_ch)
        if n:
            launch_taps_gemm(x, spec, rows, y, n_rows=n, precision=self.precision,
                             bias=self._bias(spec, x))  # fmt: skip
        return y

    def depthwise(self, x: torch.Tensor, spec: ConvSpec, rows: torch.Tensor | None):
        if rows is None or not x.is_cuda:
            return super().depthwise(x, spec, rows)
        n = int(rows.numel())
        y = x.new_empty(n, spec.out_ch)
        if n:
            launch_depthwise(x, spec, rows, y, n_rows=n, bias=self._bias(spec, x))
        return y

    # -- whole-step capture -----------------------------------------------------------------
    @staticmethod
    def graph_decline_reason(runtime) -> str | None:
        """Why :meth:`graph_step` would decline ``runtime`` (``None``: it would not)."""
        from .triton_graph import decline_reason

        return decline_reason(runtime)

    def graph_step(self, runtime, *, cuda_graph: bool = True):
        """A :class:`~.triton_graph.GraphStep` for a built runtime, or ``None`` when one of its
        ops has no device-side kernel; the reason is kept in ``self.graph_declined``. The
        engine warns about it and lists it in ``engine.stats.fallbacks``."""
        from .triton_graph import GraphStep

        self.graph_declined = None
        try:
            return GraphStep(runtime, self, cuda_graph=cuda_graph)
        except NotImplementedError as exc:
            self.graph_declined = str(exc)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or run
            # (the state is the dense pass's again): the per-op driver runs, with a warning
            self.graph_declined = f"its kernels failed: {type(exc).__name__}: {exc}"[:400]
        log.debug("DeltaEngine: no CUDA-graph step (%s)", self.graph_declined)
        return None
