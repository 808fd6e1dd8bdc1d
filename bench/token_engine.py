"""CPU benchmark of the token engine: a ViT streamed with token gates vs the dense ViT.

    PYTHONPATH=src python bench/token_engine.py [--threads 1 2] [--frames 12]

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

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def _time_dense(model, frames) -> list[float]:
    out = []
    for f in frames:
        t0 = time.perf_counter()
        model(f)
        out.append(time.perf_counter() - t0)
    return out


def _time_engine(eng, frames) -> tuple[list[float], float]:
    """Per-frame times of the steady state (the first frame, dense, is not timed) and the
    executed density of the timed frames."""
    eng.reset()
    eng.step(frames[0])
    s0 = eng.stats
    out = []
    for f in frames[1:]:
        t0 = time.perf_counter()
        eng.step(f)
        out.append(time.perf_counter() - t0)
    s1 = eng.stats
    density = (s1.effective_macs - s0.effective_macs) / (s1.dense_macs - s0.dense_macs)
    return out, density


def run(resolution: int, batch: int, threads: int, fractions, frames: int, seed: int) -> list:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dense = ds.models.create("vit_tiny", num_classes=10, img_size=resolution).eval()
    clip = list(synthetic_stream(frames + 1, (batch, 3, resolution, resolution), noise=0.01,
                                 seed=seed))  # fmt: skip
    engines = {}
    for f in fractions:
        gm = ds.convert(dense, ds.DeltaConfig(kind="token", policy="fraction", fraction=f)).eval()
        engines[f] = ds.DeltaEngine(gm)
    _time_dense(dense, clip[:2])  # warm-up
    times = {"dense": []}
    density = {}
    for f, eng in engines.items():
        _time_engine(eng, clip[:3])  # warm-up
        times[f] = []
    for _ in range(3):  # interleaved rounds: drift of the machine hits every variant alike
        times["dense"] += _time_dense(dense, clip[1:])
        for f, eng in engines.items():
            t, density[f] = _time_engine(eng, clip)
            times[f] += t
    dense_ms = 1e3 * statistics.median(times["dense"])
    rows = []
    for f in fractions:
        ms = 1e3 * statistics.median(times[f])
        achieved = dense_ms / ms
        ideal = 1.0 / density[f]
        ops = eng_ops(engines[f])
        rows.append({
            "model": "vit_tiny", "resolution": resolution, "tokens": (resolution // 16) ** 2,
            "streams": batch, "threads": threads, "budget_fraction": f,
            "executed_density": density[f], "dense_ms_per_frame": dense_ms,
            "delta_ms_per_frame": ms, "achieved_speedup": achieved, "ideal_speedup": ideal,
            "ratio": achieved / ideal, "ops": ops,
        })  # fmt: skip
        print(f"{resolution:>4}px B={batch} t={threads} budget={f:.2f} density={density[f]:.3f} "
              f"dense={dense_ms:.1f}ms delta={ms:.1f}ms speedup={achieved:.2f} "
              f"ideal={ideal:.2f} ratio={achieved / ideal:.2f}", flush=True)  # fmt: skip
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
    args = p.parse_args()
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    rows = []
    for res in args.resolutions:
        for b in args.streams:
            for t in args.threads:
                rows += run(res, b, t, args.fractions, args.frames, args.seed)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
        "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "load_avg_at_start": load_start,
                    "load_avg_at_end": os.getloadavg()},  # fmt: skip
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
