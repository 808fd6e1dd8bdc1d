"""The backend interface of the delta engine: one method per op kind, plus the commit step.

Every kernel reads a stored input row buffer ``x`` (``(P_in + 1, C_in)``, last row zero) and
computes the op's output (with its bias) at the output rows ``rows`` (a sorted ``int64`` tensor), or at every
output row when ``rows is None`` (the dense path). It returns a fresh ``(n, C_out)`` tensor
that :meth:`Backend.finish` completes in place (activation, quantiser) and writes into the layer's state and reports which rows changed.

Op kinds (DESIGN.md §4):

* ``linear``    -- ``Linear`` and 1x1 stride-1 unpadded convs: gather rows -> GEMM.
* ``conv``      -- any other ``Conv2d`` (k x k, strided, dilated, grouped): gather the k^2 taps
  of every output row (im2col of the reachable outputs only) -> GEMM.
* ``depthwise`` -- ``groups == C_in == C_out``: per-row weighted sum of the k^2 taps.
* ``pool``      -- max / average pooling over the taps of the recomputed windows.

A new backend (e.g. Triton on CUDA) subclasses :class:`Backend` and overrides the kinds it
accelerates; the others fall back to the torch implementations it inherits.
"""

from __future__ import annotations

import contextlib

import torch

from .specs import ConvSpec, LinearSpec, PoolSpec

__all__ = ["Backend", "HALF", "OP_KINDS", "no_tf32", "opmath"]

OP_KINDS = ("linear", "conv", "depthwise", "pool", "pointwise")

