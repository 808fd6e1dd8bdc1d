"""Fused C++ CPU ops: the engine's epilogue (bias -> clamp -> quantise -> compare -> write
back) and sparse depthwise conv (k^2 taps of the listed rows, no im2col copy), and the
training gate of :class:`~deltasparse.DeltaActivation` on a clip (``gate_forward`` /
``gate_backward``: activation, quantiser or hysteresis, temporal deltas and the loss sums in
one pass forward, the straight-through backward with the sparsity loss's gradient and the
step's gradient in one pass backward, where the torch path takes a dozen passes per layer).

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

The engine's GEMM-shaped ops (1x1 and k x k convs, linear) and window ops (sparse depthwise
rows, max pooling) also run *fused* with that epilogue (``gemm_commit``, ``window_commit``):
the output rows in blocks of up to 256 that stay in cache, each gathered, multiplied (MKL's
SGEMM on one thread per block, which torch's CPU library exports where it links MKL; without
it the engine keeps the unfused oneDNN paths) and committed before the next, so the computed
rows never go to memory and back. They return the changed rows as indices, and
``reachable`` lists the outputs a set of changed inputs reaches, from the window's arithmetic,
in one pass over a byte mask.

Set ``DELTASPARSE_NO_CPP=1`` to never build it (the engine then uses the torch path), and
``DELTASPARSE_CACHE`` to move the cache (default ``$XDG_CACHE_HOME/deltasparse`` or
``~/.cache/deltasparse``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

__all__ = ["available", "build_dir", "build_error", "build_key", "cpu_name", "gate_ops",
           "load", "pixel_loss_op", "quant_commit"]

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// v clamped to [lo, hi]; a NaN stays NaN (as torch.clamp).
static inline float ds_clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

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
      v = ds_clamp(v, lo, hi);
      const float t = MODE == 1 ? ti[0] : ti[c];
      any |= (std::fabs(v - bi[c]) > t);
    }
    if (!any) return false;
    for (int64_t c = 0; c < C; ++c) {
      float v = zi[c];
      if (BIAS) v = v + bs[c];
      v = ds_clamp(v, lo, hi);
      bi[c] = v;
    }
    return true;
  }
  for (int64_t c = 0; c < C; ++c) {
    float v = zi[c];
    if (BIAS) v = v + bs[c];
    v = ds_clamp(v, lo, hi);
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

// commit_dispatch for the runtime (thr_mode, gate) pair (the pairs quant_commit accepts).
static void commit_modes(int64_t thr_mode, int64_t gate, const float* zp, float* bp,
                         const int64_t* rp, const float* bs, const float* tp, bool* cp,
                         int64_t n, int64_t C, int64_t hw, float lo, float hi, bool compare) {
#define DS_CASE(M, G)                                                                      \
  if (thr_mode == M && gate == G)                                                          \
    commit_dispatch<M, G>(zp, bp, rp, bs, tp, cp, n, C, hw, lo, hi, compare);
  DS_CASE(0, 0) DS_CASE(1, 0) DS_CASE(2, 0) DS_CASE(3, 0)
  DS_CASE(1, 1) DS_CASE(2, 1) DS_CASE(3, 1) DS_CASE(1, 2) DS_CASE(2, 2) DS_CASE(3, 2)
#undef DS_CASE
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
  commit_modes(thr_mode, gate, zp, bp, rp, bs, tp, cp, n, C, hw, (float)lo, (float)hi, compare);
  return changed;
}

// The indices of the flagged (nonzero) entries of mask (n bytes), as rp[i] (or i when
// rp is null), in order. Branch-free: a flag that is as
// likely set as not costs a mispredicted branch per byte otherwise (160 us on a 64k mask at
// 25%); here 8 bytes become an 8-bit mask (one multiply), whose set positions a table lists,
// all 8 written and the count advanced by the popcount. Words without a flag are skipped.
struct DsBitPos {
  uint8_t pos[256][8];
  DsBitPos() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int b = 0; b < 8; ++b) if (m >> b & 1) pos[m][k++] = (uint8_t)b;
      for (; k < 8; ++k) pos[m][k] = 0;
    }
  }
};
static const DsBitPos ds_bitpos;

// Writes the count entries (cap, counted before) into op[0, cap), offset by base.
static void ds_compact(const uint8_t* mask, int64_t n, const int64_t* rp, int64_t base,
                       int64_t* op, int64_t cap) {
  int64_t j = 0, i0 = 0;
  for (; i0 + 8 <= n && j + 8 <= cap; i0 += 8) {
    uint64_t w;
    std::memcpy(&w, mask + i0, 8);
    if (w == 0) continue;
    // every nonzero byte to 1 (a bool tensor may hold other nonzero bytes), then byte b to
    // bit b: the products of the bytes and the multiplier's bytes never overlap, and bytes
    // b and 7 - b meet in bit 56 + b
    constexpr uint64_t lo7 = 0x7f7f7f7f7f7f7f7fULL;
    w = ((((w & lo7) + lo7) | w) >> 7) & 0x0101010101010101ULL;
    const unsigned m = (unsigned)((w * 0x0102040810204080ULL) >> 56);
    const uint8_t* p = ds_bitpos.pos[m];
    if (rp) for (int t = 0; t < 8; ++t) op[j + t] = rp[i0 + p[t]];
    else for (int t = 0; t < 8; ++t) op[j + t] = base + i0 + p[t];
    j += __builtin_popcount(m);
  }
  for (int64_t i = i0; i < n && j < cap; ++i)  // the last few: no spare slots to write
    if (mask[i]) op[j++] = rp ? rp[i] : base + i;
}

// Large masks in chunks on torch's threads: the flags of each chunk counted, then every
// chunk compacted at its offset.
static torch::Tensor ds_flagged(const uint8_t* mask, int64_t n, const int64_t* rp,
                                const torch::TensorOptions& opts) {
  const int64_t chunk = 16384, nc = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  std::vector<int64_t> cnt(nc + 1, 0);
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t k = 0;
      for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) k += mask[i] != 0;
      cnt[c + 1] = k;
    }
  });
  for (int64_t c = 0; c < nc; ++c) cnt[c + 1] += cnt[c];
  auto out = torch::empty({cnt[nc]}, opts.dtype(torch::kInt64));
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * chunk, len = std::min(n, i0 + chunk) - i0;
      ds_compact(mask + i0, len, rp ? rp + i0 : nullptr, i0, op + cnt[c], cnt[c + 1] - cnt[c]);
    }
  });
  return out;
}

// flagged(mask (n,) bool, rows (n,) int64 or empty): the indices of the set entries (rows of
// them, when rows are given), as mask.nonzero() / rows[mask] without their ~3x cost.
torch::Tensor flagged(torch::Tensor mask, torch::Tensor rows) {
  TORCH_CHECK(mask.dtype() == torch::kBool && mask.dim() == 1 && mask.is_contiguous(),
              "mask (n,) bool contiguous");
  const bool r = rows.numel() > 0;
  TORCH_CHECK(!r || (rows.dtype() == torch::kInt64 && rows.is_contiguous() &&
                     rows.numel() == mask.numel()), "rows (n,) int64, as many as mask");
  return ds_flagged(reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), mask.numel(),
                    r ? rows.data_ptr<int64_t>() : nullptr, mask.options());
}

// The threshold table of a thr_mode (see quant_commit) for C channels.
static void ds_check_thr(const torch::Tensor& thr, int64_t thr_mode, int64_t C, int64_t hw) {
  TORCH_CHECK(thr_mode >= 0 && thr_mode <= 3, "thr_mode 0..3");
  TORCH_CHECK(thr_mode == 0 || (thr.dtype() == torch::kFloat32 && thr.is_contiguous()),
              "thr float32 contiguous");
  TORCH_CHECK(thr_mode != 1 || thr.numel() >= 1, "thr_mode 1: one threshold");
  TORCH_CHECK(thr_mode != 2 || thr.numel() == C, "thr_mode 2: C_out thresholds");
  TORCH_CHECK(thr_mode != 3 || (hw > 0 && thr.numel() == hw * C),
              "thr_mode 3: hw * C_out thresholds");
}

// The input gate fused with storing the frame: frame (B, C, S) float32 (NCHW, S = H*W);
// every pixel's channels are written to its row of in_buf (P + 1, C) (the input's state, as
// a copy would; in_buf empty: not stored) and run through the epilogue of quant_commit into
// buf (P + 1, C), in one pass over the frame (in chunks that stay in cache). Returns the
// changed pixels (sorted indices; empty when !compare).
template <int MODE, bool CMP, int GATE>
static void frame_all(const float* fp, float* ip, float* bp, const float* tp, bool* cp,
                      int64_t B, int64_t C, int64_t S, int64_t hw, float lo, float hi) {
  const int64_t P = B * S;
  const int64_t grain = std::max<int64_t>(64, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / S, s = begin % S;  // no divisions per pixel
    int64_t pos = MODE == 3 ? begin % hw : 0;
    std::vector<float> scratch(ip ? 0 : C);
    for (int64_t r = begin; r < end; ++r) {
      float* zi = ip ? ip + r * C : scratch.data();
      const float* fi = fp + b * C * S + s;
      if (C == 3) {  // RGB: constant trip counts
        zi[0] = fi[0]; zi[1] = fi[S]; zi[2] = fi[2 * S];
        const float* ti = MODE == 3 ? tp + pos * 3 : tp;
        cp[r] = commit_row<MODE, false, CMP, GATE>(zi, bp + r * 3, nullptr, ti, 3, lo, hi);
      } else {
        for (int64_t c = 0; c < C; ++c) zi[c] = fi[c * S];
        const float* ti = MODE == 3 ? tp + pos * C : tp;
        cp[r] = commit_row<MODE, false, CMP, GATE>(zi, bp + r * C, nullptr, ti, C, lo, hi);
      }
      if (++s == S) { s = 0; ++b; }
      if (MODE == 3 && ++pos == hw) pos = 0;
    }
  });
}

// frame_all for RGB frames and the pixel gate (GATE 2), in blocks of pixels of one image:
// first every pixel's decision from the planar channels (a vectorised pass: contiguous
// loads of the frame, stride-3 loads of the state), then the sent pixels' writes. The same
// comparisons and stores as commit_row<MODE, false, CMP, 2>. MODE 3 needs hw == S.
template <int MODE>
static void frame3_pixel(const float* fp, float* ip, float* bp, const float* tp, bool* cp,
                         int64_t B, int64_t S, float lo, float hi) {
  constexpr int64_t NB = 256;
  const int64_t per = (S + NB - 1) / NB;  // blocks per image
  at::parallel_for(0, B * per, 16, [&](int64_t begin, int64_t end) {
    int32_t send[NB];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per, s0 = (task % per) * NB, n = std::min(NB, S - s0);
      const float* __restrict f0 = fp + b * 3 * S + s0;
      const float* __restrict f1 = f0 + S;
      const float* __restrict f2 = f0 + 2 * S;
      float* __restrict q = bp + (b * S + s0) * 3;
      const float* t = MODE == 3 ? tp + s0 * 3 : tp;
      for (int64_t i = 0; i < n; ++i) {
        const float v0 = ds_clamp(f0[i], lo, hi), v1 = ds_clamp(f1[i], lo, hi),
                    v2 = ds_clamp(f2[i], lo, hi);
        const float* ti = MODE == 3 ? t + 3 * i : t;
        const float t0 = ti[0], t1 = MODE == 1 ? ti[0] : ti[1], t2 = MODE == 1 ? ti[0] : ti[2];
        send[i] = (std::fabs(v0 - q[3 * i]) > t0) | (std::fabs(v1 - q[3 * i + 1]) > t1) |
                  (std::fabs(v2 - q[3 * i + 2]) > t2);
      }
      bool* c = cp + b * S + s0;
      for (int64_t i = 0; i < n; ++i) {
        c[i] = send[i] != 0;
        if (!send[i]) continue;
        q[3 * i] = ds_clamp(f0[i], lo, hi);
        q[3 * i + 1] = ds_clamp(f1[i], lo, hi);
        q[3 * i + 2] = ds_clamp(f2[i], lo, hi);
      }
      if (ip) {
        float* __restrict z = ip + (b * S + s0) * 3;
        for (int64_t i = 0; i < n; ++i) {
          z[3 * i] = f0[i]; z[3 * i + 1] = f1[i]; z[3 * i + 2] = f2[i];
        }
      }
    }
  });
}

torch::Tensor frame_gate(torch::Tensor frame, torch::Tensor in_buf, torch::Tensor buf,
                         double lo, double hi, torch::Tensor thr, int64_t thr_mode, int64_t hw,
                         bool compare, int64_t gate) {
  const bool store = in_buf.numel() > 0;
  TORCH_CHECK(frame.dtype() == torch::kFloat32 && (!store || in_buf.dtype() == torch::kFloat32) &&
              buf.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(frame.dim() == 4 && frame.is_contiguous() && in_buf.is_contiguous() &&
              buf.is_contiguous(), "frame (B, C, H, W), contiguous tensors only");
  const int64_t B = frame.size(0), C = frame.size(1), S = frame.size(2) * frame.size(3);
  TORCH_CHECK(buf.dim() == 2 && buf.size(0) == B * S + 1 && buf.size(1) == C &&
              (!store || buf.sizes() == in_buf.sizes()), "in_buf (or empty), buf (B*H*W + 1, C)");
  TORCH_CHECK(gate >= 0 && gate <= 2 && (gate == 0 || thr_mode > 0), "bad gate / thr_mode");
  ds_check_thr(thr, thr_mode, C, hw);
  TORCH_CHECK(thr_mode != 3 || S % hw == 0, "thr_mode 3: H*W a multiple of hw");
  auto changed = torch::zeros({B * S}, frame.options().dtype(torch::kBool));
  const float* fp = frame.data_ptr<float>();
  float* ip = store ? in_buf.data_ptr<float>() : nullptr;
  float* bp = buf.data_ptr<float>();
  const float* tp = thr_mode ? thr.data_ptr<float>() : nullptr;
  bool* cp = changed.data_ptr<bool>();
  const float flo = (float)lo, fhi = (float)hi;
  const auto* mp = reinterpret_cast<const uint8_t*>(cp);
  if (C == 3 && gate == 2 && (thr_mode == 1 || thr_mode == 2 || (thr_mode == 3 && hw == S))) {
    if (thr_mode == 1) frame3_pixel<1>(fp, ip, bp, tp, cp, B, S, flo, fhi);
    else if (thr_mode == 2) frame3_pixel<2>(fp, ip, bp, tp, cp, B, S, flo, fhi);
    else frame3_pixel<3>(fp, ip, bp, tp, cp, B, S, flo, fhi);
    return ds_flagged(mp, compare ? B * S : 0, nullptr, changed.options());
  }
#define DS_FCASE(M, G)                                                                     \
  if (thr_mode == M && gate == G) {                                                        \
    if (compare) frame_all<M, true, G>(fp, ip, bp, tp, cp, B, C, S, hw, flo, fhi);         \
    else frame_all<M, false, G>(fp, ip, bp, tp, cp, B, C, S, hw, flo, fhi);                \
  }
  DS_FCASE(0, 0) DS_FCASE(1, 0) DS_FCASE(2, 0) DS_FCASE(3, 0)
  DS_FCASE(1, 1) DS_FCASE(2, 1) DS_FCASE(3, 1) DS_FCASE(1, 2) DS_FCASE(2, 2) DS_FCASE(3, 2)
#undef DS_FCASE
  return ds_flagged(mp, compare ? B * S : 0, nullptr, changed.options());
}

// Window ops at output rows (the listed `rows`, or every row when `all`): mode 0 depthwise
// conv y[i, c] = sum_j x[taps[r, j], c] * w[j, c] (fused multiply-adds, taps in order);
// mode 1 max pooling y[i, c] = max_j x[taps[r, j], c] over the valid taps (padding taps point
// to the last row of x and are skipped; a NaN wins, as in F.max_pool2d). x (P_in + 1, C)
// float32 (last row zero); taps (P_out, k2) int64; w (k2, C) (mode 0). One output row reads
// k2 input rows of C contiguous floats (no im2col copy); channels in blocks of 64 kept in
// registers across the taps.
template <int MODE, int CB>
static inline void window_block(const float* __restrict xp, const int64_t* __restrict ti,
                                const float* __restrict wp, float* __restrict yi, int64_t C,
                                int64_t c0, int64_t cn, int64_t k2, int64_t pad) {
  // CB > 0: a block of CB channels (a constant trip count: the sums stay in registers
  // across the taps); CB == 0: the last cn channels
  const int64_t m = CB > 0 ? CB : cn;
  float acc[CB > 0 ? CB : 16];
  if (MODE == 0) {
    const float* x0 = xp + ti[0] * C + c0;
    const float* w0 = wp + c0;
    for (int64_t c = 0; c < m; ++c) acc[c] = x0[c] * w0[c];
    for (int64_t j = 1; j < k2; ++j) {
      const float* xj = xp + ti[j] * C + c0;
      const float* wj = wp + j * C + c0;
      for (int64_t c = 0; c < m; ++c) acc[c] = std::fma(xj[c], wj[c], acc[c]);
    }
  } else {
    for (int64_t c = 0; c < m; ++c) acc[c] = -INFINITY;
    for (int64_t j = 0; j < k2; ++j) {
      if (ti[j] == pad) continue;
      const float* xj = xp + ti[j] * C + c0;
      for (int64_t c = 0; c < m; ++c) {
        const float v = xj[c];
        acc[c] = (v > acc[c] || v != v) ? v : acc[c];
      }
    }
  }
  for (int64_t c = 0; c < m; ++c) yi[c0 + c] = acc[c];
}

template <int MODE>
static inline void window_row(const float* xp, const int64_t* ti, const float* wp, float* yi,
                              int64_t C, int64_t k2, int64_t pad) {
  int64_t c0 = 0;
  for (; c0 + 32 <= C; c0 += 32) window_block<MODE, 32>(xp, ti, wp, yi, C, c0, 32, k2, pad);
  for (; c0 + 16 <= C; c0 += 16) window_block<MODE, 16>(xp, ti, wp, yi, C, c0, 16, k2, pad);
  if (c0 < C) window_block<MODE, 0>(xp, ti, wp, yi, C, c0, C - c0, k2, pad);
}

// Depthwise 3x3 rows with the weights of a block of 16 channels held in registers across
// the rows (the loops of window_block interchanged: the same multiply-adds in the same
// order, so the same floats; the weights are loaded once per block of rows, not per row).
static inline void dw9_rows(const float* __restrict xp, const int64_t* __restrict tp,
                            const int64_t* __restrict rp, const float* __restrict wp,
                            float* __restrict y, int64_t i0, int64_t m, int64_t C) {
  constexpr int CB = 16, K2 = 9;
  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    float w[K2][CB];
    for (int j = 0; j < K2; ++j)
      for (int c = 0; c < CB; ++c) w[j][c] = wp[j * C + c0 + c];
    for (int64_t i = 0; i < m; ++i) {
      const int64_t* ti = tp + (rp ? rp[i0 + i] : i0 + i) * K2;
      float acc[CB];
      const float* x0 = xp + ti[0] * C + c0;
      for (int c = 0; c < CB; ++c) acc[c] = x0[c] * w[0][c];
      for (int j = 1; j < K2; ++j) {
        const float* xj = xp + ti[j] * C + c0;
        for (int c = 0; c < CB; ++c) acc[c] = std::fma(xj[c], w[j][c], acc[c]);
      }
      float* yi = y + i * C + c0;
      for (int c = 0; c < CB; ++c) yi[c] = acc[c];
    }
  }
}

// Depthwise conv (mode 0) or max pooling (mode 1) rows: compute(i0, m, y) writes rows
// i0..i0+m of the n listed rows (rp) or of all rows (rp null).
struct DsWindow {
  const float* xp; const float* wp; const int64_t* tp; const int64_t* rp;
  int64_t C, k2, pad, mode;
  void operator()(int64_t i0, int64_t m, float* y) const {
    if (mode == 0 && k2 == 9 && C % 16 == 0) {
      dw9_rows(xp, tp, rp, wp, y, i0, m, C);
      return;
    }
    for (int64_t i = 0; i < m; ++i) {
      const int64_t* ti = tp + (rp ? rp[i0 + i] : i0 + i) * k2;
      if (mode == 0) window_row<0>(xp, ti, wp, y + i * C, C, k2, pad);
      else window_row<1>(xp, ti, wp, y + i * C, C, k2, pad);
    }
  }
};

static DsWindow ds_window(torch::Tensor x, torch::Tensor taps, torch::Tensor w,
                          torch::Tensor rows, bool all, int64_t mode) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x (P_in + 1, C) float32");
  TORCH_CHECK(taps.dtype() == torch::kInt64 && taps.dim() == 2, "taps (P_out, k2) int64");
  TORCH_CHECK(x.is_contiguous() && taps.is_contiguous(), "contiguous only");
  TORCH_CHECK(mode == 0 || mode == 1, "mode 0 (depthwise) or 1 (max)");
  DsWindow d;
  d.C = x.size(1); d.k2 = taps.size(1); d.pad = x.size(0) - 1; d.mode = mode;
  TORCH_CHECK(mode == 1 || (w.dtype() == torch::kFloat32 && w.is_contiguous() &&
                            w.size(0) == d.k2 && w.size(1) == d.C), "w (k2, C) float32");
  TORCH_CHECK(all || (rows.dtype() == torch::kInt64 && rows.is_contiguous()), "rows int64");
  d.xp = x.data_ptr<float>();
  d.wp = mode == 0 ? w.data_ptr<float>() : nullptr;
  d.tp = taps.data_ptr<int64_t>();
  d.rp = all ? nullptr : rows.data_ptr<int64_t>();
  return d;
}

torch::Tensor window_rows(torch::Tensor x, torch::Tensor taps, torch::Tensor w,
                          torch::Tensor rows, bool all, int64_t mode) {
  const DsWindow d = ds_window(x, taps, w, rows, all, mode);
  const int64_t n = all ? taps.size(0) : rows.size(0);
  auto y = torch::empty({n, d.C}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(4, 4096 / std::max<int64_t>(d.C * d.k2 / 9, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    d(begin, end - begin, yp + begin * d.C);
  });
  return y;
}

// Fused compute + commit: the output rows of an op in blocks that stay in cache, each block
// computed into a thread's scratch and run through commit_row into buf at once (no (n, C)
// result written to memory and read back, no second pass). Returns the changed output rows
// (sorted as `rows`; empty when !compare, the first frame).
// MKL's column-major SGEMM, exported by torch's CPU library where it links MKL (weak: absent
// elsewhere, then at::mm_out computes the block).
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b,
                       const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));

bool ds_has_sgemm() { return sgemm_ != nullptr; }

// z (m, N) = a (m, K) @ w (K, N), all row-major and contiguous; one thread.
static void ds_block_gemm(const float* a, int64_t m, int64_t K, const float* w, int64_t N,
                          float* z) {
  if (sgemm_ != nullptr) {  // row-major z = a w  <=>  column-major z^T = w^T a^T
    const int M_ = (int)N, N_ = (int)m, K_ = (int)K;
    const float one = 1.f, zero = 0.f;
    sgemm_("N", "N", &M_, &N_, &K_, &one, w, &M_, a, &K_, &zero, z, &M_);
    return;
  }
  auto o = torch::TensorOptions().dtype(torch::kFloat32);
  auto zt = torch::from_blob(z, {m, N}, o);
  at::mm_out(zt, torch::from_blob(const_cast<float*>(a), {m, K}, o),
             torch::from_blob(const_cast<float*>(w), {K, N}, o));
}

template <typename Compute>
static torch::Tensor ds_blocked_commit(int64_t n, int64_t C, int64_t R, const int64_t* rp,
                                       Compute compute, torch::Tensor buf, torch::Tensor bias,
                                       double lo, double hi, torch::Tensor thr,
                                       int64_t thr_mode, int64_t hw, bool compare,
                                       int64_t gate) {
  TORCH_CHECK(buf.dtype() == torch::kFloat32 && buf.is_contiguous() && buf.dim() == 2 &&
              buf.size(1) == C, "buf (P + 1, C_out) float32 contiguous");
  TORCH_CHECK(gate >= 0 && gate <= 2 && (gate == 0 || thr_mode > 0), "bad gate / thr_mode");
  ds_check_thr(thr, thr_mode, C, hw);
  TORCH_CHECK(thr_mode != 3 || (buf.size(0) - 1) % hw == 0, "thr_mode 3: rows a multiple of hw");
  TORCH_CHECK(bias.numel() == 0 || (bias.dtype() == torch::kFloat32 && bias.numel() == C),
              "bias (C_out,) float32");
  const int64_t p_out = buf.size(0) - 1;
  for (int64_t i = 0; rp && i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < p_out, "row ", rp[i], " outside [0, ", p_out, ")");
  std::vector<uint8_t> mask(compare ? n : 0);
  float* bp = buf.data_ptr<float>();
  const float* tp = thr_mode ? thr.data_ptr<float>() : nullptr;
  const float* bs = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float flo = (float)lo, fhi = (float)hi;
  const int64_t nb = (n + R - 1) / R;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> z(R * C);
    std::vector<int64_t> ids(rp ? 0 : R);
    std::vector<uint8_t> ch(compare ? 0 : R);  // the first frame's flags, not kept
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * R, m = std::min(R, n - i0);
      compute(i0, m, z.data());
      const int64_t* r = rp ? rp + i0 : ids.data();
      if (!rp) for (int64_t i = 0; i < m; ++i) ids[i] = i0 + i;
      bool* cp = reinterpret_cast<bool*>(compare ? mask.data() + i0 : ch.data());
      commit_modes(thr_mode, gate, z.data(), bp, r, bs, tp, cp, m, C, hw, flo, fhi, compare);
    }
  });
  return ds_flagged(mask.data(), compare ? n : 0, rp, buf.options());
}

// Rows of a block: enough to amortise a GEMM call, few enough that the gathered inputs and
// the block's outputs stay in L2 (~256 KB).
static int64_t ds_block_rows(int64_t k, int64_t c) {
  return std::max<int64_t>(16, std::min<int64_t>(256, 65536 / std::max<int64_t>(k + c, 1)));
}

// The rows of a GEMM: a Linear / 1x1 conv (taps empty: row r reads x[r]) or a k x k conv
// (taps (P_out, k2): row r reads x[taps[r, j]] for j < k2, concatenated), times w (K, C_out).
// compute(i0, m, z) writes rows i0..i0+m of the n listed rows (rp) or of all rows (rp null).
struct DsGemm {
  const float* xp; const float* wp; const int64_t* tp; const int64_t* rp;
  int64_t cin, k2, K, C;
  void operator()(int64_t i0, int64_t m, float* z) const {
    if (!tp && !rp) {  // consecutive rows: the GEMM reads x in place
      ds_block_gemm(xp + i0 * K, m, K, wp, C, z);
      return;
    }
    thread_local std::vector<float> a;
    a.resize(m * K);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = rp ? rp[i0 + i] : i0 + i;
      float* ai = a.data() + i * K;
      if (!tp) {
        std::memcpy(ai, xp + r * cin, cin * sizeof(float));
      } else {
        const int64_t* ti = tp + r * k2;
        if (cin == 3) {  // RGB: an inline copy (a memcpy call per 12-byte tap costs more)
          for (int64_t j = 0; j < k2; ++j) {
            const float* src = xp + ti[j] * 3;
            ai[3 * j] = src[0]; ai[3 * j + 1] = src[1]; ai[3 * j + 2] = src[2];
          }
        } else if (cin < 16) {
          for (int64_t j = 0; j < k2; ++j) {
            const float* src = xp + ti[j] * cin;
            for (int64_t c = 0; c < cin; ++c) ai[j * cin + c] = src[c];
          }
        } else {
          for (int64_t j = 0; j < k2; ++j)
            std::memcpy(ai + j * cin, xp + ti[j] * cin, cin * sizeof(float));
        }
      }
    }
    ds_block_gemm(a.data(), m, K, wp, C, z);
  }
};

static DsGemm ds_gemm(torch::Tensor x, torch::Tensor taps, torch::Tensor rows, bool all,
                      torch::Tensor w, int64_t p_out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x (P_in + 1, C_in) float32 contiguous");
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.dim() == 2 && w.is_contiguous(),
              "w (K, C_out) float32 contiguous");
  const bool g = taps.numel() > 0;
  DsGemm d;
  d.cin = x.size(1); d.k2 = g ? taps.size(1) : 1; d.K = d.k2 * d.cin; d.C = w.size(1);
  TORCH_CHECK(w.size(0) == d.K, "w has ", w.size(0), " rows, the taps give ", d.K);
  TORCH_CHECK(!g || (taps.dtype() == torch::kInt64 && taps.is_contiguous() &&
                     taps.size(0) == p_out), "taps (P_out, k2) int64");
  TORCH_CHECK(g || x.size(0) == p_out + 1, "x and the output: the same rows");
  TORCH_CHECK(all || (rows.dtype() == torch::kInt64 && rows.is_contiguous()), "rows int64");
  d.xp = x.data_ptr<float>(); d.wp = w.data_ptr<float>();
  d.tp = g ? taps.data_ptr<int64_t>() : nullptr;
  d.rp = all ? nullptr : rows.data_ptr<int64_t>();
  return d;
}

// z (n, C_out): the GEMM rows (rows (n,) int64, or every output row when `all`).
torch::Tensor gemm_rows(torch::Tensor x, torch::Tensor taps, torch::Tensor rows, bool all,
                        torch::Tensor w, int64_t p_out) {
  const DsGemm d = ds_gemm(x, taps, rows, all, w, p_out);
  const int64_t n = all ? p_out : rows.size(0), R = ds_block_rows(d.K, d.C);
  auto z = torch::empty({n, d.C}, x.options());
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, (n + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      d(blk * R, std::min(R, n - blk * R), zp + blk * R * d.C);
  });
  return z;
}

// The GEMM rows, then the epilogue of quant_commit into buf (P_out + 1, C_out).
torch::Tensor gemm_commit(torch::Tensor x, torch::Tensor taps, torch::Tensor rows, bool all,
                          torch::Tensor w, torch::Tensor bias, torch::Tensor buf, double lo,
                          double hi, torch::Tensor thr, int64_t thr_mode, int64_t hw,
                          bool compare, int64_t gate) {
  const int64_t p_out = buf.size(0) - 1;
  const DsGemm d = ds_gemm(x, taps, rows, all, w, p_out);
  const int64_t n = all ? p_out : rows.size(0);
  return ds_blocked_commit(n, d.C, ds_block_rows(d.K, d.C), d.rp, d, buf, bias, lo, hi, thr,
                           thr_mode, hw, compare, gate);
}

// Global average pooling rows: sample i of x (B * S + 1, C) averaged over its S rows (summed
// in order, then divided by S); compute(i0, m, y) writes samples i0..i0+m of the n listed
// (rp) or of all samples (rp null).
struct DsMean {
  const float* xp; const int64_t* rp;
  int64_t S, C;
  void operator()(int64_t i0, int64_t m, float* y) const {
    const float inv = (float)S;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t b = rp ? rp[i0 + i] : i0 + i;
      const float* xb = xp + b * S * C;
      float* yi = y + i * C;
      for (int64_t c = 0; c < C; ++c) yi[c] = xb[c];
      for (int64_t s = 1; s < S; ++s) {
        const float* xs = xb + s * C;
        for (int64_t c = 0; c < C; ++c) yi[c] += xs[c];
      }
      for (int64_t c = 0; c < C; ++c) yi[c] /= inv;
    }
  }
};

// Global average pooling of the listed samples (rows, or all when `all`) of x (B * S + 1, C),
// fused with the epilogue of quant_commit into buf (B + 1, C).
torch::Tensor gpool_commit(torch::Tensor x, int64_t S, torch::Tensor rows, bool all,
                           torch::Tensor bias, torch::Tensor buf, double lo, double hi,
                           torch::Tensor thr, int64_t thr_mode, int64_t hw, bool compare,
                           int64_t gate) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x (B * S + 1, C) float32 contiguous");
  TORCH_CHECK(S > 0 && buf.dim() == 2 && x.size(0) == (buf.size(0) - 1) * S + 1 &&
              x.size(1) == buf.size(1), "x (B * S + 1, C), buf (B + 1, C)");
  TORCH_CHECK(all || (rows.dtype() == torch::kInt64 && rows.is_contiguous()), "rows int64");
  DsMean d;
  d.xp = x.data_ptr<float>(); d.rp = all ? nullptr : rows.data_ptr<int64_t>();
  d.S = S; d.C = x.size(1);
  const int64_t n = all ? buf.size(0) - 1 : rows.size(0);
  return ds_blocked_commit(n, d.C, 16, d.rp, d, buf, bias, lo, hi, thr, thr_mode, hw, compare,
                           gate);
}

// window_rows (depthwise conv, mode 0, or max pooling, mode 1) fused with the epilogue.
torch::Tensor window_commit(torch::Tensor x, torch::Tensor taps, torch::Tensor w,
                            torch::Tensor rows, bool all, int64_t mode, torch::Tensor bias,
                            torch::Tensor buf, double lo, double hi, torch::Tensor thr,
                            int64_t thr_mode, int64_t hw, bool compare, int64_t gate) {
  const DsWindow d = ds_window(x, taps, w, rows, all, mode);
  TORCH_CHECK(taps.size(0) == buf.size(0) - 1, "taps (P_out, k2), buf (P_out + 1, C)");
  const int64_t n = all ? taps.size(0) : rows.size(0);
  // ~16 KB of results a block: a third of L1, so that the block's input rows stay there
  // across its channel blocks (64 KB blocks measured 5% slower on the demo model, streamed)
  const int64_t R = std::max<int64_t>(8, std::min<int64_t>(256, 4096 / std::max<int64_t>(d.C, 1)));
  return ds_blocked_commit(n, d.C, R, d.rp, d, buf, bias, lo, hi, thr, thr_mode, hw, compare,
                           gate);
}

// The outputs along one axis whose window (kernel k, stride s, padding p, dilation d, n_out
// outputs) holds input coordinate y; returns how many (at most k) written to o.
static inline int ds_axis_outputs(int64_t y, int64_t k, int64_t s, int64_t p, int64_t d,
                                  int64_t n_out, int64_t* o) {
  int cnt = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = y + p - i * d;  // the window start that puts tap i on y
    if (t < 0) break;  // t falls with i
    const int64_t q = s == 1 ? t : s == 2 ? (t >> 1) : t / s;
    if (q * s != t || q >= n_out) continue;
    o[cnt++] = q;
  }
  return cnt;
}

// Output rows r0..r1 (row oy of image b: r = b * Ho + oy) of the mask of the outputs whose
// window holds a flagged input of `in` (B, H, W bytes): the window's rows ORed into v (a
// row with pw zero bytes before it and enough after), then its taps along the row. The
// geometry comes as arguments (locals): a byte store may alias anything in memory, which
// would keep the loops from vectorising.
static void ds_dilate_rows(const uint8_t* in, uint8_t* mask, uint8_t* v, int64_t r0,
                           int64_t r1, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                           int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                           int64_t pw, int64_t dh, int64_t dw) {
  uint8_t* vr = v + pw;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / Ho, oy = r - b * Ho;
    std::memset(vr, 0, W);
    for (int64_t u = 0; u < kh; ++u) {
      const int64_t y = oy * sh - ph + u * dh;
      if (y < 0 || y >= H) continue;
      const uint8_t* __restrict row = in + (b * H + y) * W;
      uint8_t* __restrict acc = vr;
      for (int64_t x = 0; x < W; ++x) acc[x] |= row[x];
    }
    uint8_t* __restrict o = mask + r * Wo;
    std::memset(o, 0, Wo);
    for (int64_t j = 0; j < kw; ++j) {  // a tap at a time: contiguous when sw == 1
      const uint8_t* __restrict tap = v + j * dw;
      if (sw == 1) for (int64_t ox = 0; ox < Wo; ++ox) o[ox] |= tap[ox];
      else for (int64_t ox = 0; ox < Wo; ++ox) o[ox] |= tap[ox * sw];
    }
  }
}

// The sorted output rows whose window holds one of the `active` input rows (sorted or not),
// computed from the window's arithmetic (no table: the inverse table of a 64-stream 64x64
// input is 19 MB, read at random) into a byte mask over the outputs. Few active rows: each
// marks the outputs it reaches (a few mispredicted branches each, ~10 ns); many: the mask of
// the active inputs is dilated by the window, a vertical OR of whole image rows then a
// horizontal one (branch-free, ~1 ns per output), which is the same set.
torch::Tensor reachable(torch::Tensor active, int64_t B, int64_t H, int64_t W, int64_t Ho,
                        int64_t Wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                        int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK(active.dtype() == torch::kInt64 && active.dim() == 1 && active.is_contiguous(),
              "active (n,) int64");
  TORCH_CHECK(B > 0 && H > 0 && W > 0 && Ho > 0 && Wo > 0 && kh > 0 && kw > 0 && sh > 0 &&
              sw > 0 && ph >= 0 && pw >= 0 && dh > 0 && dw > 0, "bad window geometry");
  const int64_t n = active.size(0), S = H * W, p_in = B * S, So = Ho * Wo, p_out = B * So;
  const int64_t* ap = active.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ap[i] >= 0 && ap[i] < p_in, "reachable: active row ", ap[i], " outside [0, ",
                p_in, ")");
  std::vector<uint8_t> mask(p_out, 0);
  if (n * kh * kw * 8 < p_out + p_in) {
    std::vector<int64_t> oy(kh), ox(kw);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = ap[i];
      const int64_t b = a / S, r = a - b * S, y = r / W, x = r - y * W;
      const int ny = ds_axis_outputs(y, kh, sh, ph, dh, Ho, oy.data());
      const int nx = ds_axis_outputs(x, kw, sw, pw, dw, Wo, ox.data());
      uint8_t* mb = mask.data() + b * So;
      for (int u = 0; u < ny; ++u)
        for (int v = 0; v < nx; ++v) mb[oy[u] * Wo + ox[v]] = 1;
    }
    return ds_flagged(mask.data(), p_out, nullptr, active.options());
  }
  std::vector<uint8_t> in(p_in, 0);
  for (int64_t i = 0; i < n; ++i) in[ap[i]] = 1;
  // one image row ORed over the window's rows, padded so that every tap of every output
  // column reads inside it (pw zeros before, enough after for ceil mode)
  const int64_t right = std::max<int64_t>(0, (Wo - 1) * sw - pw + (kw - 1) * dw - (W - 1));
  const int64_t grain = std::max<int64_t>(1, 4096 / W);  // output rows per task
  const uint8_t* ip = in.data();
  uint8_t* mp = mask.data();
  at::parallel_for(0, B * Ho, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> v(pw + W + right, 0);
    ds_dilate_rows(ip, mp, v.data(), r0, r1, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw);
  });
  return ds_flagged(mask.data(), p_out, nullptr, active.options());
}

// Training gate of DeltaActivation on a clip (B, T, C, ...) float32 (S: the positions), fused: activation ->
// quantiser / hysteresis -> temporal delta -> loss sums (forward) and the straight-through
// backward with the sparsity loss's gradient, in one pass each. Same IEEE float32 operations
// as the torch path (division, round half to even via nearbyint, no FMA contraction).
// act: 0 none, 1 relu, 2 relu6. hyst: hysteresis (else grid). pixel: pixel gate (else scalar).
static inline float ds_act(float v, int64_t act) {
  if (act == 0) return v;
  v = v < 0.f ? 0.f : v;  // NaN stays NaN, as F.relu
  if (act == 2) v = v > 6.f ? 6.f : v;
  return v;
}

// Returns {q, norm, sent} (pixel: norm (B, T-1, S) = ||q_t - q_{t-1}||_2 over channels) or
// {q, stats, sent} (scalar: stats (B, chunks, 2) float64 = sum |d|, count of d != 0); sent
// (B * T * S float 0/1, pixel hysteresis only): the pixels sent, for gate_backward.
std::vector<torch::Tensor> gate_forward(torch::Tensor x, torch::Tensor thr, int64_t act,
                                        bool hyst, bool pixel) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && thr.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.dim() >= 3 && x.is_contiguous() && thr.is_contiguous(), "x (B, T, C, ...)");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t S = B * T * C ? x.numel() / (B * T * C) : 0;
  TORCH_CHECK(thr.numel() == C && T >= 2, "thr (C,), T >= 2");
  auto q = torch::empty_like(x);
  const int64_t CH = 512;
  const int64_t nch = (S + CH - 1) / CH;
  torch::Tensor aux = pixel ? torch::empty({B, T - 1, S}, x.options())
                            : torch::zeros({B, nch, 2}, x.options().dtype(torch::kFloat64));
  // pixel hysteresis: which pixels were sent (the backward replays the gate from x with it)
  // (float 0/1, not bytes: a float select vectorises, a byte one becomes a mispredicted branch)
  torch::Tensor sent = torch::empty({hyst && pixel ? B * T * S : 0}, x.options());
  float* sp_ = sent.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* tp = thr.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  at::parallel_for(0, B * nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(CH), cnt_(CH);
    std::vector<int32_t> gt(CH), nan(CH);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nch, s0 = (task % nch) * CH, n = std::min(CH, S - s0);
      double asum = 0.0, cnt = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t base = ((b * T + t) * C) * S + s0;
        if (hyst && pixel) {  // send a pixel when any channel's |a - ref| > thr (NaN: never)
          for (int64_t i = 0; i < n; ++i) { gt[i] = 0; nan[i] = 0; }
          for (int64_t c = 0; c < C; ++c) {
            const float* xi = xp + base + c * S;
            const float* ri = t ? qp + base + c * S - C * S : qp;
            const float tc = tp[c];
            for (int64_t i = 0; i < n; ++i) {
              const float a = ds_act(xi[i], act);
              const float r = t ? ri[i] : 0.f;
              const float m = std::fabs(a - r) - tc;
              gt[i] |= m > 0.f;
              nan[i] |= m != m;
            }
          }
          float* si = sp_ + (b * T + t) * S + s0;
          for (int64_t i = 0; i < n; ++i) si[i] = (gt[i] & !nan[i]) ? 1.f : 0.f;
          // the write, with the delta norm of the pass below in the same pass (d = q - ref:
          // the same operations, so the same floats)
          for (int64_t i = 0; i < n; ++i) acc[i] = 0.f;
          for (int64_t c = 0; c < C; ++c) {
            const float* xi = xp + base + c * S;
            const float* ri = t ? qp + base + c * S - C * S : qp;
            float* qi = qp + base + c * S;
            for (int64_t i = 0; i < n; ++i) {
              const float a = ds_act(xi[i], act);
              const float r = t ? ri[i] : 0.f;
              const float v = si[i] != 0.f ? a : r;
              qi[i] = v;
              const float d = v - r;
              acc[i] = acc[i] + d * d;
            }
          }
          if (t > 0) {
            float* np = aux.data_ptr<float>() + ((b * (T - 1) + t - 1) * S) + s0;
            for (int64_t i = 0; i < n; ++i) np[i] = std::sqrt(acc[i]);
          }
          continue;
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const float* xi = xp + base + c * S;
            const float* ri = t ? qp + base + c * S - C * S : qp;
            float* qi = qp + base + c * S;
            const float tc = tp[c];
            for (int64_t i = 0; i < n; ++i) {
              const float a = ds_act(xi[i], act);
              if (hyst) {
                const float r = t ? ri[i] : 0.f;
                qi[i] = std::fabs(a - r) > tc ? a : r;
              } else {
                qi[i] = std::nearbyint(a / tc) * tc;
              }
            }
          }
        }
        if (t == 0) continue;
        if (pixel) {
          for (int64_t i = 0; i < n; ++i) acc[i] = 0.f;
          for (int64_t c = 0; c < C; ++c) {
            const float* qi = qp + base + c * S;
            const float* pi = qi - C * S;
            for (int64_t i = 0; i < n; ++i) {
              const float d = qi[i] - pi[i];
              acc[i] = acc[i] + d * d;
            }
          }
          float* np = aux.data_ptr<float>() + ((b * (T - 1) + t - 1) * S) + s0;
          for (int64_t i = 0; i < n; ++i) np[i] = std::sqrt(acc[i]);
        } else {  // per-position partial sums over the channels (they vectorise)
          for (int64_t i = 0; i < n; ++i) { acc[i] = 0.f; cnt_[i] = 0.f; }
          for (int64_t c = 0; c < C; ++c) {
            const float* qi = qp + base + c * S;
            const float* pi = qi - C * S;
            for (int64_t i = 0; i < n; ++i) {
              const float d = qi[i] - pi[i];
              acc[i] = acc[i] + std::fabs(d);
              cnt_[i] = cnt_[i] + (d != 0.f ? 1.f : 0.f);
            }
          }
          for (int64_t i = 0; i < n; ++i) { asum += acc[i]; cnt += cnt_[i]; }
        }
      }
      if (!pixel) {
        double* sp = aux.data_ptr<double>() + (b * nch + task % nch) * 2;
        sp[0] = asum;
        sp[1] = cnt;
      }
    }
  });
  return {q, aux, sent};
}

// Backward. g_t = gq_t + e_t - e_{t+1} with e_t = dL/dd_t (1 <= t < T; e_0 = e_T = 0):
// pixel e = d * (w * gls) (w (B, T-1, S): the loss's per-pixel factor; gls: the gradient of
// the loss sum), scalar e = sgn(d) * gls. Returns {gx, gthr} with gx = g * act'(x) and gthr (B, C) float64 =
// -sum g * levels (levels: grid nearbyint(q / thr), hysteresis q / thr); gq may be empty
// (zero), gthr is empty unless need_thr. q is not stored: it is replayed from x, one channel
// of one sample at a time, with the same operations as the forward (so exactly its values;
// pixel hysteresis takes the forward's `sent`), so that the output may be changed in place.
std::vector<torch::Tensor> gate_backward(torch::Tensor gq, torch::Tensor x, torch::Tensor sent,
                                         torch::Tensor w, double gls, torch::Tensor thr,
                                         int64_t act, bool hyst, bool pixel, bool need_thr) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() >= 3, "x");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t S = B * T * C ? x.numel() / (B * T * C) : 0;
  const bool has_gq = gq.numel() > 0;
  TORCH_CHECK(!has_gq || (gq.is_contiguous() && gq.sizes() == x.sizes()), "gq");
  // w empty: the loss is not in the graph (no e terms; 0 * inf would make NaN)
  const bool has_w = pixel && w.numel() > 0;
  TORCH_CHECK(!has_w || (w.is_contiguous() && w.numel() == B * (T - 1) * S), "w");
  TORCH_CHECK(!(hyst && pixel) || (sent.is_contiguous() && sent.numel() == B * T * S), "sent");
  TORCH_CHECK(thr.dtype() == torch::kFloat32 && thr.is_contiguous() && thr.numel() == C && T >= 2,
              "thr (C,) float32, T >= 2");
  auto gx = torch::empty_like(x);
  auto gthr = need_thr ? torch::zeros({B, C}, x.options().dtype(torch::kFloat64))
                       : torch::empty({0}, x.options().dtype(torch::kFloat64));
  const float* gqp = has_gq ? gq.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const float* snp = hyst && pixel ? sent.data_ptr<float>() : nullptr;
  const float* wp = has_w ? w.data_ptr<float>() : nullptr;
  const float* tp = thr.data_ptr<float>();
  float* gp = gx.data_ptr<float>();
  double* gtp = need_thr ? gthr.data_ptr<double>() : nullptr;
  const float fg = (float)gls;
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tacc(need_thr ? S : 0), r0(S), r1(S), r2(S), zero(S, 0.f);
    std::vector<float> l0(hyst ? 0 : S), l1(hyst ? 0 : S), l2(hyst ? 0 : S);  // grid levels
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, c = task % C;
      const float tc = tp[c];
      double tsum = 0.0;
      if (need_thr) std::fill(tacc.begin(), tacc.end(), 0.f);
      // q of frame t into out, from the previous frame's q (prev), as gate_forward computes it
      auto replay = [&](int64_t t, const float* prev, float* out, float* lev) {
        const float* xi = xp + ((b * T + t) * C + c) * S;
        if (!hyst) {  // the levels are kept for the step's gradient (one division less)
          for (int64_t i = 0; i < S; ++i) {
            const float l = std::nearbyint(ds_act(xi[i], act) / tc);
            lev[i] = l;
            out[i] = l * tc;
          }
        } else if (pixel) {
          const float* si = snp + (b * T + t) * S;
          for (int64_t i = 0; i < S; ++i) {
            const float a = ds_act(xi[i], act);
            out[i] = si[i] != 0.f ? a : prev[i];
          }
        } else {
          for (int64_t i = 0; i < S; ++i) {
            const float a = ds_act(xi[i], act);
            out[i] = std::fabs(a - prev[i]) > tc ? a : prev[i];
          }
        }
      };
      float *qprev = r0.data(), *qcur = r1.data(), *qnext = r2.data();
      float *lprev = l0.data(), *lcur = l1.data(), *lnext = l2.data();
      replay(0, zero.data(), qcur, lcur);
      if (T > 1) replay(1, qcur, qnext, lnext);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t off = ((b * T + t) * C + c) * S;
        const float* w0 = has_w && t ? wp + (b * (T - 1) + t - 1) * S : nullptr;
        const float* w1 = has_w && t + 1 < T ? wp + (b * (T - 1) + t) * S : nullptr;
        float* gi = gp + off;
        if (has_gq) std::memcpy(gi, gqp + off, S * sizeof(float));
        else std::memset(gi, 0, S * sizeof(float));
        // + e_t, then - e_{t+1}: separate loops without branches (they vectorise)
        if (t && has_w)
          for (int64_t i = 0; i < S; ++i) gi[i] = gi[i] + (qcur[i] - qprev[i]) * (w0[i] * fg);
        if (t && !pixel)
          for (int64_t i = 0; i < S; ++i) {
            const float d = qcur[i] - qprev[i];
            gi[i] = gi[i] + (float)((d > 0.f) - (d < 0.f)) * fg;
          }
        if (t + 1 < T && has_w)
          for (int64_t i = 0; i < S; ++i) gi[i] = gi[i] - (qnext[i] - qcur[i]) * (w1[i] * fg);
        if (t + 1 < T && !pixel)
          for (int64_t i = 0; i < S; ++i) {
            const float d = qnext[i] - qcur[i];
            gi[i] = gi[i] - (float)((d > 0.f) - (d < 0.f)) * fg;
          }
        // -sum g * levels: per-position partial sums (they vectorise)
        if (need_thr && hyst)
          for (int64_t i = 0; i < S; ++i) tacc[i] = tacc[i] + gi[i] * (qcur[i] / tc);
        if (need_thr && !hyst)
          for (int64_t i = 0; i < S; ++i) tacc[i] = tacc[i] + gi[i] * lcur[i];
        const float* xi = xp + off;
        if (act == 1)
          for (int64_t i = 0; i < S; ++i) gi[i] = xi[i] <= 0.f ? 0.f : gi[i];  // NaN: passes
        if (act == 2)
          for (int64_t i = 0; i < S; ++i) gi[i] = (xi[i] > 0.f && xi[i] < 6.f) ? gi[i] : 0.f;
        // rotate the three frames: prev <- cur <- next <- q of frame t + 2
        float* spare = qprev;
        qprev = qcur;
        qcur = qnext;
        qnext = spare;
        spare = lprev;
        lprev = lcur;
        lcur = lnext;
        lnext = spare;
        if (t + 2 < T) replay(t + 2, qcur, qnext, lnext);
      }
      if (need_thr) {
        for (int64_t i = 0; i < S; ++i) tsum += tacc[i];
        gtp[b * C + c] = -tsum;
      }
    }
  });
  return {gx, gthr};
}

// The pixel gate's loss from the per-pixel delta norms (N, H, W) of a clip (N = B * (T-1)):
// {loss_sum (float32), factor (N, H, W): dloss/dd = d * factor, nonzero (int64): changed pixels
// times C, weights W (N, H, W; empty for the plain loss)}. spec (int64, empty: the plain group loss W_p = C) lists the consumers of the
// layer (DeltaActivation.spread): [n, then per consumer: macs, windows, then per window:
// global, kh, kw, sh, sw, ph, pw, dh, dw, ceil]. W_p, the MACs of the consumer rows whose
// window has its largest change at p, is exactly what _spread_weights computes with max_pool2d
// (same first-max / NaN rule, same -inf padding emulation, same float32 sums in the same
// order); the loss sum is a float64 sum here (float rounding apart from the torch path).
static int64_t ds_pool_out(int64_t in, int64_t k, int64_t p, int64_t s, int64_t d, bool ceil) {
  int64_t num = in + 2 * p - d * (k - 1) - 1 + (ceil ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil && (out - 1) * s >= in + p) --out;
  return out;
}

// A window of the spec that maps each pixel to itself (1x1, stride 1, no padding, not global).
static inline bool ds_one_window(const int64_t* w) {
  return !w[0] && w[1] == 1 && w[2] == 1 && w[3] == 1 && w[4] == 1 && w[5] == 0 && w[6] == 0 &&
         w[7] == 1 && w[8] == 1 && !w[9];
}

std::vector<torch::Tensor> pixel_loss(torch::Tensor norm, torch::Tensor spec, int64_t c) {
  TORCH_CHECK(norm.dtype() == torch::kFloat32 && norm.dim() == 3 && norm.is_contiguous(),
              "norm (N, H, W) float32");
  TORCH_CHECK(spec.dtype() == torch::kInt64 && spec.is_contiguous() && spec.dim() == 1, "spec");
  const int64_t N = norm.size(0), H = norm.size(1), W = norm.size(2), HW = H * W;
  const bool weighted = spec.numel() > 0;
  const int64_t* sp = spec.data_ptr<int64_t>();
  auto factor = torch::empty_like(norm);
  auto weights = weighted ? torch::empty_like(norm) : torch::empty({0}, norm.options());
  float* wp_ = weighted ? weights.data_ptr<float>() : nullptr;
  const float* np_ = norm.data_ptr<float>();
  float* fp = factor.data_ptr<float>();
  std::vector<double> part(N, 0.0);
  std::vector<int64_t> nz(N, 0);
  bool all_ident = weighted;
  int64_t ident_sum = 0;
  for (int64_t ci = 0, o = 1; weighted && ci < sp[0]; ++ci) {
    const int64_t nw = sp[o + 1];
    for (int64_t k = 0; k < nw; ++k) all_ident = all_ident && ds_one_window(sp + o + 2 + 10 * k);
    ident_sum += sp[o];
    o += 2 + 10 * nw;
  }
  const float sc = (float)std::sqrt((double)c);
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total(HW), vals, nvals;
    std::vector<int64_t> where, nwhere;
    for (int64_t n = begin; n < end; ++n) {
      const float* nm = np_ + n * HW;
      float* fn = fp + n * HW;
      int64_t cnt = 0;
      double acc = 0.0;
      if (!weighted) {
        for (int64_t i = 0; i < HW; ++i) {
          const float v = nm[i];
          cnt += v != 0.f;
          acc += (double)v;
          fn[i] = v > 0.f ? (1.f / (v < 1e-30f ? 1e-30f : v)) * sc : 0.f;
        }
      } else {
        std::fill(total.begin(), total.end(), 0.f);
        // every consumer 1x1: the torch path fills in the MACs' sum (one rounding)
        if (all_ident) std::fill(total.begin(), total.end(), (float)ident_sum);
        int64_t o = 1;
        for (int64_t ci = 0; ci < (all_ident ? 0 : sp[0]); ++ci) {
          const float macs = (float)sp[o];
          const int64_t nw = sp[o + 1];
          const int64_t* win = sp + o + 2;
          o += 2 + 10 * nw;
          bool ident = true;
          for (int64_t k = 0; k < nw; ++k) ident = ident && ds_one_window(win + 10 * k);
          if (ident) {
            for (int64_t i = 0; i < HW; ++i) total[i] = total[i] + macs;
            continue;
          }
          int64_t h = H, wd = W;
          vals.assign(nm, nm + HW);
          where.resize(HW);
          for (int64_t i = 0; i < HW; ++i) where[i] = i;
          for (int64_t k = 0; k < nw; ++k) {
            const int64_t* w = win + 10 * k;
            if (w[0]) {  // global: torch argmax (first maximum; a NaN is the maximum)
              int64_t bi = 0;
              float best = vals[0];
              for (int64_t i = 1; i < h * wd && best == best; ++i) {
                const float v = vals[i];
                if (v > best || v != v) { best = v; bi = i; }
              }
              where = {where[bi]};
              h = wd = 1;
              break;
            }
            int64_t kh = w[1], kw = w[2], sh = w[3], sw = w[4], ph = w[5], pw = w[6];
            const int64_t dh = w[7], dw = w[8];
            const bool ceil = w[9] != 0;
            if (ph > kh / 2 || pw > kw / 2) {  // max_pool2d refuses it: pad with -inf (pos 0)
              const int64_t h2 = h + 2 * ph, w2 = wd + 2 * pw;
              nvals.assign(h2 * w2, ninf);
              nwhere.assign(h2 * w2, 0);
              for (int64_t y = 0; y < h; ++y)
                for (int64_t x = 0; x < wd; ++x) {
                  nvals[(y + ph) * w2 + x + pw] = vals[y * wd + x];
                  nwhere[(y + ph) * w2 + x + pw] = where[y * wd + x];
                }
              vals.swap(nvals);
              where.swap(nwhere);
              h = h2;
              wd = w2;
              ph = pw = 0;
            }
            const int64_t oh = ds_pool_out(h, kh, ph, sh, dh, ceil);
            const int64_t ow = ds_pool_out(wd, kw, pw, sw, dw, ceil);
            TORCH_CHECK(oh > 0 && ow > 0, "pixel_loss: a consumer window of ", kh, "x", kw,
                        " does not fit a ", h, "x", wd, " map");
            nvals.resize(oh * ow);
            nwhere.resize(oh * ow);
            for (int64_t oy = 0; oy < oh; ++oy) {
              int64_t y0 = oy * sh - ph;
              const int64_t y1 = std::min(y0 + (kh - 1) * dh + 1, h);
              while (y0 < 0) y0 += dh;
              for (int64_t ox = 0; ox < ow; ++ox) {
                int64_t x0 = ox * sw - pw;
                const int64_t x1 = std::min(x0 + (kw - 1) * dw + 1, wd);
                while (x0 < 0) x0 += dw;
                TORCH_CHECK(y0 < y1 && x0 < x1, "pixel_loss: a consumer window at (", oy, ", ",
                            ox, ") holds no pixel of the ", h, "x", wd, " map");
                int64_t mi = y0 * wd + x0;
                float mv = ninf;
                for (int64_t y = y0; y < y1; y += dh)
                  for (int64_t x = x0; x < x1; x += dw) {
                    const float v = vals[y * wd + x];
                    if (v > mv || v != v) { mv = v; mi = y * wd + x; }
                  }
                nvals[oy * ow + ox] = mv;
                nwhere[oy * ow + ox] = where[mi];
              }
            }
            vals.swap(nvals);
            where.swap(nwhere);
            h = oh;
            wd = ow;
          }
          for (int64_t r = 0; r < h * wd; ++r) total[where[r]] = total[where[r]] + macs;
        }
        for (int64_t i = 0; i < HW; ++i) {
          const float v = nm[i];
          cnt += v != 0.f;
          acc += (double)(total[i] * v);
          fn[i] = v > 0.f ? total[i] / (sc * (v < 1e-30f ? 1e-30f : v)) : 0.f;
        }
        std::memcpy(wp_ + n * HW, total.data(), HW * sizeof(float));
      }
      part[n] = acc;
      nz[n] = cnt;
    }
  });
  double acc = 0.0;
  int64_t cnt = 0;
  for (int64_t n = 0; n < N; ++n) { acc += part[n]; cnt += nz[n]; }
  const float s = (float)acc;
  auto loss = torch::full({}, weighted ? s / sc : sc * s, norm.options());
  auto nonzero = torch::full({}, cnt * c, norm.options().dtype(torch::kInt64));
  return {loss, factor, nonzero, weights};
}

TORCH_LIBRARY(deltasparse, m) {
  m.def("frame_gate(Tensor frame, Tensor(a!) in_buf, Tensor(b!) buf, float lo, float hi, "
        "Tensor thr, int thr_mode, int hw, bool compare, int gate) -> Tensor");
  m.def("window_rows(Tensor x, Tensor taps, Tensor w, Tensor rows, bool all, int mode) -> Tensor");
  m.def("quant_commit(Tensor z, Tensor(a!) buf, Tensor rows, Tensor bias, float lo, float hi, "
        "Tensor thr, "
        "int thr_mode, int hw, bool compare, int gate=0) -> Tensor");
  m.def("gate_forward(Tensor x, Tensor thr, int act, bool hyst, bool pixel) -> Tensor[]");
  m.def("gate_backward(Tensor gq, Tensor x, Tensor sent, Tensor w, float gls, Tensor thr, "
        "int act, bool hyst, bool pixel, bool need_thr) -> Tensor[]");
  m.def("pixel_loss(Tensor norm, Tensor spec, int c) -> Tensor[]");
  m.def("gemm_commit(Tensor x, Tensor taps, Tensor rows, bool all, Tensor w, Tensor bias, "
        "Tensor(a!) buf, float lo, float hi, Tensor thr, int thr_mode, int hw, bool compare, "
        "int gate) -> Tensor");
  m.def("window_commit(Tensor x, Tensor taps, Tensor w, Tensor rows, bool all, int mode, "
        "Tensor bias, Tensor(a!) buf, float lo, float hi, Tensor thr, int thr_mode, int hw, "
        "bool compare, int gate) -> Tensor");
  m.def("gemm_rows(Tensor x, Tensor taps, Tensor rows, bool all, Tensor w, int p_out) -> Tensor");
  m.def("has_sgemm() -> bool", &ds_has_sgemm);
  m.def("flagged(Tensor mask, Tensor rows) -> Tensor");
  m.def("gpool_commit(Tensor x, int S, Tensor rows, bool all, Tensor bias, Tensor(a!) buf, "
        "float lo, float hi, Tensor thr, int thr_mode, int hw, bool compare, int gate) -> Tensor");
  m.def("reachable(Tensor active, int B, int H, int W, int Ho, int Wo, int kh, int kw, int sh, "
        "int sw, int ph, int pw, int dh, int dw) -> Tensor");
}
TORCH_LIBRARY_IMPL(deltasparse, CPU, m) {
  m.impl("quant_commit", &quant_commit);
  m.impl("window_rows", &window_rows);
  m.impl("frame_gate", &frame_gate);
  m.impl("gate_forward", &gate_forward);
  m.impl("gate_backward", &gate_backward);
  m.impl("pixel_loss", &pixel_loss);
  m.impl("gemm_commit", &gemm_commit);
  m.impl("gemm_rows", &gemm_rows);
  m.impl("reachable", &reachable);
  m.impl("flagged", &flagged);
  m.impl("gpool_commit", &gpool_commit);
  m.impl("window_commit", &window_commit);
}

"""

