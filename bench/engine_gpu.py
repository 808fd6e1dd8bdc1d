"""Delta engine vs dense MobileNet v1 on one GPU, side by side in one process.

Dense baselines (batch 1, cuDNN benchmark on, TF32 off, channels_last): the plain model in
fp32 eager, fp32 CUDA-graph replay, fp32 graph with batch norm folded, bf16 graph, and the
converted (quantised) model in fp32 graph. Delta engine (fp32): the triton backend's
CUDA-graph step (IEEE fp32 GEMMs, and optionally 3xTF32), the triton backend through the
engine's per-op driver, and the torch backend (per-op driver) -- over a sweep of input
change areas that gives computed densities from 0 to 100%.

Input streams: a random smooth frame whose square patch of ``area`` of the image (fixed
place) alternates between two random contents every frame, so exactly that area of input
pixels changes each step. The computed density is measured (rows recomputed x MACs per row
over the dense MACs): receptive fields make it larger than the input area.

    PYTHONPATH=src python3 bench/engine_gpu.py --out bench/results/engine_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import gpu_env
from torch import nn

import deltasparse as ds
from deltasparse.benchmark import cuda_graphed
from deltasparse.engine import DeltaEngine

RES = {"224": (224, 224), "360p": (360, 640), "720p": (720, 1280)}
AREAS = [0.0, 0.001, 0.003, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def calibrated_mobilenet(seed: int = 0) -> nn.Module:
    """MobileNet v1 whose batch-norm statistics come from one random batch (a fresh one's
    activations shrink layer after layer and would all quantise to zero)."""
    torch.manual_seed(seed)
    m = ds.models.mobilenet_v1(num_classes=1000)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = 1.0
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.5)
    m.train()
    with torch.no_grad():
        m(smooth_frame((2, 3, 224, 224), torch.Generator().manual_seed(seed)))
    return m.eval()


def converted_mobilenet(threshold: float) -> tuple[nn.Module, nn.Module]:
    """``(calibrated_mobilenet(), its ds.convert()ed copy with threshold_init=threshold)``."""
    model = calibrated_mobilenet()
    ex = smooth_frame((1, 3, 224, 224), torch.Generator().manual_seed(3))
    gm = ds.convert(copy.deepcopy(model), ds.DeltaConfig(threshold_init=threshold),
                    example_input=ex).eval()  # fmt: skip
    return model, gm


def smooth_frame(shape, gen, device="cpu") -> torch.Tensor:
    b, c, h, w = shape
    coarse = torch.randn(b, c, max(2, h // 8), max(2, w // 8), generator=gen)
    fine = torch.randn(b, c, h, w, generator=gen)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) + 0.3 * fine
    return x.to(device)


def patch_frames(base: torch.Tensor, area: float, gen) -> list[torch.Tensor]:
    """Two frames equal to ``base`` outside a centred patch of ``area`` of the image."""
    _, c, h, w = base.shape
    if area <= 0:
        return [base.clone(), base.clone()]
    ph = min(h, max(1, round(h * math.sqrt(area))))
    pw = min(w, max(1, round(area * h * w / ph)))
    y0, x0 = (h - ph) // 2, (w - pw) // 2
    out = []
    for _ in range(2):
        f = base.clone()
        f[:, :, y0 : y0 + ph, x0 : x0 + pw] = torch.randn(1, c, ph, pw, generator=gen).to(
            base.device
        )
        out.append(f)
    return out


def time_steps(fn, frames, n: int, warmup: int = 3) -> list[float]:
    """Per-call latencies (ms) from CUDA events, cycling through ``frames``."""
    for i in range(warmup):
        fn(frames[i % len(frames)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn(frames[i % len(frames)])
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def med(xs):
    return statistics.median(xs) if xs else None


def dense_baselines(model, gm, res, n) -> dict:
    h, w = res
    dev = "cuda"
    out = {}
    x = smooth_frame((1, 3, h, w), torch.Generator().manual_seed(1), dev)
    frames = [x.contiguous(memory_format=torch.channels_last)]
    fp32 = copy.deepcopy(model).to(dev).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out["dense_fp32_eager_ms"] = med(time_steps(fp32, frames, n))
        out["dense_fp32_graph_ms"] = med(time_steps(cuda_graphed(fp32, frames[0]), frames, n))
        try:
            from torch.fx.experimental.optimization import fuse

            folded = fuse(copy.deepcopy(fp32)).to(memory_format=torch.channels_last)
            out["dense_fp32_graph_bnfolded_ms"] = med(
                time_steps(cuda_graphed(folded, frames[0]), frames, n)
            )
        except Exception as exc:  # noqa: BLE001 - a baseline variant, reported
            out["dense_fp32_graph_bnfolded_error"] = repr(exc)
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        fb = [frames[0].to(torch.bfloat16)]
        out["dense_bf16_graph_ms"] = med(time_steps(cuda_graphed(bf16, fb[0]), fb, n))
        try:
            q = copy.deepcopy(gm).to(dev).to(memory_format=torch.channels_last)
            out["dense_quantised_fp32_graph_ms"] = med(
                time_steps(cuda_graphed(q, frames[0]), frames, n)
            )
        except Exception as exc:  # noqa: BLE001
            out["dense_quantised_fp32_graph_error"] = repr(exc)
    del fp32, bf16
    return out


def graph_density(gs, before: torch.Tensor, steps: int) -> float:
    """Computed density of the graph steps since ``before`` (a copy of gs.totals)."""
    rows = (gs.totals - before)[1:, 0].tolist()
    eff = sum(r * op.stats.macs_per_row for r, op in zip(rows, gs.rt.ops, strict=True))
    dense = sum(op.stats.dense_macs_per_frame for op in gs.rt.ops)
    return eff / (dense * steps) if dense else float("nan")


def engine_density(eng, before) -> float:
    st = eng.stats
    d_eff = st.effective_macs - before[0]
    d_dense = st.dense_macs - before[1]
    return d_eff / d_dense if d_dense else float("nan")


def profile_kernels(gs, frames, steps: int = 3) -> list[dict]:
    """GPU time per kernel name over ``steps`` eager (uncaptured) graph-step bodies."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            gs.frame.copy_(frames[i % 2])
            gs._body()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"kernel": e.key[:80], "calls": e.count // steps,
                         "us_per_step": t / steps})  # fmt: skip
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:15]