# Half-precision engines (DESIGN.md §4): the state is stored in the model's dtype, every
# product is accumulated in float32, and each op's result is rounded once to the dtype, as
# the dense model in that dtype rounds each op's output. A MAC kernel's sum is rounded
# (without its bias); the bias and each step of the pointwise chain are then computed in
# float32 and each rounded to the dtype (:meth:`Backend.finish`), on every path and backend.
HALF = (torch.bfloat16, torch.float16)


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine computes in for state of ``dtype`` (float32 for half)."""
    return torch.float32 if dtype in HALF else dtype


class Backend:
    """Base class. ``sparse=False`` makes the engine compute every op densely every frame."""

    name = "base"
    sparse = True
    # True: the kernels leave the bias out and ``finish`` adds it (fused into the epilogue).
    defers_bias = False
    # Fraction of output rows to recompute above which the dense path is cheaper, per op
    # kind (see bench/engine_crossover.py and the engine README for the measurements).
    crossover: dict[str, float] = {}

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @classmethod
    def available(cls, device: torch.device | str = "cpu") -> bool:
        return True

    # -- ops -----------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, spec: LinearSpec, rows: torch.Tensor | None):
        raise NotImplementedError

    def conv(self, x: torch.Tensor, spec: ConvSpec, rows: torch.Tensor | None):
        raise NotImplementedError

    def depthwise(self, x: torch.Tensor, spec: ConvSpec, rows: torch.Tensor | None):
        raise NotImplementedError

    def pool(self, x: torch.Tensor, spec: PoolSpec, rows: torch.Tensor | None):
        raise NotImplementedError

    # -- fused compute + state update (optional) -------------------------------------------
    # ``rows`` and ``first`` as for the kernels and :meth:`finish`; ``out`` the op's Value,
    # ``chain`` its pointwise chain. Returns what :meth:`finish` would, or NotImplemented
    # (then the engine runs the kernel and :meth:`finish`).
    def linear_commit(self, x, spec: LinearSpec, rows, out, chain, first: bool):
        return NotImplemented

    def conv_commit(self, x, spec: ConvSpec, rows, out, chain, first: bool):
        return NotImplemented

    def pool_commit(self, x, spec: PoolSpec, rows, out, chain, first: bool):
        return NotImplemented

    def gpool_commit(self, x, rows, out, chain, first: bool):
        """Global average pooling of the samples ``rows`` of the Value ``x``."""
        return NotImplemented

    def crossover_for(self, dtype: torch.dtype) -> dict[str, float]:
        """The crossovers for state of ``dtype`` (a backend whose fast kernels take one dtype
        measured its crossovers on those)."""
        return self.crossover

    def rows_computed(self, kernel: str, n: int, total: int, macs_per_row: int = 0) -> int:
        """Rows a kernel really computes when asked for ``n`` of ``total`` (for the stats)."""
        return n

    def precision_scope(self):
        """The context the engine runs a step in. On CUDA: float32 without TF32 in cuDNN and
        cuBLAS, so that the dense kernels (the first frame, the dense path of a crossover, the
        dense step) compute in the precision of the sparse ones: one precision on every path,
        else a quantiser flips between them (history independence)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return no_tf32()

    def bias_in_finish(self, dtype: torch.dtype) -> bool:
        """Whether the MAC kernels leave the bias to :meth:`finish` for state of ``dtype``
        (half precision always: the bias is added in float32 to the rounded sum)."""
        return self.defers_bias or dtype in HALF

    def finish_reads_only(self, chain, z) -> bool:
        """Whether :meth:`finish` leaves ``z`` untouched for this chain (then ``z`` may be a
        view of another op's state)."""
        return False

    def prepare(self, spec) -> None:
        """Hook: pack backend-specific weight layouts into ``spec.extra`` once, at build."""

    # -- state update --------------------------------------------------------------------
    def finish(self, out, rows: torch.Tensor | None, z: torch.Tensor, chain, first: bool,
               bias: torch.Tensor | None = None):  # fmt: skip
        """Apply the fused pointwise ``chain`` to ``z`` and write it into ``out``'s state.

        ``bias`` is the op's bias, to add here only when :meth:`bias_in_finish`.
        Returns the changed rows (``None`` on the first frame: every row is new).
        """
        if out.buf.dtype in HALF:
            z = self._finish_half(out, rows, z, chain, bias)
        else:
            if bias is not None and self.defers_bias:
                z += bias
            chain(z, rows, out.batch, out.buf)
        if first:
            out.buf[: out.rows].copy_(z)
            return None
        return self.commit(out.buf, rows, z)

    @staticmethod
    def _finish_half(out, rows, z, chain, bias) -> torch.Tensor:
        """The half-precision epilogue: ``z`` (the kernel's sum, in any float dtype) rounded
        to the state's dtype, then bias and chain in float32, each rounded (see ``HALF``)."""
        dt = out.buf.dtype
        zf = z.to(dt).float()
        if bias is not None:
            zf += bias
            zf = zf.to(dt).float()
        chain(zf, rows, out.batch, out.buf)  # rounds after each step (Chain.dtype is half)
        return zf.to(dt)

    def commit(
        self, buf: torch.Tensor, rows: torch.Tensor | None, z: torch.Tensor
    ) -> torch.Tensor:
        """Write ``z`` (the new values of ``rows``, or of all rows) into ``buf``.

        Returns the sorted rows whose value changed in any channel: the active rows that
        the consumers of this value have to process next.
        """
        if rows is None:
            p = z.shape[0]
            changed = (z != buf[:p]).any(1).nonzero().squeeze(1)
            buf[:p].copy_(z)
            return changed
        if rows.numel() == 0:
            return rows
        old = buf.index_select(0, rows)
        changed = rows[(z != old).any(1)]
        buf.index_copy_(0, rows, z)
        return changed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


@contextlib.contextmanager
def no_tf32():
    """float32 proper in cuDNN and cuBLAS inside the block (TF32 off, and half-precision
    GEMMs reduce in float32, as the engine's kernels do), restored after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction,
              matmul.allow_fp16_reduced_precision_reduction)  # fmt: skip
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (cudnn.allow_tf32, matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction,
         matmul.allow_fp16_reduced_precision_reduction) = before  # fmt: skip
