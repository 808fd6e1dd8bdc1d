"""Triton kernels of the delta engine (DESIGN.md §4; arXiv 2107.07305's delta inference).

Imported only by :mod:`.triton_gpu` and :mod:`.triton_graph` once triton is known to be
importable: this module imports triton at its top.

Every compute kernel works on a *list of output rows* of a channels-last row buffer
(``(P + 1, C)``, last row zero). The list comes either from the host (the eager backend:
``n_rows`` known, ``DYN=False``) or from a device-side compaction (:func:`compact_kernel`:
``DYN=True``, the count is read from device memory), so that one step of the engine is a
fixed sequence of launches with no host synchronisation and can be captured in a CUDA graph.
The compute kernels are persistent: a fixed grid (of any size) loops over the ``ceil(count / BM)`` row
tiles, so a sparse step costs about the work of its active rows, whatever the capacity.

With ``FUSE=True`` a kernel also applies the op's pointwise chain (clamp, affine, the
DeltaActivation quantiser ``round(z / thr) * thr``, round half to even), compares the new
rows with the stored state, writes them and sets the changed-row mask of its output: the
whole gather -> GEMM -> activation/quantiser -> commit of one op in one launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gpu import ACT_CODES  # the activations' order (_act's codes)

# Chain step kinds (constexpr codes shared with triton_graph.py).
CH_NONE, CH_CLAMP, CH_AFFINE, CH_QSCALAR, CH_QCHANNEL, CH_QROW = 0, 1, 2, 3, 4, 5
# Activations (ops.Chain "act" steps): CH_ACT + the index of their name in ACT_CODES; the
# parameter tensor holds leaky_relu's slope, elu's alpha or prelu's C weights.
CH_ACT = 16


@triton.jit
def _tanh(x):
    """tanh(x) = 2 sigmoid(2x) - 1 (float32; no tanh in triton.language)."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _act(z, p, A: tl.constexpr, offs_n, n_ok):
    """Activation ``A`` (an index of ACT_CODES) on a tile, in the tile's dtype."""
    if A == 0:  # silu
        z = z / (1.0 + tl.exp(-z))
    elif A == 1:  # gelu (erf)
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif A == 2:  # gelu (tanh)
        z = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif A == 3:  # hardswish
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif A == 4:  # hardsigmoid
        z = tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif A == 5:  # sigmoid
        z = 1.0 / (1.0 + tl.exp(-z))
    elif A == 6:
        z = _tanh(z)
    elif A == 7:  # leaky_relu: p = [slope]
        z = tl.where(z > 0.0, z, z * tl.load(p).to(z.dtype))
    elif A == 8:  # elu: p = [alpha]
        z = tl.where(z > 0.0, z, tl.load(p).to(z.dtype) * (tl.exp(z) - 1.0))
    elif A == 9:  # mish: z * tanh(softplus(z)), softplus linear above 20 (as torch)
        sp = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))
        z = z * _tanh(sp)
    else:  # prelu: p = [weight (N)]
        w = tl.load(p + offs_n, mask=n_ok, other=0.0).to(z.dtype)
        z = tl.where(z >= 0.0, z, z * w[None, :])
    return z


