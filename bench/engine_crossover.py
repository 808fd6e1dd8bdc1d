"""Measure, per op kind, the row density above which the engine's dense path is faster.

    PYTHONPATH=src python bench/engine_crossover.py [--threads 1] [--out bench/results/engine_crossover.json]

For MobileNet v1 shaped layers (720p and 224 grids) it times the torch backend's sparse
kernel (gather -> GEMM / taps) plus the fused epilogue against the dense path at densities
from 5% to 100%, and reports the first density where sparse >= dense. The engine's default
``crossover`` values (``TorchBackend.crossover``) come from these numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from deltasparse.engine.kernels import ConvSpec, CppBackend, LinearSpec, TorchBackend, WindowGeom
from deltasparse.engine.kernels.geometry import out_size

DENSITIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
# (kind, label, H, W, C_in, C_out, k, stride)
LAYERS = [
    ("linear", "pw 112x112 32->64", 112, 112, 32, 64, 1, 1),
    ("linear", "pw 28x28 256->256", 28, 28, 256, 256, 1, 1),
    ("linear", "pw 90x160 128->128 (720p)", 90, 160, 128, 128, 1, 1),
    ("depthwise", "dw 112x112 x32", 112, 112, 32, 32, 3, 1),
    ("depthwise", "dw 90x160 x128 (720p)", 90, 160, 128, 128, 3, 1),
    ("depthwise", "dw 28x28 x256 s2", 28, 28, 256, 256, 3, 2),
    ("conv", "conv 224x224 3->32 s2", 224, 224, 3, 32, 3, 2),
    ("conv", "conv 56x56 64->64", 56, 56, 64, 64, 3, 1),
]


def _median(fn, reps: int = 7) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", choices=["torch", "cpp"], default="torch")
    p.add_argument("--out", default="bench/results/engine_crossover.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    be = CppBackend() if args.backend == "cpp" else TorchBackend()
    rows = []
    for kind, label, h, w, cin, cout, k, s in LAYERS:
        pad = k // 2
        ho, wo = out_size(h, k, s, pad, 1), out_size(w, k, s, pad, 1)
        geom = WindowGeom(1, (h, w), (ho, wo), (k, k), (s, s), (pad, pad), (1, 1))
        x = torch.randn(h * w + 1, cin)
        x[-1] = 0
        groups = cin if kind == "depthwise" else 1
        wt = torch.randn(cout, cin // groups, k, k) * 0.1
        if kind == "linear":
            spec = LinearSpec(wt.reshape(cout, cin).t().contiguous(), torch.randn(cout))
            fn = be.linear
        else:
            spec = ConvSpec.from_weight(geom, wt, torch.randn(cout), groups)
            fn = be.depthwise if kind == "depthwise" else be.conv
        out = torch.zeros(geom.p_out + 1, cout)
        def run(r, out=out, fn=fn, x=x, spec=spec):
            if r is None:
                return out[:-1].copy_(fn(x, spec, None))
            return out.index_copy_(0, r, fn(x, spec, r))

        dense = _median(lambda: run(None))
        timings = {}
        for d in DENSITIES:
            r = torch.randperm(geom.p_out)[: max(1, int(d * geom.p_out))].sort().values
            timings[d] = _median(lambda r=r: run(r))
        cross = next((d for d in DENSITIES if timings[d] >= dense), 1.0)
        rows.append({"kind": kind, "layer": label, "dense_ms": 1e3 * dense,
                     "sparse_ms": {str(d): 1e3 * t for d, t in timings.items()},
                     "crossover": cross})  # fmt: skip
        print(f"{label:>28}: dense {1e3 * dense:7.2f} ms  crossover {cross:.2f}  " + " ".join(
            f"{d:.2f}:{1e3 * t:.2f}" for d, t in timings.items()), flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"threads": args.threads, "backend": args.backend,
                                    "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
