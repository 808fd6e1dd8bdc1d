"""Benchmark of the token engine: a ViT streamed with token gates vs the dense ViT.

    PYTHONPATH=src python bench/token_engine.py [--threads 1 2] [--frames 12]
    PYTHONPATH=src python bench/token_engine.py --device cuda --arch base --resolutions 1024 \
        --streams 1 --dtypes float32 bfloat16 --out bench/results/token_engine_gpu.json

On CUDA every time is taken with CUDA events after a synchronisation, and the dense baselines
are the ViT in eager mode and as a CUDA graph, per dtype (``--arch base``: ViT-B/16 widths,
embed 768, 12 heads, depth 12).

``vit_tiny`` (ViT-Tiny widths: embed 192, 3 heads, depth 12, patch 16; random weights) at
64x64 (16 tokens) and 224x224 (196 tokens), ``B`` streams of realistic synthetic footage
(sensor noise, moving textured objects). The gates send a fixed budget of tokens per frame
(``policy="fraction"``: 5, 10, 25, 100%), so the executed density is set by the budget; the
dense baseline is the plain ViT (no gates) in eager mode at the same thread count, timed on the
same frames in the same process, interleaved. For each row: median ms per frame, the executed
density counted by the engine (steady state), the ideal speedup ``1 / density`` and the
achieved one, and their ratio (the issue's bar: >= 0.6). Writes JSON (with the command and the
torch version) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import cpu_model

import deltasparse as ds
from deltasparse.benchmark import cuda_graphed
from deltasparse.data.streams import synthetic_stream


class _Timer:
    """Wall-clock on CPU; CUDA events after a synchronisation on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, *args) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn(*args)
            return time.perf_counter() - t0
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3


def _time_dense(timer, fn, frames) -> list[float]:
    with torch.inference_mode():
        return [timer(fn, f) for f in frames]


def _time_engine(timer, eng, frames) -> tuple[list[float], float]:
    """Per-frame times of the steady state (the first frame, dense, is not timed) and the
    executed density of the timed frames."""
    eng.reset()
    eng.step(frames[0])
    s0 = eng.stats
    out = [timer(eng.step, f) for f in frames[1:]]
    s1 = eng.stats
    density = (s1.effective_macs - s0.effective_macs) / (s1.dense_macs - s0.dense_macs)
    return out, density


ARCHS = {"tiny": {}, "base": {"embed_dim": 768, "num_heads": 12, "depth": 12}}


def run(resolution: int, batch: int, threads: int, fractions, frames: int, seed: int, *,
        device: str = "cpu", arch: str = "tiny", dtypes=("float32",),
        scores_cap: int = 0) -> list:  # fmt: skip
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    timer = _Timer(dev)
    base = ds.models.create("vit_tiny", num_classes=10, img_size=resolution, **ARCHS[arch])
    clip32 = [f.to(dev) for f in synthetic_stream(frames + 1, (batch, 3, resolution, resolution),
                                                  noise=0.01, seed=seed)]  # fmt: skip
    rows = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        dense = base.to(dev, dtype).eval()
        clip = [f.to(dtype) for f in clip32]
        baselines = {"eager": dense}
        if dev.type == "cuda":
            baselines["cuda_graph"] = cuda_graphed(dense, clip[0])
        engines = {}
        for f in fractions:
            cfg = ds.DeltaConfig(kind="token", policy="fraction", fraction=f)
            engines[f] = ds.DeltaEngine(ds.convert(dense, cfg).eval())
            engines[f].tokens.scores_cap = scores_cap
        times: dict = {k: [] for k in (*baselines, *fractions)}
        density = {}
        for fn in baselines.values():
            _time_dense(timer, fn, clip[:2])  # warm-up
        for eng in engines.values():
            _time_engine(timer, eng, clip[:3])  # warm-up
        for _ in range(3):  # interleaved rounds: drift of the machine hits every variant alike
            for k, fn in baselines.items():
                times[k] += _time_dense(timer, fn, clip[1:])
            for f, eng in engines.items():
                t, density[f] = _time_engine(timer, eng, clip)
                times[f] += t
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        best = min(baselines, key=lambda k: med[k])
        dense_ms = med[best]
        for f in fractions:
            ms = med[f]
            achieved = dense_ms / ms
            ideal = 1.0 / density[f]
            rows.append({
                "model": f"vit_{arch}", "resolution": resolution,
                "tokens": (resolution // 16) ** 2, "streams": batch, "threads": threads,
                "device": str(dev), "dtype": dname, "budget_fraction": f,
                "executed_density": density[f], "dense_ms_per_frame": dense_ms,
                "dense_baseline": best, "incremental_attention": bool(scores_cap),
                "dense_ms_by_baseline": {k: med[k] for k in baselines},
                "delta_ms_per_frame": ms, "achieved_speedup": achieved, "ideal_speedup": ideal,
                "ratio": achieved / ideal, "ops": eng_ops(engines[f]),
            })  # fmt: skip
            print(f"{resolution:>4}px B={batch} {dname} t={threads} budget={f:.2f} "
                  f"density={density[f]:.3f} dense({best})={dense_ms:.2f}ms delta={ms:.2f}ms "
                  f"speedup={achieved:.2f} ideal={ideal:.2f} ratio={achieved / ideal:.2f}",
                  flush=True)  # fmt: skip
        del engines
    return rows


def eng_ops(eng) -> dict:
    from deltasparse.engine.tokens import token_op_summary

    rt = eng.tokens
    return token_op_summary(rt.op_stats(), rt.frames)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/token_engine.json")
    p.add_argument("--resolutions", nargs="+", type=int, default=[64, 224])
    p.add_argument("--streams", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", nargs="+", type=int, default=[2])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.1, 0.25, 1.0])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHS))
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--incremental-attention", action="store_true",
                   help="keep QK^T and update it for the changed tokens (default: recompute "
                   "attention with SDPA)")
    args = p.parse_args()
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    rows = []
    for res in args.resolutions:
        for b in args.streams:
            for t in args.threads:
                rows += run(res, b, t, args.fractions, args.frames, args.seed,
                            device=args.device, arch=args.arch, dtypes=args.dtypes,
                            scores_cap=(1 << 30) if args.incremental_attention else 0)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "load_avg_at_start": load_start,
                    "load_avg_at_end": os.getloadavg()},  # fmt: skip
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
