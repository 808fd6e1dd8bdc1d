"""Fused C++ CPU ops of the engine: the epilogue (bias -> clamp -> quantise -> compare -> write
back) and the sparse depthwise conv (k^2 taps of the listed rows, no im2col copy).

In plain torch ops the epilogue of every layer is seven passes over the computed rows
(clamp, div, round, mul, ne, any, index_copy); on a 2-core CPU they cost about as much as the
GEMMs of MobileNet v1. This op does it in one pass, registered through ``torch.library``
(``deltasparse::quant_commit``) with a fake kernel, and is built on first use with
``torch.utils.cpp_extension.load_inline`` (about 30 s, announced in the log) into a folder
keyed by the torch install (:func:`build_dir`), so virtual environments with different torch
builds never rebuild over each other's copy. The elementwise part is the
same IEEE float32 operations as the torch path (no fast-math, no FMA contraction, round half
to even via ``nearbyint``); the bias is added here, after the GEMM, instead of inside it, so
the two paths agree to float rounding (and both match the dense model to float rounding).

Set ``DELTASPARSE_NO_CPP=1`` to never build it (the engine then uses the torch path), and
``DELTASPARSE_CACHE`` to move the cache (default ``$XDG_CACHE_HOME/deltasparse`` or
``~/.cache/deltasparse``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

__all__ = ["available", "build_dir", "build_error", "build_key", "load", "quant_commit"]

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

// One row: bias -> clamp -> gate -> compare -> write. Specialised per mode so that the
// inner loop has no branches and vectorises (no fast-math: same IEEE ops as the torch path).
// GATE 0: grid quantiser round(v / t) * t; 1: scalar hysteresis (each scalar takes v where
// |v - old| > t, else keeps old); 2: pixel hysteresis (the whole row takes v when any scalar
// does). The changed flag of a hysteresis row is "something was sent".
template <int MODE, bool BIAS, bool CMP, int GATE>
static inline bool commit_row(const float* __restrict zi, float* __restrict bi,
                              const float* __restrict bs, const float* __restrict ti,
                              int64_t C, float lo, float hi) {
  int any = 0;
  if (GATE == 2) {
    for (int64_t c = 0; c < C; ++c) {
      float v = zi[c];
      if (BIAS) v = v + bs[c];
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
      const float t = MODE == 1 ? ti[0] : ti[c];
      any |= (std::fabs(v - bi[c]) > t);
    }
    if (!any) return false;
    for (int64_t c = 0; c < C; ++c) {
      float v = zi[c];
      if (BIAS) v = v + bs[c];
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
      bi[c] = v;
    }
    return true;
  }
  for (int64_t c = 0; c < C; ++c) {
    float v = zi[c];
    if (BIAS) v = v + bs[c];
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    if (GATE == 1) {
      const float t = MODE == 1 ? ti[0] : ti[c];
      const float old = bi[c];
      const int send = std::fabs(v - old) > t;
      any |= send;
      bi[c] = send ? v : old;
      continue;
    }
    if (MODE == 1) v = std::rint(v / ti[0]) * ti[0];
    if (MODE >= 2) v = std::rint(v / ti[c]) * ti[c];
    if (CMP) any |= (v != bi[c]);
    bi[c] = v;
  }
  return any != 0;
}

template <int MODE, bool BIAS, bool CMP, int GATE>
static void commit_all(const float* zp, float* bp, const int64_t* rp, const float* bs,
                       const float* tp, bool* cp, int64_t n, int64_t C, int64_t hw,
                       float lo, float hi) {
  // ~16k elements per task: small calls stay on the calling thread (no wake-up latency).
  const int64_t grain = std::max<int64_t>(16, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rp ? rp[i] : i;
      const float* ti = MODE == 3 ? tp + (r % hw) * C : tp;
      cp[i] = commit_row<MODE, BIAS, CMP, GATE>(zp + i * C, bp + r * C, bs, ti, C, lo, hi);
    }
  });
}

template <int MODE, int GATE>
static void commit_dispatch(const float* zp, float* bp, const int64_t* rp, const float* bs,
                            const float* tp, bool* cp, int64_t n, int64_t C, int64_t hw,
                            float lo, float hi, bool compare) {
  if (bs && compare) commit_all<MODE, true, true, GATE>(zp, bp, rp, bs, tp, cp, n, C, hw, lo, hi);
  else if (bs) commit_all<MODE, true, false, GATE>(zp, bp, rp, bs, tp, cp, n, C, hw, lo, hi);
  else if (compare) commit_all<MODE, false, true, GATE>(zp, bp, rp, bs, tp, cp, n, C, hw, lo, hi);
  else commit_all<MODE, false, false, GATE>(zp, bp, rp, bs, tp, cp, n, C, hw, lo, hi);
}

// z (n, C) float32; buf (P + 1, C) float32; rows (n,) int64 or empty (row i <-> buf row i).
// thr_mode: 0 none, 1 scalar thr[0], 2 per channel thr[c], 3 per position thr[(r % hw) * C + c].
// gate: 0 grid quantiser, 1 scalar hysteresis, 2 pixel hysteresis (needs thr_mode > 0).
torch::Tensor quant_commit(torch::Tensor z, torch::Tensor buf, torch::Tensor rows,
                           torch::Tensor bias, double lo, double hi, torch::Tensor thr,
                           int64_t thr_mode, int64_t hw, bool compare, int64_t gate) {
  TORCH_CHECK(z.dtype() == torch::kFloat32 && buf.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(z.is_contiguous() && buf.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(gate >= 0 && gate <= 2 && (gate == 0 || thr_mode > 0), "bad gate / thr_mode");
  const int64_t n = z.size(0), C = z.size(1);
  auto changed = torch::zeros({n}, z.options().dtype(torch::kBool));
  const float* zp = z.data_ptr<float>();
  float* bp = buf.data_ptr<float>();
  const bool sparse = rows.numel() > 0;
  const int64_t* rp = sparse ? rows.data_ptr<int64_t>() : nullptr;
  const float* tp = thr_mode ? thr.data_ptr<float>() : nullptr;
  const float* bs = bias.numel() ? bias.data_ptr<float>() : nullptr;
  bool* cp = changed.data_ptr<bool>();
  const float flo = (float)lo, fhi = (float)hi;
#define DS_CASE(M, G)                                                                      \
  if (thr_mode == M && gate == G)                                                          \
    commit_dispatch<M, G>(zp, bp, rp, bs, tp, cp, n, C, hw, flo, fhi, compare);
  DS_CASE(0, 0) DS_CASE(1, 0) DS_CASE(2, 0) DS_CASE(3, 0)
  DS_CASE(1, 1) DS_CASE(2, 1) DS_CASE(3, 1) DS_CASE(1, 2) DS_CASE(2, 2) DS_CASE(3, 2)
#undef DS_CASE
  return changed;
}

// Depthwise conv at the listed output rows: y[i, c] = sum_j x[taps[rows[i], j], c] * w[j, c].
// x (P_in + 1, C) float32 (last row zero: padding taps point there); taps (P_out, k2) int64;
// w (k2, C). One output row reads k2 input rows of C contiguous floats (no im2col copy).
torch::Tensor depthwise_rows(torch::Tensor x, torch::Tensor taps, torch::Tensor w,
                             torch::Tensor rows) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && taps.is_contiguous() && w.is_contiguous(), "contiguous only");
  const int64_t C = x.size(1), k2 = taps.size(1), n = rows.size(0);
  auto y = torch::empty({n, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int64_t* tp = taps.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(4, 4096 / std::max<int64_t>(C * k2 / 9, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* yi = yp + i * C;
      const int64_t* ti = tp + rp[i] * k2;
      for (int64_t c = 0; c < C; ++c) yi[c] = 0.f;
      for (int64_t j = 0; j < k2; ++j) {
        const float* xj = xp + ti[j] * C;
        const float* wj = wp + j * C;
        for (int64_t c = 0; c < C; ++c) yi[c] = yi[c] + xj[c] * wj[c];
      }
    }
  });
  return y;
}

TORCH_LIBRARY(deltasparse, m) {
  m.def("depthwise_rows(Tensor x, Tensor taps, Tensor w, Tensor rows) -> Tensor");
  m.def("quant_commit(Tensor z, Tensor(a!) buf, Tensor rows, Tensor bias, float lo, float hi, "
        "Tensor thr, "
        "int thr_mode, int hw, bool compare, int gate=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(deltasparse, CPU, m) {
  m.impl("quant_commit", &quant_commit);
  m.impl("depthwise_rows", &depthwise_rows);
}
"""