def moving_stream(gs, r, res, args) -> dict:
    """The project's synthetic stream (textured objects moving over a static background)."""
    from deltasparse.data.streams import synthetic_stream

    h, w = res
    frames = [f.cuda() for f in synthetic_stream(args.moving_frames + 1, (1, 3, h, w),
                                                  objects=2, object_size=0.15, speed=4.0,
                                                  seed=5)]  # fmt: skip
    gs.step(frames[0])
    before = gs.totals.clone()
    starts = [torch.cuda.Event(enable_timing=True) for _ in frames[1:]]
    ends = [torch.cuda.Event(enable_timing=True) for _ in frames[1:]]
    for f, s, e in zip(frames[1:], starts, ends, strict=True):
        s.record()
        gs.step(f)
        e.record()
    torch.cuda.synchronize()
    ts = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    out = {
        "stream": "deltasparse.data.streams.synthetic_stream(objects=2, object_size=0.15, "
        "speed=4 px/frame), no noise",
        "frames": len(ts),
        "density": graph_density(gs, before, len(ts)),
        "triton_graph_ms": med(ts),
        "speedup_vs_dense_fp32_graph": r["dense_fp32_graph_ms"] / med(ts),
        "speedup_vs_dense_bf16_graph": r["dense_bf16_graph_ms"] / med(ts),
    }
    log("moving objects", out)
    return out