_state: dict = {}
# Bump when the C++ source or the flags change (part of the build key and the module name).
_VERSION = 18
# -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers (AT_PARALLEL_OPENMP);
# compiled without it the loops run on one thread. With GCC the library links libgomp.so.1,
# which resolves to the copy torch has already loaded (one OpenMP runtime, torch's thread
# count). A compiler without OpenMP gets a second build without it (one thread, warned).
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
_OPENMP = ["-fopenmp"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows. Part of the
    build key (the build is ``-march=native``: a cache shared between machines must not hand
    one CPU's build to another); the benchmarks record it too."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(torch_version: str, torch_path: str | os.PathLike, python: str = "", *,
              openmp: bool = True, cpu: str | None = None) -> str:  # fmt: skip
    """A short hash naming the build of one torch install: its version, the folder it is
    installed in (one per virtual environment), the Python version, the CPU model and the
    flags."""
    flags = _CFLAGS + (_OPENMP if openmp else [])
    text = "\0".join([str(_VERSION), torch_version, str(Path(torch_path).resolve()), python,
                      hashlib.sha256(_SOURCE.encode()).hexdigest(), " ".join(flags),
                      cpu_name() if cpu is None else cpu])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_dir(openmp: bool = True) -> Path:
    """``<cache>/cpp/<build_key>`` for the running torch install."""
    root = os.environ.get("DELTASPARSE_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltasparse"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = build_key(torch.__version__, Path(torch.__file__).parent, py, openmp=openmp)
    return Path(root) / "cpp" / key


def build_error() -> str | None:
    """Why the op could not be built (``None`` if it was, or was never tried / disabled)."""
    return _state.get("error")


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Hold an ``flock`` on ``folder/.deltasparse.lock`` while torch builds or loads the op.

    torch's own build lock is a plain file (``folder/lock``) that a killed build leaves behind,
    and every later build then waits for it forever. The ``flock`` dies with its process:
    whoever holds it is the only live builder, so a ``lock`` file found then is stale and is
    removed (with a warning) instead of hanging.
    """
    import fcntl

    with open(folder / ".deltasparse.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)  # waits only for a live build
        except OSError as exc:  # e.g. ENOLCK on some network filesystems
            log.warning("deltasparse: cannot lock %s (%s); building under torch's own lock "
                        "only (a build killed mid-way then leaves %s/lock behind: remove it)",
                        fh.name, exc, folder)  # fmt: skip
            yield
            return
        try:
            stale = folder / "lock"
            if stale.exists():
                log.warning("deltasparse: removing a stale build lock %s (a build was killed "
                            "before it finished); building again", stale)  # fmt: skip
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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

        for openmp in (True, False):
            folder = build_dir(openmp)
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / f"{name}.so").is_file():
                log.warning("deltasparse: building the C++ engine op (once per torch install, "
                            "~30 s) in %s", folder)  # fmt: skip
            try:
                with _build_lock(folder):
                    load_inline(
                        name=name,
                        cpp_sources=[_SOURCE],
                        extra_cflags=_CFLAGS + (_OPENMP if openmp else []),
                        extra_ldflags=list(_OPENMP if openmp else []),
                        build_directory=str(folder),
                        is_python_module=False,
                        verbose=False,
                    )
                break
            except Exception as exc:
                if not openmp:
                    raise
                log.warning("deltasparse: the C++ ops did not build with OpenMP (%s); trying "
                            "a build without it (its loops then run on one thread)",
                            f"{type(exc).__name__}: {exc}".strip()[:300])  # fmt: skip
        op = torch.ops.deltasparse.quant_commit

        @torch.library.register_fake("deltasparse::quant_commit")
        def _fake(z, buf, rows, bias, lo, hi, thr, thr_mode, hw, compare, gate=0):
            return z.new_empty(z.shape[0], dtype=torch.bool)

        @torch.library.register_fake("deltasparse::frame_gate")
        def _fake_frame(frame, in_buf, buf, lo, hi, thr, thr_mode, hw, compare, gate):
            n = torch.library.get_ctx().new_dynamic_size()
            return frame.new_empty(n, dtype=torch.long)

        @torch.library.register_fake("deltasparse::window_rows")
        def _fake_window(x, taps, w, rows, all, mode):
            return x.new_empty(taps.shape[0] if all else rows.shape[0], x.shape[1])

    except Exception as exc:  # no compiler, no headers, sandbox: fall back to torch ops
        # Not warned here: the engine that wanted the op warns and lists it in its stats.
        _state["error"] = f"{type(exc).__name__}: {exc}".strip()
        log.debug("deltasparse: C++ engine op unavailable: %s", exc)
        op = None
    _state["op"] = op
    return op


def gate_ops():
    """``(gate_forward, gate_backward)`` of the C++ library, or None if it is unavailable."""
    if load() is None:
        return None
    return torch.ops.deltasparse.gate_forward, torch.ops.deltasparse.gate_backward


def pixel_loss_op():
    """``deltasparse::pixel_loss`` (the pixel gate's loss, its gradient factor and count from
    the delta norms, with the receptive-field weights), or None if the library is unavailable."""
    if load() is None:
        return None
    return torch.ops.deltasparse.pixel_loss


def available() -> bool:
    return load() is not None


def quant_commit(z, buf, rows, bias, lo, hi, thr, thr_mode: int, hw: int, compare: bool,
                 gate: int = 0):
    op = load()
    return op(z, buf, rows, bias, lo, hi, thr, thr_mode, hw, compare, gate)