_state: dict = {}
# Bump when the C++ source or the flags change (part of the build key and the module name).
_VERSION = 6
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def build_key(torch_version: str, torch_path: str | os.PathLike, python: str = "") -> str:
    """A short hash naming the build of one torch install: its version, the folder it is
    installed in (one per virtual environment) and the Python version."""
    text = "\0".join([str(_VERSION), torch_version, str(Path(torch_path).resolve()), python,
                      hashlib.sha256(_SOURCE.encode()).hexdigest(), " ".join(_CFLAGS)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_dir() -> Path:
    """``<cache>/cpp/<build_key>`` for the running torch install."""
    root = os.environ.get("DELTASPARSE_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltasparse"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = build_key(torch.__version__, Path(torch.__file__).parent, py)
    return Path(root) / "cpp" / key


def build_error() -> str | None:
    """Why the op could not be built (``None`` if it was, or was never tried / disabled)."""
    return _state.get("error")


def load(build: bool = True):
    """The compiled op (``torch.ops.deltasparse.quant_commit``), or None if unavailable."""
    if "op" in _state:
        return _state["op"]
    if os.environ.get("DELTASPARSE_NO_CPP") == "1" or not build:
        return None
    op = None
    name = f"deltasparse_engine_cpp_v{_VERSION}"
    try:
        from torch.utils.cpp_extension import load_inline

        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{name}.so").is_file():
            log.warning("deltasparse: building the C++ engine op (once per torch install, "
                        "~30 s) in %s", folder)  # fmt: skip
        load_inline(
            name=name,
            cpp_sources=[_SOURCE],
            extra_cflags=list(_CFLAGS),
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
        op = torch.ops.deltasparse.quant_commit

        @torch.library.register_fake("deltasparse::quant_commit")
        def _fake(z, buf, rows, bias, lo, hi, thr, thr_mode, hw, compare, gate=0):
            return z.new_empty(z.shape[0], dtype=torch.bool)

        @torch.library.register_fake("deltasparse::depthwise_rows")
        def _fake_dw(x, taps, w, rows):
            return x.new_empty(rows.shape[0], x.shape[1])

    except Exception as exc:  # no compiler, no headers, sandbox: fall back to torch ops
        # Not warned here: the engine that wanted the op warns and lists it in its stats.
        _state["error"] = f"{type(exc).__name__}: {exc}".strip()
        log.debug("deltasparse: C++ engine op unavailable: %s", exc)
        op = None
    _state["op"] = op
    return op


def available() -> bool:
    return load() is not None


def quant_commit(z, buf, rows, bias, lo, hi, thr, thr_mode: int, hw: int, compare: bool,
                 gate: int = 0):
    op = load()
    return op(z, buf, rows, bias, lo, hi, thr, thr_mode, hw, compare, gate)
