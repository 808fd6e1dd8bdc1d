"""Half-precision delta engine vs the best dense half-precision model on one GPU, side by side.

MobileNet v1 (1000 classes, random weights, batch-norm statistics from one random batch), or
with ``--model`` a model of ``ds.models`` (torchvision's resnet50 etc. where installed; batch-norm
statistics from random smooth frames), converted with ``threshold_init`` (gates after every
activation type the model uses); per resolution and batch size:

* dense baselines (``deltasparse.benchmark.gpu_dense_baselines``: the model without its
  sparsity layers, batch norm folded; float32 (TF32) / bfloat16, NCHW / channels_last,
  eager / CUDA graph; float32 without TF32), and with ``--compile`` the bfloat16 model under
  ``torch.compile(mode=...)``, channels_last, as a CUDA graph (time-boxed by the mode);
* the delta engine in bfloat16 (and float32 for comparison), ``backend="triton"``: the
  whole-step CUDA graph, over a sweep of input change areas (a centred patch alternates
  between two random contents each step, ``engine_gpu.patch_frames``).

Each point records the computed density, the median step time (CUDA events after a
synchronisation; the step includes the frame copy and the output copy), the speedup against
the best dense baseline of the same dtype, and checks: history independence (the engine's
output against the same engine built fresh on that frame alone; the issue's bound is 1e-3
relative in bf16), the distance to the reference backend's dense pass (NCHW cuDNN: other
float sums, so quantiser flips), and top-1 agreement with the dense converted model.

    PYTHONPATH=src python3 bench/engine_gpu_half.py --out bench/results/engine_gpu_half.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

import deltasparse as ds
from deltasparse.benchmark import cuda_graphed, gpu_dense_baselines
from deltasparse.engine import DeltaEngine
from deltasparse.engine.kernels import triton_gpu as tg

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import gpu_env  # noqa: E402
from engine_gpu import (  # noqa: E402
    converted_mobilenet,
    engine_density,
    log,
    patch_frames,
    smooth_frame,
    time_steps,
)
from zoo_sweep import activation_types, calibrate_bn  # noqa: E402

RES = {"224": (224, 224), "720p": (720, 1280), "1080p": (1080, 1920), "4k": (2160, 3840)}
AREAS = [0.0, 0.003, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 1.0]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def best(base: dict, dname: str) -> tuple[str, float]:
    prefix = {"float32": "float32_", "bfloat16": "bfloat16_", "float16": "bfloat16_"}[dname]
    keys = [k for k in base if k.startswith(prefix) or (dname == "bfloat16" and k.startswith(
        "compiled_bfloat16"))]  # fmt: skip
    k = min(keys, key=base.get)
    return k, base[k]


def compiled_baseline(gm, frame, mode: str, reps: int) -> dict:
    """The bfloat16 dense model under torch.compile (channels_last), replayed as a CUDA graph."""
    from deltasparse.exploit import fused_dense

    m = fused_dense(gm).to(frame.device, torch.bfloat16).to(memory_format=torch.channels_last)
    x = frame.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    fn = torch.compile(m, mode=mode, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        # max-autotune already replays CUDA graphs; other modes are captured here
        run = fn if "max-autotune" == mode or mode == "reduce-overhead" else cuda_graphed(fn, x)
        ts = time_steps(run, [x], reps)
    return {f"compiled_bfloat16_{mode}_ms": statistics.median(ts), "compile_s": compile_s}


def engine_point(eng, ref, fresh, dense_h, frames, reps: int) -> dict:
    eng.step(frames[0])
    st = eng.stats
    before = (st.effective_macs, st.dense_macs)
    ts = time_steps(eng.step, frames, reps, warmup=2)
    density = engine_density(eng, before)
    y = eng.step(frames[1])
    want = ref.step(frames[1])  # the reference backend's dense pass on this frame
    ref.reset()
    fresh.reset()
    own = fresh.step(frames[1])  # the same engine, fresh: its own first (dense) step
    with torch.no_grad():
        yd = dense_h(frames[1])

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    eng.step(frames[0])
    return {
        "ms": statistics.median(ts),
        "p90_ms": sorted(ts)[int(0.9 * (len(ts) - 1))],
        "density": density,
        "history_rel_err": rel(y, own),
        "vs_reference_backend_rel_err": rel(y, want),
        "top1_agrees_with_dense": float((y.argmax(1) == yd.argmax(1)).float().mean()),
    }


def parse_tune(text: str) -> dict:
    """``"flat=0;stages=4;split=2;gemm=64,64,64,4"`` -> a ``triton_gpu.TUNE`` dict."""
    tune = {}
    for part in filter(None, text.split(";")):
        key, _, val = part.partition("=")
        nums = tuple(int(v) for v in val.split(","))
        tune[key] = bool(nums[0]) if key == "flat" else nums[0] if len(nums) == 1 else nums
    return tune


def converted(name: str, threshold: float) -> nn.Module:
    """``ds.convert()`` of model ``name`` (random weights, batch-norm statistics from 8 random
    smooth frames at 224x224), gates after each activation type it uses."""
    if name == "mobilenet_v1":
        return converted_mobilenet(threshold)[1]
    torch.manual_seed(0)
    model = ds.models.create(name, num_classes=1000)
    gen = torch.Generator().manual_seed(3)
    calibrate_bn(model, torch.cat([smooth_frame((1, 3, 224, 224), gen) for _ in range(8)]))
    cfg = ds.DeltaConfig(after=activation_types(model), threshold_init=threshold)
    return ds.convert(model, cfg, example_input=smooth_frame((1, 3, 224, 224), gen)).eval()


def run(name: str, batch: int, gm32, args) -> dict:
    h, w = RES[name]
    dev = "cuda"
    log(f"== {name} batch {batch}")
    gen = torch.Generator().manual_seed(7)
    base = torch.cat([smooth_frame((1, 3, h, w), gen) for _ in range(batch)]).to(dev)
    r = {"resolution": name, "hw": [h, w], "batch": batch}
    dense = gpu_dense_baselines(gm32, [base] * args.reps)
    if args.compile != "none":
        try:
            dense.update(compiled_baseline(gm32, base, args.compile, args.reps))
        except Exception as exc:  # noqa: BLE001 - a baseline that failed is reported
            r["compile_error"] = repr(exc)[:500]
    r["dense_ms"] = dense
    log("dense", dense)
    engines = {}
    for dname in args.dtypes:
        dt = DTYPES[dname]
        gm = copy.deepcopy(gm32).to(dev, dt)
        t0 = time.perf_counter()
        eng = DeltaEngine(gm, backend="triton")
        eng.step(base.to(dt))
        graphed = eng._graph is not None
        ref = DeltaEngine(gm, backend="reference")
        fresh = DeltaEngine(gm, backend="triton")
        engines[dname] = (eng, ref, fresh, gm, dt)
        r[f"engine_{dname}_build_s"] = time.perf_counter() - t0
        r[f"engine_{dname}_graph_step"] = graphed
        r[f"engine_{dname}_fallbacks"] = list(eng.stats.fallbacks)
    points = []
    for area in args.areas:
        fr = patch_frames(base, area, gen)
        p = {"area": area}
        for dname, (eng, ref, fresh, gm, dt) in engines.items():
            q = engine_point(eng, ref, fresh, gm, [f.to(dt) for f in fr], args.reps)
            bk, bms = best(dense, dname)
            q["best_dense"], q["best_dense_ms"] = bk, bms
            q["speedup_vs_best_dense"] = bms / q["ms"]
            p[dname] = q
        log(f"area {area:.3f} " + " ".join(
            f"{d}: density {q['density']:.3f} {q['ms']:.3f} ms x{q['speedup_vs_best_dense']:.2f} "
            f"hist {q['history_rel_err']:.1e}" for d, q in p.items() if d != "area"))  # fmt: skip
        points.append(p)
    r["points"] = points
    del engines
    torch.cuda.empty_cache()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenet_v1", help="mobilenet_v1 or a ds.models name")
    ap.add_argument("--res", nargs="+", default=["720p"], choices=list(RES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--areas", nargs="+", type=float, default=AREAS)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--compile", default="none",
                    choices=["none", "default", "reduce-overhead", "max-autotune"])  # fmt: skip
    ap.add_argument("--tune", default="",
                    help="triton_gpu.TUNE overrides, e.g. 'split=0;flat=0' (see parse_tune)")
    ap.add_argument("--out", default="bench/results/engine_gpu_half.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_gpu_half: needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    tg.TUNE.update(parse_tune(args.tune))
    gm32 = converted(args.model, args.threshold)
    result = {
        "what": f"{args.model} (1000 classes, random weights): half-precision delta engine vs "
        "dense",
        "model": args.model,
        "tune": dict(tg.TUNE),
        "command": "python3 bench/engine_gpu_half.py " + " ".join(argv or sys.argv[1:]),
        **gpu_env(),
        "threshold_init": args.threshold,
        "stream": "random smooth frames; a centred patch of `area` alternates between two random "
        "contents each step (every sample of a batch)",
        "timing": "median of per-step CUDA-event times after a synchronisation; engine steps "
        "include the frame copy and the output copy; dense: gpu_dense_baselines (BN folded)",
        "runs": [],
    }
    for name in args.res:
        for b in args.batch:
            result["runs"].append(run(name, b, gm32, args))
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    for r in result["runs"]:
        for p in r["points"]:
            print(r["resolution"], r["batch"], p["area"], " ".join(
                f"{d}:{q['density']:.3f}/{q['ms']:.3f}ms/x{q['speedup_vs_best_dense']:.2f}"
                for d, q in p.items() if d != "area"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