def run_resolution(name, res, model, gm, args) -> dict:
    h, w = res
    dev = "cuda"
    log(f"== {name} {res}")
    r = {"resolution": name, "hw": [h, w]}
    r.update(dense_baselines(model, gm, res, args.reps))
    log("dense", {k: v for k, v in r.items() if k.endswith("_ms")})
    gmc = copy.deepcopy(gm).to(dev)
    gen = torch.Generator().manual_seed(7)
    base = smooth_frame((1, 3, h, w), gen, dev)

    engines = {}
    t0 = time.perf_counter()
    eng = DeltaEngine(gmc, backend="triton", cuda_graph=False)
    eng.step(base)
    gs = eng.backend.graph_step(eng._runtime)
    engines["triton_graph"] = gs
    r["graph_launches_per_step"] = gs.launches_per_step
    if args.tf32x3:
        from deltasparse.engine.kernels.triton_gpu import TritonBackend

        eng3 = DeltaEngine(gmc, backend=TritonBackend(dev, precision="tf32x3"), cuda_graph=False)
        eng3.step(base)
        engines["triton_graph_tf32x3"] = eng3.backend.graph_step(eng3._runtime)
    if not args.no_eager:
        for b in ("triton", "torch"):
            e = DeltaEngine(gmc, backend=b)
            e.step(base)
            engines[f"{b}_eager"] = e
    r["engine_build_s"] = time.perf_counter() - t0

    points = []
    prof_done = False
    for area in args.areas:
        fr = patch_frames(base, area, gen)
        p = {"area": area}
        with torch.no_grad():
            want = gmc(fr[1])
        for key, e in engines.items():
            is_graph = key.startswith("triton_graph")
            n = args.reps if is_graph else args.eager_reps
            if is_graph:
                e.step(fr[0])  # first call also captures the graph
                before = e.totals.clone()
                ts = time_steps(e.step, fr, n, warmup=2)
                # warm-up calls are counted in totals too
                p[f"{key}_density"] = graph_density(e, before, n + 2)
                out = e.step(fr[1])
                e.step(fr[0])
            else:
                e.step(fr[0])
                st = e.stats
                before = (st.effective_macs, st.dense_macs)
                ts = time_steps(e.step, fr, n, warmup=2)
                p[f"{key}_density"] = engine_density(e, before)
                out = e.step(fr[1])
                e.step(fr[0])
            p[f"{key}_ms"] = med(ts)
            p[f"{key}_p90_ms"] = sorted(ts)[int(0.9 * (len(ts) - 1))]
            p[f"{key}_max_abs_err"] = float((out - want).abs().max())
        d32 = r["dense_fp32_graph_ms"]
        for key in engines:
            p[f"{key}_speedup_vs_dense_fp32_graph"] = d32 / p[f"{key}_ms"]
            if r.get("dense_bf16_graph_ms"):
                p[f"{key}_speedup_vs_dense_bf16_graph"] = r["dense_bf16_graph_ms"] / p[f"{key}_ms"]
        p["density"] = p["triton_graph_density"]
        log(f"area {area:.3f} density {p['density']:.3f} " + " ".join(
            f"{k}={p[k + '_ms']:.3f}ms" for k in engines))  # fmt: skip
        points.append(p)
        if args.profile and not prof_done and p["density"] >= 0.08:
            r["kernel_profile_at_density"] = p["density"]
            r["kernel_profile"] = profile_kernels(engines["triton_graph"], fr)
            prof_done = True
    r["points"] = points
    if args.moving:
        r["moving_objects"] = moving_stream(engines["triton_graph"], r, res, args)
    del engines, eng
    torch.cuda.empty_cache()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--res", nargs="+", default=["224", "360p", "720p"], choices=list(RES))
    ap.add_argument("--areas", nargs="+", type=float, default=AREAS)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--eager-reps", type=int, default=8)
    ap.add_argument("--no-eager", action="store_true", help="skip the per-op-driver engines")
    ap.add_argument("--tf32x3", action="store_true", help="also the 3xTF32 graph step")
    ap.add_argument("--profile", action="store_true", help="per-kernel times at ~10%% density")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--moving", action="store_true", help="also a moving-objects stream")
    ap.add_argument("--moving-frames", type=int, default=40)
    ap.add_argument("--out", default="bench/results/engine_gpu.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, gm = converted_mobilenet(args.threshold)
    result = {
        "what": "MobileNet v1 (1000 classes, width 1.0), batch 1: delta engine vs dense",
        **gpu_env(),
        "threshold_init": args.threshold,
        "settings": "cudnn.benchmark on, TF32 off, channels_last; engine float32",
        "stream": "fixed random smooth frame; a centred patch of `area` alternates between two "
        "random contents each step",
        "timing": "median of per-step CUDA-event times; graph steps include the frame copy "
        "and the output copy",
        "resolutions": [],
    }
    for name in args.res:
        result["resolutions"].append(run_resolution(name, RES[name], model, gm, args))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    # Summary table (last, so the tail of a log shows it).
    print(f"{'res':>5} {'area':>6} {'density':>7} {'graph ms':>9} {'dense32':>8} {'x32':>6} "
          f"{'bf16':>6} {'xbf16':>6} {'trit_eag':>9} {'torch_eag':>9}")  # fmt: skip
    for r in result["resolutions"]:
        for p in r["points"]:
            print(f"{r['resolution']:>5} {p['area']:6.3f} {p['density']:7.3f} "
                  f"{p['triton_graph_ms']:9.3f} {r['dense_fp32_graph_ms']:8.3f} "
                  f"{p['triton_graph_speedup_vs_dense_fp32_graph']:6.2f} "
                  f"{r['dense_bf16_graph_ms']:6.3f} "
                  f"{p['triton_graph_speedup_vs_dense_bf16_graph']:6.2f} "
                  f"{p.get('triton_eager_ms', float('nan')):9.3f} "
                  f"{p.get('torch_eager_ms', float('nan')):9.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