@triton.jit
def _rint(x):
    """Round half to even (``torch.round``), exact for every finite float."""
    r = tl.floor(x)
    f = x - r  # exact: x and floor(x) share the exponent range
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _chain_step(z, p, KIND: tl.constexpr, rows, offs_n, n_ok, N, HW, IS_F64: tl.constexpr):
    """One pointwise step of an op's chain on a ``(BM, BN)`` tile (see ops.Chain)."""
    if KIND == 1:  # clamp: p = [lo, hi] (+-inf for a missing bound)
        lo = tl.load(p).to(z.dtype)
        hi = tl.load(p + 1).to(z.dtype)
        z = tl.minimum(tl.maximum(z, lo), hi)
    elif KIND == 2:  # affine: p = [alpha (N), beta (N)]
        a = tl.load(p + offs_n, mask=n_ok, other=1.0).to(z.dtype)
        b = tl.load(p + N + offs_n, mask=n_ok, other=0.0).to(z.dtype)
        z = z * a[None, :]
        z = z + b[None, :]
    elif KIND >= 16:  # an activation
        z = _act(z, p, KIND - 16, offs_n, n_ok)
    elif KIND >= 3:  # quantiser round(z / thr) * thr; thr float32, math in z's dtype
        if KIND == 3:
            t = tl.load(p).to(z.dtype)
        elif KIND == 4:
            t = tl.load(p + offs_n, mask=n_ok, other=1.0).to(z.dtype)[None, :]
        else:  # neuron granularity: thr (HW, N), indexed by the pixel of the row
            pix = (rows % HW).to(tl.int64)
            t = tl.load(p + pix[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=1.0)
            t = t.to(z.dtype)
        if IS_F64:
            q = z / t
        else:
            q = tl.div_rn(z, t)
        z = _rint(q) * t
    return z


@triton.jit
def _round(z, KIND: tl.constexpr, out_ty: tl.constexpr, HALF: tl.constexpr):
    """A half-precision engine rounds each op's result to its dtype (kernels/base.py HALF)."""
    if HALF and KIND != 0:
        z = z.to(out_ty).to(tl.float32)
    return z


@triton.jit
def _sum_bias(acc, b_ptr, offs_n, n_ok, out_ty: tl.constexpr, HAS_BIAS: tl.constexpr,
              HALF: tl.constexpr):  # fmt: skip
    """The op's sum (float32 for half: rounded to the dtype first), plus its bias (rounded)."""
    acc = _round(acc, 1, out_ty, HALF)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
        acc = _round(acc, 1, out_ty, HALF)
    return acc


@triton.jit
def _epilogue(acc, rows, offs_m, m_ok, offs_n, n_ok, y_ptr, mo_ptr, N, HW,
              s0, s1, s2, s3, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
              K3: tl.constexpr, FUSE: tl.constexpr, IS_F64: tl.constexpr,
              HALF: tl.constexpr):  # fmt: skip
    ok2 = m_ok[:, None] & n_ok[None, :]
    out_ty = y_ptr.dtype.element_ty
    if FUSE:
        acc = _round(_chain_step(acc, s0, K0, rows, offs_n, n_ok, N, HW, IS_F64), K0, out_ty, HALF)
        acc = _round(_chain_step(acc, s1, K1, rows, offs_n, n_ok, N, HW, IS_F64), K1, out_ty, HALF)
        acc = _round(_chain_step(acc, s2, K2, rows, offs_n, n_ok, N, HW, IS_F64), K2, out_ty, HALF)
        acc = _round(_chain_step(acc, s3, K3, rows, offs_n, n_ok, N, HW, IS_F64), K3, out_ty, HALF)
        acc = acc.to(out_ty)
        rows64 = rows.to(tl.int64)
        yp = y_ptr + rows64[:, None] * N + offs_n[None, :]
        old = tl.load(yp, mask=ok2, other=0.0)
        diff = ((acc != old) & ok2).to(tl.int32)
        tl.store(yp, acc, mask=ok2)
        ch = tl.max(diff, axis=1)
        # Several programs may mark one row (other channel tiles): they all write 1.
        tl.store(mo_ptr + rows64, ch.to(tl.int8), mask=m_ok & (ch > 0))
    else:
        yp = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(yp, acc.to(out_ty), mask=ok2)


@triton.jit
def _tile(t, num_n, n, idx_ptr, N, BM: tl.constexpr, BN: tl.constexpr):
    """Tile ``t`` of a persistent loop over ``ceil(n / BM) x num_n`` tiles: its ``BM`` listed
    output rows (``rows``, valid where ``m_ok``) and its ``BN`` channels of ``N``."""
    pm = t // num_n
    pn = t - pm * num_n
    offs_m = pm * BM + tl.arange(0, BM)
    m_ok = offs_m < n
    rows = tl.load(idx_ptr + offs_m, mask=m_ok, other=0)
    offs_n = pn * BN + tl.arange(0, BN)
    return offs_m, m_ok, rows, offs_n, offs_n < N


@triton.jit
def _out_pos(rows, HWo, Wo):
    """``(sample, y, x)`` of output rows ``b * HWo + y * Wo + x``."""
    bi = rows // HWo
    r = rows - bi * HWo
    oy = r // Wo
    return bi, oy, r - oy * Wo


@triton.jit
def _listed(cnt_ptr, n_rows, DYN: tl.constexpr):
    """How many rows are listed: read on the device (``DYN``, a compaction counted them), or
    given by the host."""
    if DYN:
        n = tl.load(cnt_ptr)
    else:
        n = n_rows
    return n


@triton.jit
def _tap(bi, oy, ox, m_ok, ky, kx, H, W, SH: tl.constexpr, SW: tl.constexpr,
         PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):  # fmt: skip
    """Tap ``(ky, kx)`` of the output rows' windows: where it lies inside the input (and the
    row is valid), and the input rows it reads (int64)."""
    iy = oy * SH - PH + ky * DH
    ix = ox * SW - PW + kx * DW
    ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return ok, ((bi * H + iy) * W + ix).to(tl.int64)


@triton.jit
def _acc(BM: tl.constexpr, BN: tl.constexpr, init: tl.constexpr, IS_F64: tl.constexpr):
    """A ``(BM, BN)`` accumulator filled with ``init``: float64, else float32 (half precision
    accumulates in float32)."""
    if IS_F64:
        acc = tl.full((BM, BN), init, dtype=tl.float64)
    else:
        acc = tl.full((BM, BN), init, dtype=tl.float32)
    return acc


@triton.jit
def _mac(acc, a, b, IS_F64: tl.constexpr, HALF: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b``: float64 as an exact broadcast sum, half precision on tensor cores into
    the float32 ``acc``, float32 at ``PREC`` (ieee, tf32, tf32x3)."""
    if IS_F64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif HALF:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def rows_gemm_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, cnt_ptr, n_rows, y_ptr, mo_ptr, ws_ptr,
    s0, s1, s2, s3, K, N, HW, CAP,
    HAS_BIAS: tl.constexpr, DYN: tl.constexpr, FUSE: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    IS_F64: tl.constexpr, PREC: tl.constexpr, HALF: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """``y[rows] = x[rows] @ w (+ bias)``: a ``Linear`` / 1x1 conv on the listed rows.

    ``SPLIT`` > 1: each tile's reduction in ``SPLIT`` parts, each a program of its own, whose
    float32 partial sums go to ``ws`` ``(SPLIT, CAP, N)`` for :func:`split_sum_kernel`.
    """
    pid = tl.program_id(0)
    n = _listed(cnt_ptr, n_rows, DYN)
    num_n = tl.cdiv(N, BN)
    total = tl.cdiv(n, BM) * num_n * SPLIT
    for t in range(pid, total, tl.num_programs(0)):
        part = t % SPLIT
        offs_m, m_ok, rows, offs_n, n_ok = _tile(t // SPLIT, num_n, n, idx_ptr, N, BM, BN)
        rows64 = rows.to(tl.int64)
        acc = _acc(BM, BN, 0.0, IS_F64)
        lo, hi = _k_range(part, K, BK, SPLIT)
        for k0 in range(lo, hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < K
            a = tl.load(x_ptr + rows64[:, None] * K + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            b = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
            acc = _mac(acc, a, b, IS_F64, HALF, PREC)
        _gemm_out(acc, part, rows, offs_m, m_ok, offs_n, n_ok, b_ptr, y_ptr, mo_ptr, ws_ptr, N,
                  HW, CAP, s0, s1, s2, s3, HAS_BIAS, K0, K1, K2, K3, FUSE, IS_F64, HALF,
                  SPLIT)  # fmt: skip


@triton.jit
def _k_range(part, KTOT, BK: tl.constexpr, SPLIT: tl.constexpr):
    """Part ``part`` of a reduction of ``KTOT`` split in ``SPLIT``: ``[lo, hi)``, in ``BK``
    blocks (every part the same number of blocks, the last one shorter)."""
    nb = tl.cdiv(tl.cdiv(KTOT, BK), SPLIT)
    lo = part * nb * BK
    return lo, tl.minimum(KTOT, lo + nb * BK)


@triton.jit
def _gemm_out(acc, part, rows, offs_m, m_ok, offs_n, n_ok, b_ptr, y_ptr, mo_ptr, ws_ptr, N, HW,
              CAP, s0, s1, s2, s3, HAS_BIAS: tl.constexpr, K0: tl.constexpr,
              K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, FUSE: tl.constexpr,
              IS_F64: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    """A GEMM tile's sum: its partial into the workspace (``SPLIT`` > 1), else bias, chain
    and commit."""
    if SPLIT > 1:
        wp = ws_ptr + (part * CAP + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(wp, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        acc = _sum_bias(acc, b_ptr, offs_n, n_ok, y_ptr.dtype.element_ty, HAS_BIAS, HALF)
        _epilogue(acc, rows, offs_m, m_ok, offs_n, n_ok, y_ptr, mo_ptr, N, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, FUSE, IS_F64, HALF)  # fmt: skip


@triton.jit
def split_sum_kernel(
    ws_ptr, b_ptr, idx_ptr, cnt_ptr, n_rows, y_ptr, mo_ptr, s0, s1, s2, s3, N, HW, CAP,
    HAS_BIAS: tl.constexpr, DYN: tl.constexpr, FUSE: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    HALF: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """A split GEMM's sums: its ``SPLIT`` float32 partials added in order (the same order for
    every row and every step), then bias, chain and commit as an unsplit GEMM's."""
    pid = tl.program_id(0)
    n = _listed(cnt_ptr, n_rows, DYN)
    num_n = tl.cdiv(N, BN)
    total = tl.cdiv(n, BM) * num_n
    for t in range(pid, total, tl.num_programs(0)):
        offs_m, m_ok, rows, offs_n, n_ok = _tile(t, num_n, n, idx_ptr, N, BM, BN)
        ok2 = m_ok[:, None] & n_ok[None, :]
        at = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        acc = tl.load(ws_ptr + at, mask=ok2, other=0.0)
        for part in tl.static_range(1, SPLIT):
            acc += tl.load(ws_ptr + (part * CAP).to(tl.int64) * N + at, mask=ok2, other=0.0)
        acc = _sum_bias(acc, b_ptr, offs_n, n_ok, y_ptr.dtype.element_ty, HAS_BIAS, HALF)
        _epilogue(acc, rows, offs_m, m_ok, offs_n, n_ok, y_ptr, mo_ptr, N, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, FUSE, False, HALF)  # fmt: skip


@triton.jit
def taps_gemm_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, cnt_ptr, n_rows, y_ptr, mo_ptr, ws_ptr,
    s0, s1, s2, s3, C, N, H, W, HWo, Wo, HW, CAP,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DYN: tl.constexpr, FUSE: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    IS_F64: tl.constexpr, PREC: tl.constexpr, HALF: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FLAT: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """A ``groups == 1`` k x k conv on the listed output rows: implicit im2col -> GEMM.

    ``w`` is ``ConvSpec.w_taps`` ``(k2 * C, N)``; taps outside the input read zeros.
    ``FLAT`` (``C % BK == 0``): one loop over the ``k2 * C`` reduction, which Triton software-
    pipelines across taps (a loop per tap restarts the pipeline ``k2`` times, and with
    ``C == BK`` has nothing to overlap); the same ``tl.dot`` sequence, so the same sums.
    ``SPLIT`` > 1 (``FLAT`` only): the reduction in parts, as in :func:`rows_gemm_kernel`.
    """
    pid = tl.program_id(0)
    n = _listed(cnt_ptr, n_rows, DYN)
    num_n = tl.cdiv(N, BN)
    total = tl.cdiv(n, BM) * num_n * SPLIT
    for t in range(pid, total, tl.num_programs(0)):
        part = t % SPLIT
        offs_m, m_ok, rows, offs_n, n_ok = _tile(t // SPLIT, num_n, n, idx_ptr, N, BM, BN)
        bi, oy, ox = _out_pos(rows, HWo, Wo)
        acc = _acc(BM, BN, 0.0, IS_F64)
        if FLAT:
            lo, hi = _k_range(part, KH * KW * C, BK, SPLIT)
            for kk in range(lo, hi, BK):
                tap = kk // C
                ky = tap // KW
                ok, src = _tap(bi, oy, ox, m_ok, ky, tap - ky * KW, H, W, SH, SW, PH, PW, DH,
                               DW)  # fmt: skip
                offs_k = kk - tap * C + tl.arange(0, BK)
                a = tl.load(x_ptr + src[:, None] * C + offs_k[None, :], mask=ok[:, None],
                            other=0.0)  # fmt: skip
                wrow = kk + tl.arange(0, BK)
                b = tl.load(w_ptr + wrow[:, None] * N + offs_n[None, :], mask=n_ok[None, :],
                            other=0.0)  # fmt: skip
                acc = _mac(acc, a, b, IS_F64, HALF, PREC)
        else:
            for ky in tl.static_range(KH):
                for kx in tl.static_range(KW):
                    ok, src = _tap(bi, oy, ox, m_ok, ky, kx, H, W, SH, SW, PH, PW, DH, DW)
                    for c0 in range(0, C, BK):
                        offs_k = c0 + tl.arange(0, BK)
                        k_ok = offs_k < C
                        a = tl.load(x_ptr + src[:, None] * C + offs_k[None, :],
                                    mask=ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                        wrow = (ky * KW + kx) * C + offs_k
                        b = tl.load(w_ptr + wrow[:, None] * N + offs_n[None, :],
                                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
                        acc = _mac(acc, a, b, IS_F64, HALF, PREC)
        _gemm_out(acc, part, rows, offs_m, m_ok, offs_n, n_ok, b_ptr, y_ptr, mo_ptr, ws_ptr, N,
                  HW, CAP, s0, s1, s2, s3, HAS_BIAS, K0, K1, K2, K3, FUSE, IS_F64, HALF,
                  SPLIT)  # fmt: skip


@triton.jit
def depthwise_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, cnt_ptr, n_rows, y_ptr, mo_ptr,
    s0, s1, s2, s3, C, H, W, HWo, Wo, HW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DYN: tl.constexpr, FUSE: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    IS_F64: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Depthwise conv on the listed output rows; ``w`` is ``w_taps`` ``(k2, C)``.

    Sums bias + taps in tap order, as the torch backend does (half precision: the taps in
    float32, rounded, then the bias).
    """
    pid = tl.program_id(0)
    n = _listed(cnt_ptr, n_rows, DYN)
    num_c = tl.cdiv(C, BC)
    total = tl.cdiv(n, BM) * num_c
    for t in range(pid, total, tl.num_programs(0)):
        offs_m, m_ok, rows, offs_c, c_ok = _tile(t, num_c, n, idx_ptr, C, BM, BC)
        bi, oy, ox = _out_pos(rows, HWo, Wo)
        acc = _acc(BM, BC, 0.0, IS_F64)
        if HAS_BIAS and not HALF:
            acc += tl.load(b_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
        for ky in tl.static_range(KH):
            for kx in tl.static_range(KW):
                ok, src = _tap(bi, oy, ox, m_ok, ky, kx, H, W, SH, SW, PH, PW, DH, DW)
                xv = tl.load(x_ptr + src[:, None] * C + offs_c[None, :],
                             mask=ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
                wv = tl.load(w_ptr + (ky * KW + kx) * C + offs_c, mask=c_ok, other=0.0)
                acc += xv.to(acc.dtype) * wv.to(acc.dtype)[None, :]
        if HALF:
            acc = _sum_bias(acc, b_ptr, offs_c, c_ok, y_ptr.dtype.element_ty, HAS_BIAS, HALF)
        _epilogue(acc, rows, offs_m, m_ok, offs_c, c_ok, y_ptr, mo_ptr, C, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, FUSE, IS_F64, HALF)  # fmt: skip


@triton.jit
def grouped_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, cnt_ptr, n_rows, y_ptr, mo_ptr,
    s0, s1, s2, s3, C, N, CG, NG, H, W, HWo, Wo, HW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DYN: tl.constexpr, FUSE: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    IS_F64: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """A grouped conv (``CG`` input, ``NG`` output channels per group; groups of a few
    channels, as RegNet's 8, are too narrow for tensor cores) on the listed output rows:
    per output channel, the taps x its group's input channels, multiply-added in tap order,
    then the bias. ``w`` is ``ConvSpec.w_taps`` ``(groups, k2 * CG, NG)``."""
    pid = tl.program_id(0)
    n = _listed(cnt_ptr, n_rows, DYN)
    num_n = tl.cdiv(N, BN)
    total = tl.cdiv(n, BM) * num_n
    for t in range(pid, total, tl.num_programs(0)):
        offs_m, m_ok, rows, offs_n, n_ok = _tile(t, num_n, n, idx_ptr, N, BM, BN)
        bi, oy, ox = _out_pos(rows, HWo, Wo)
        grp = offs_n // NG
        w_at = grp * (KH * KW * CG * NG) + (offs_n - grp * NG)  # tap 0, channel 0 of the group
        c_at = grp * CG
        acc = _acc(BM, BN, 0.0, IS_F64)
        for ky in tl.static_range(KH):
            for kx in tl.static_range(KW):
                ok, src = _tap(bi, oy, ox, m_ok, ky, kx, H, W, SH, SW, PH, PW, DH, DW)
                for j in range(0, CG):
                    xv = tl.load(x_ptr + src[:, None] * C + (c_at + j)[None, :],
                                 mask=ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
                    wv = tl.load(w_ptr + w_at + ((ky * KW + kx) * CG + j) * NG, mask=n_ok,
                                 other=0.0)  # fmt: skip
                    acc += xv.to(acc.dtype) * wv.to(acc.dtype)[None, :]
        acc = _sum_bias(acc, b_ptr, offs_n, n_ok, y_ptr.dtype.element_ty, HAS_BIAS, HALF)
        _epilogue(acc, rows, offs_m, m_ok, offs_n, n_ok, y_ptr, mo_ptr, N, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, FUSE, IS_F64, HALF)  # fmt: skip


@triton.jit
def rows_norm_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, cnt_ptr, y_ptr, mo_ptr, s0, s1, s2, s3, C, HW, eps,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    IS_F64: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """LayerNorm over the ``C`` channels of the listed rows of ``x`` (one tile holds whole
    rows, ``BC >= C``): mean, then the mean square of the deviations, both with correctly
    rounded divisions, ``(x - mean) / sqrt(var + eps) * w + b`` (rounded for half precision),
    then the rest of the op's chain and its commit."""
    pid = tl.program_id(0)
    n = tl.load(cnt_ptr)
    for t in range(pid, tl.cdiv(n, BM), tl.num_programs(0)):
        offs_m, m_ok, rows, offs_c, c_ok = _tile(t, 1, n, idx_ptr, C, BM, BC)
        ok2 = m_ok[:, None] & c_ok[None, :]
        zero = _acc(BM, BC, 0.0, IS_F64)
        v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + offs_c[None, :], mask=ok2,
                    other=0.0).to(zero.dtype) + zero  # fmt: skip
        cf = tl.sum(zero, axis=1) + C  # C as a float vector of the rows
        if IS_F64:  # float64 division and square root round correctly as written
            mean = tl.sum(v, axis=1) / cf
            d = tl.where(ok2, v - mean[:, None], zero)
            z = d / tl.sqrt(tl.sum(d * d, axis=1) / cf + eps)[:, None]
        else:
            mean = tl.div_rn(tl.sum(v, axis=1), cf)
            d = tl.where(ok2, v - mean[:, None], zero)
            var = tl.div_rn(tl.sum(d * d, axis=1), cf)
            z = tl.div_rn(d, tl.sqrt_rn(var + eps)[:, None] + zero)
        w = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(zero.dtype)
        b = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(zero.dtype)
        z = _round(z * w[None, :] + b[None, :], 1, y_ptr.dtype.element_ty, HALF)
        _epilogue(z, rows, offs_m, m_ok, offs_c, c_ok, y_ptr, mo_ptr, C, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, True, IS_F64, HALF)  # fmt: skip


@triton.jit
def _more_changed(m_ptr, act_ptr, offs, ok):
    """The changed rows of one more input of a compaction's block, added to its ``act``."""
    na = tl.sum(tl.load(m_ptr + offs, mask=ok, other=0).to(tl.int32), axis=0)
    if na > 0:
        tl.atomic_add(act_ptr, na)
    return na


@triton.jit
def compact_kernel(
    mi_ptr, mi2_ptr, mi3_ptr, mi4_ptr, src_ptr, idx_ptr, cnt_ptr, act_ptr, act2_ptr, act3_ptr,
    act4_ptr, P_out, P_in, H, W, HWo, Wo, P2, HWB, IDENT: tl.constexpr, NIN: tl.constexpr,
    KS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """List the output rows to recompute: those whose window holds a changed input row.

    Appends them to ``idx`` (unordered across blocks, via one atomic per block) and their
    number to ``cnt``; also adds the number of changed input rows to ``act`` (statistics).
    ``NIN`` > 1 (an elementwise op of ``NIN`` <= 4 inputs, ``IDENT``): a row changed in any
    input; the second has ``P2`` rows, one per ``HWB`` output rows (a per-sample scale:
    ``HWB`` > 1), the third and fourth ``P_in``; the changed rows of input k > 1 are also
    added to ``act<k>`` (statistics: each input's producer).
    ``KS`` > 0 (upsampling): output row ``r`` reads the input rows ``src[r, :KS]``.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_ok = offs < P_in
    mi = tl.load(mi_ptr + offs, mask=in_ok, other=0).to(tl.int32)
    na = tl.sum(mi, axis=0)
    if NIN >= 2:
        na2 = tl.sum(tl.load(mi2_ptr + offs, mask=offs < P2, other=0).to(tl.int32), axis=0)
        if na2 > 0:
            tl.atomic_add(act2_ptr, na2)
        na += na2
        mi2 = tl.load(mi2_ptr + offs // HWB, mask=in_ok, other=0).to(tl.int32)
        mi = tl.maximum(mi, mi2)
    if NIN >= 3:
        na += _more_changed(mi3_ptr, act3_ptr, offs, in_ok)
        mi = tl.maximum(mi, tl.load(mi3_ptr + offs, mask=in_ok, other=0).to(tl.int32))
    if NIN >= 4:
        na += _more_changed(mi4_ptr, act4_ptr, offs, in_ok)
        mi = tl.maximum(mi, tl.load(mi4_ptr + offs, mask=in_ok, other=0).to(tl.int32))
    if na > 0:
        tl.atomic_add(act_ptr, na)
    o_ok = offs < P_out
    if KS > 0:
        f = tl.zeros((BLOCK,), dtype=tl.int32)
        for k in tl.static_range(KS):
            s = tl.load(src_ptr + offs.to(tl.int64) * KS + k, mask=o_ok, other=0)
            f = tl.maximum(f, tl.load(mi_ptr + s, mask=o_ok, other=0).to(tl.int32))
    elif IDENT:
        f = mi
    else:
        bi = offs // HWo
        r = offs - bi * HWo
        oy = r // Wo
        ox = r - oy * Wo
        f = tl.zeros((BLOCK,), dtype=tl.int32)
        for ky in tl.static_range(KH):
            for kx in tl.static_range(KW):
                ok, src = _tap(bi, oy, ox, o_ok, ky, kx, H, W, SH, SW, PH, PW, DH, DW)
                v = tl.load(mi_ptr + src, mask=ok, other=0).to(tl.int32)
                f = tl.maximum(f, v)
    f = tl.where(o_ok & (f > 0), 1, 0)
    n = tl.sum(f, axis=0)
    if n > 0:
        base = tl.atomic_add(cnt_ptr, n)
        pos = base + tl.cumsum(f, axis=0) - f
        tl.store(idx_ptr + pos, offs, mask=f > 0)


@triton.jit
def _cat_more(acc, v_ptr, rows64, m_ok, offs_n, C0, CV):
    """A concatenation's tile with one more input's channels ``[C0, C0 + CV)`` filled in."""
    inside = (offs_n >= C0) & (offs_n < C0 + CV)
    v = tl.load(v_ptr + rows64[:, None] * CV + (offs_n - C0)[None, :],
                mask=m_ok[:, None] & inside[None, :], other=0.0)  # fmt: skip
    return tl.where(inside[None, :], v.to(acc.dtype), acc)


@triton.jit
def rows_pair_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr, idx_ptr, cnt_ptr, y_ptr, mo_ptr, s0, s1, s2, s3, CA, CB, CC,
    CD, HW, HWB, MODE: tl.constexpr, NIN: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
    K2: tl.constexpr,
    K3: tl.constexpr, IS_F64: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    """An elementwise op of row buffers on the listed rows, fused with its chain and commit
    (half precision: computed in float32 and rounded, as torch does). ``MODE``: 0 ``a + b``
    (residual add), 1 the channel concatenation ``[a, b]`` (``NIN`` 3, 4: ``[a, b, c(, d)]``,
    ``CC``, ``CD`` channels), 2 ``a`` (a pointwise chain on
    its input's rows), 3 ``a * b``, 4 ``a * b[row // HWB]`` (a per-sample scale ``b``: the
    squeeze-excitation product)."""
    pid = tl.program_id(0)
    n = tl.load(cnt_ptr)
    if MODE == 1:
        N = CA + CB + CC + CD  # CC, CD: 0 for fewer inputs
    else:
        N = CA
    num_n = tl.cdiv(N, BN)
    total = tl.cdiv(n, BM) * num_n
    for t in range(pid, total, tl.num_programs(0)):
        offs_m, m_ok, rows, offs_n, n_ok = _tile(t, num_n, n, idx_ptr, N, BM, BN)
        rows64 = rows.to(tl.int64)
        zero = _acc(BM, BN, 0.0, IS_F64)
        if MODE == 1:
            in_a = offs_n < CA
            va = tl.load(a_ptr + rows64[:, None] * CA + offs_n[None, :],
                         mask=m_ok[:, None] & in_a[None, :], other=0.0)  # fmt: skip
            in_b = n_ok & (offs_n >= CA) & (offs_n < CA + CB)
            vb = tl.load(b_ptr + rows64[:, None] * CB + (offs_n - CA)[None, :],
                         mask=m_ok[:, None] & in_b[None, :], other=0.0)  # fmt: skip
            acc = tl.where(in_a[None, :], va.to(zero.dtype) + zero, vb.to(zero.dtype) + zero)
            if NIN >= 3:
                acc = _cat_more(acc, c_ptr, rows64, m_ok, offs_n, CA + CB, CC)
            if NIN >= 4:
                acc = _cat_more(acc, d_ptr, rows64, m_ok, offs_n, CA + CB + CC, CD)
        else:
            ok2 = m_ok[:, None] & n_ok[None, :]
            va = tl.load(a_ptr + rows64[:, None] * CA + offs_n[None, :], mask=ok2, other=0.0)
            va = va.to(zero.dtype)
            if MODE == 2:
                acc = va
            else:
                if MODE == 4:
                    rb = rows64 // HWB
                else:
                    rb = rows64
                vb = tl.load(b_ptr + rb[:, None] * CA + offs_n[None, :], mask=ok2, other=0.0)
                vb = vb.to(zero.dtype)
                if MODE == 0:
                    acc = va + vb
                else:
                    acc = va * vb
                acc = _round(acc, 1, y_ptr.dtype.element_ty, HALF)
        _epilogue(acc, rows, offs_m, m_ok, offs_n, n_ok, y_ptr, mo_ptr, N, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, True, IS_F64, HALF)  # fmt: skip


@triton.jit
def pool_kernel(
    x_ptr, div_ptr, idx_ptr, cnt_ptr, y_ptr, mo_ptr, s0, s1, s2, s3, C, H, W, HWo, Wo, HW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    AVG: tl.constexpr, IS_F64: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr,
    BC: tl.constexpr,
):  # fmt: skip
    """Max pooling on the listed output rows (taps outside the input are skipped, as the
    torch backend's -inf fill does) or, ``AVG``, the sum of the taps over the row's divisor
    (``div``: count_include_pad, ceil mode, divisor_override, as PoolSpec.divisor), fused
    with the chain and commit (half precision: summed in float32, rounded)."""
    pid = tl.program_id(0)
    n = tl.load(cnt_ptr)
    num_c = tl.cdiv(C, BC)
    total = tl.cdiv(n, BM) * num_c
    for t in range(pid, total, tl.num_programs(0)):
        offs_m, m_ok, rows, offs_c, c_ok = _tile(t, num_c, n, idx_ptr, C, BM, BC)
        bi, oy, ox = _out_pos(rows, HWo, Wo)
        if AVG:
            init = 0.0
            acc = _acc(BM, BC, 0.0, IS_F64)
        else:
            init = float("-inf")
            acc = _acc(BM, BC, float("-inf"), IS_F64)
        for ky in tl.static_range(KH):
            for kx in tl.static_range(KW):
                ok, src = _tap(bi, oy, ox, m_ok, ky, kx, H, W, SH, SW, PH, PW, DH, DW)
                xv = tl.load(x_ptr + src[:, None] * C + offs_c[None, :],
                             mask=ok[:, None] & c_ok[None, :], other=init)  # fmt: skip
                if AVG:
                    acc += xv.to(acc.dtype)
                else:
                    # NaN propagates, as torch's max pooling does
                    acc = tl.maximum(acc, xv.to(acc.dtype), propagate_nan=tl.PropagateNan.ALL)
        if AVG:
            d = tl.load(div_ptr + rows.to(tl.int64), mask=m_ok, other=1.0).to(acc.dtype)
            if IS_F64:
                acc = acc / d[:, None]
            else:  # correctly rounded, as torch divides
                acc = tl.div_rn(acc, tl.broadcast_to(d[:, None], (BM, BC)))
            acc = _round(acc, 1, y_ptr.dtype.element_ty, HALF)
        _epilogue(acc, rows, offs_m, m_ok, offs_c, c_ok, y_ptr, mo_ptr, C, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, True, IS_F64, HALF)  # fmt: skip


@triton.jit
def gather_kernel(
    x_ptr, src_ptr, w_ptr, idx_ptr, cnt_ptr, y_ptr, mo_ptr, s0, s1, s2, s3, C, HW,
    KS: tl.constexpr, HAS_W: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
    K2: tl.constexpr, K3: tl.constexpr, IS_F64: tl.constexpr, HALF: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Upsampling on the listed output rows: ``sum_k w[r, k] * x[src[r, k]]`` over ``KS``
    source rows in ``k`` order (``HAS_W`` False, nearest: a copy of ``x[src[r, 0]]``), as
    ops.UpsampleOp computes (half precision: in float32, rounded), fused with chain and commit."""
    pid = tl.program_id(0)
    n = tl.load(cnt_ptr)
    num_c = tl.cdiv(C, BC)
    total = tl.cdiv(n, BM) * num_c
    for t in range(pid, total, tl.num_programs(0)):
        offs_m, m_ok, rows, offs_c, c_ok = _tile(t, num_c, n, idx_ptr, C, BM, BC)
        rows64 = rows.to(tl.int64)
        ok2 = m_ok[:, None] & c_ok[None, :]
        acc = _acc(BM, BC, 0.0, IS_F64)
        for k in tl.static_range(KS):
            s = tl.load(src_ptr + rows64 * KS + k, mask=m_ok, other=0)
            xv = tl.load(x_ptr + s[:, None] * C + offs_c[None, :], mask=ok2, other=0.0)
            xv = xv.to(acc.dtype)
            if HAS_W:
                wk = tl.load(w_ptr + rows64 * KS + k, mask=m_ok, other=0.0).to(acc.dtype)
                acc += xv * wk[:, None]
            else:
                acc = xv
        acc = _round(acc, 1, y_ptr.dtype.element_ty, HALF)
        _epilogue(acc, rows, offs_m, m_ok, offs_c, c_ok, y_ptr, mo_ptr, C, HW,
                  s0, s1, s2, s3, K0, K1, K2, K3, True, IS_F64, HALF)  # fmt: skip


@triton.jit
def input_commit_kernel(f_ptr, y_ptr, mo_ptr, act_ptr, P, C, HW,
                        BLOCK: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """Write an NCHW frame into the input row buffer; mark the pixels that changed."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    bi = offs // HW
    pix = offs - bi * HW
    offs_c = tl.arange(0, BC)
    c_ok = offs_c < C
    ok2 = ok[:, None] & c_ok[None, :]
    src = (bi * C * HW + pix).to(tl.int64)[:, None] + offs_c[None, :].to(tl.int64) * HW
    v = tl.load(f_ptr + src, mask=ok2, other=0.0)
    yp = y_ptr + offs.to(tl.int64)[:, None] * C + offs_c[None, :]
    old = tl.load(yp, mask=ok2, other=0.0)
    ch = tl.max(((v != old) & ok2).to(tl.int32), axis=1)
    tl.store(yp, v, mask=ok2)
    tl.store(mo_ptr + offs, ch.to(tl.int8), mask=ok & (ch > 0))
    nc = tl.sum(ch, axis=0)
    if nc > 0:
        tl.atomic_add(act_ptr, nc)


@triton.jit
def gpool_kernel(
    x_ptr, mi_ptr, y_ptr, mo_ptr, cnt_ptr, act_ptr, s0, s1, s2, s3, HWi, C,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    IS_F64: tl.constexpr, HALF: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
    MEAN: tl.constexpr,
):  # fmt: skip
    """Global average pooling (``MEAN``) or the NCHW flatten ``y[b, c * HWi + p] = x[b * HWi +
    p, c]`` of the samples that have a changed pixel (grid: B x output-channel tiles)."""
    b = tl.program_id(0)
    pc = tl.program_id(1)
    base = b.to(tl.int64) * HWi
    anyc = tl.zeros((BR,), dtype=tl.int32)
    for r0 in range(0, HWi, BR):
        offs_r = r0 + tl.arange(0, BR)
        anyc += tl.load(mi_ptr + base + offs_r, mask=offs_r < HWi, other=0).to(tl.int32)
    na = tl.sum(anyc, axis=0)
    if na > 0 and not MEAN:
        offs_c = pc * BC + tl.arange(0, BC)
        c_ok = offs_c < C * HWi
        ch = offs_c // HWi
        v = tl.load(x_ptr + (base + offs_c - ch * HWi) * C + ch, mask=c_ok, other=0.0)
        rows = tl.zeros((1,), dtype=tl.int32) + b
        _epilogue(v.to(_acc(1, BC, 0.0, IS_F64).dtype)[None, :], rows, rows, rows == b, offs_c,
                  c_ok, y_ptr, mo_ptr, C * HWi, 1, s0, s1, s2, s3, K0, K1, K2, K3, True,
                  IS_F64, HALF)  # fmt: skip
        if pc == 0:
            tl.atomic_add(cnt_ptr, 1)
            tl.atomic_add(act_ptr, na)
    if na > 0 and MEAN:
        offs_c = pc * BC + tl.arange(0, BC)
        c_ok = offs_c < C
        acc = _acc(BR, BC, 0.0, IS_F64)
        for r0 in range(0, HWi, BR):
            offs_r = r0 + tl.arange(0, BR)
            v = tl.load(x_ptr + (base + offs_r)[:, None] * C + offs_c[None, :],
                        mask=(offs_r < HWi)[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
            acc += v.to(acc.dtype)
        z = _round((tl.sum(acc, axis=0) / HWi)[None, :], 1, y_ptr.dtype.element_ty, HALF)
        rows = tl.zeros((1,), dtype=tl.int32) + b
        m_ok = rows == b
        _epilogue(z, rows, rows, m_ok, offs_c, c_ok, y_ptr, mo_ptr, C, 1,
                  s0, s1, s2, s3, K0, K1, K2, K3, True, IS_F64, HALF)  # fmt: skip
        if pc == 0:
            tl.atomic_add(cnt_ptr, 1)
            tl.atomic_add(act_ptr, na)


__all__ = [
    "ACT_CODES",
    "CH_ACT",
    "CH_AFFINE",
    "CH_CLAMP",
    "CH_NONE",
    "CH_QCHANNEL",
    "CH_QROW",
    "CH_QSCALAR",
    "compact_kernel",
    "grouped_kernel",
    "depthwise_kernel",
    "gather_kernel",
    "gpool_kernel",
    "input_commit_kernel",
    "pool_kernel",
    "rows_gemm_kernel",
    "rows_norm_kernel",
    "rows_pair_kernel",
    "taps_gemm_kernel",
    "triton",
]
