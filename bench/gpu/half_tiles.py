"""Tile sweep and kernel profile of the bfloat16 whole-step graph (MobileNet v1 or ``--model``,
720p, batch 1).

For each (GEMM, depthwise) tile override (``triton_gpu.TUNE``), or each ``--tune`` variant
(``flat=0``, ``stages=4``, ``gemm=64,64,64,4``; several joined by ``;``), a fresh engine is built
and its CUDA-graph step timed over patch streams of a few change areas (CUDA events, medians),
and its outputs compared bit for bit with the default's; the kernel profile (torch.profiler,
eager graph bodies) is taken at the defaults.

    PYTHONPATH=src python3 bench/gpu/half_tiles.py --out $OUT/half_tiles.json
    PYTHONPATH=src python3 bench/gpu/half_tiles.py --model resnet50 --tune "flat=0" "stages=4"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from engine_gpu import (  # noqa: E402
    engine_density,
    log,
    patch_frames,
    profile_kernels,
    smooth_frame,
    time_steps,
)
from engine_gpu_half import converted, parse_tune  # noqa: E402

from deltasparse.engine import DeltaEngine  # noqa: E402
from deltasparse.engine.kernels import triton_gpu as tg  # noqa: E402

GEMM = [None, (64, 64, 32, 4), (64, 64, 64, 4), (128, 64, 32, 4), (64, 128, 32, 8), (32, 64, 64, 4)]
DW = [None, (32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 32, 4)]


def timed(gm, base, streams, reps) -> dict:
    eng = DeltaEngine(gm, backend="triton")
    eng.step(base)
    out = {}
    for area, fr in streams.items():
        eng.step(fr[0])
        st = eng.stats
        before = (st.effective_macs, st.dense_macs)
        ts = time_steps(eng.step, fr, reps, warmup=2)
        out[str(area)] = {"ms": statistics.median(ts), "density": engine_density(eng, before)}
        out[str(area)]["output"] = eng.step(fr[1]).clone()
    return out, eng


def same_outputs(points: dict, ref: dict) -> dict:
    """Per area: ``points``' output equals ``ref``'s bit for bit; the outputs are dropped."""
    for area, p in points.items():
        p["identical_to_default"] = bool(torch.equal(p.pop("output"), ref[area]["output"]))
    return points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, nargs=2, default=[720, 1280])
    ap.add_argument("--areas", type=float, nargs="+", default=[0.003, 0.04, 1.0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default="mobilenet_v1", help="mobilenet_v1 or a ds.models name")
    ap.add_argument("--tune", nargs="*", default=None,
                    help="TUNE variants instead of the tile sweep, e.g. 'flat=0' 'stages=4'")
    ap.add_argument("--out", default="half_tiles.json")
    args = ap.parse_args(argv)
    dt = getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = True
    gm = converted(args.model, 0.05).to("cuda", dt)
    h, w = args.res
    gen = torch.Generator().manual_seed(7)
    base = smooth_frame((1, 3, h, w), gen, "cuda").to(dt)
    streams = {a: patch_frames(base, a, gen) for a in args.areas}
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "dtype": args.dtype,
           "model": args.model,
           "hw": [h, w], "command": "python3 bench/gpu/half_tiles.py " + " ".join(argv or sys.argv[1:]),
           "runs": []}  # fmt: skip
    r, eng = timed(gm, base, streams, args.reps)
    ref = {a: dict(p) for a, p in r.items()}
    same_outputs(r, ref)
    mid = streams[args.areas[len(args.areas) // 2]]
    res["profile"] = profile_kernels(eng._graph, mid)
    res["runs"].append({"gemm": None, "dw": None, "points": r})
    log("default", r)
    if args.tune is not None:
        for text in args.tune:
            tg.TUNE.clear()
            tg.TUNE.update(parse_tune(text))
            pts, _ = timed(gm, base, streams, args.reps)
            res["runs"].append({"tune": text, "points": same_outputs(pts, ref)})
            log(text, pts)
        tg.TUNE.clear()
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return 0
    best_g = None
    best_ms = r[str(args.areas[len(args.areas) // 2])]["ms"]
    for g in GEMM[1:]:
        tg.TUNE.clear()
        tg.TUNE["gemm"] = g
        r, _ = timed(gm, base, streams, args.reps)
        res["runs"].append({"gemm": g, "dw": None, "points": same_outputs(r, ref)})
        log("gemm", g, r)
        ms = r[str(args.areas[len(args.areas) // 2])]["ms"]
        if ms < best_ms:
            best_g, best_ms = g, ms
    for d in DW[1:]:
        tg.TUNE.clear()
        if best_g:
            tg.TUNE["gemm"] = best_g
        tg.TUNE["dw"] = d
        r, _ = timed(gm, base, streams, args.reps)
        res["runs"].append({"gemm": best_g, "dw": d, "points": same_outputs(r, ref)})
        log("dw", d, r)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
