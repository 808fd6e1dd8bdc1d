"""Where a dense step's time goes (one GPU): the engine at 100% density (its dense step, a CUDA
graph of the dense pass) against the gate-free BN-folded model as a CUDA graph, per CUDA kernel
name, with torch.profiler. Writes JSON (top kernels by total CUDA time, per step).

    python bench/gpu/dense_step_profile.py --model resnet18 --out dense_step_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import deltasparse as ds
from deltasparse.benchmark import cuda_graphed
from deltasparse.engine.kernels.base import no_tf32
from deltasparse.exploit import fused_dense

sys.path.insert(0, "bench")
from zoo_sweep import activation_types, build, calibrate_bn  # noqa: E402


def kernels(fn, frames, steps: int) -> dict:
    for f in frames[:3]:
        fn(f)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for f in frames[3 : 3 + steps]:
            fn(f)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"kernel": e.key[:120], "calls_per_step": e.count / steps,
                         "us_per_step": t / steps})  # fmt: skip
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"us_per_step": sum(r["us_per_step"] for r in rows), "kernels": len(rows),
            "launches_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:25]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="dense_step_profile.json")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), getattr(torch, a.dtype)
    model = build(a.model)
    calibrate_bn(model, torch.rand(8, 3, a.res, a.res))
    gm = ds.convert(model, ds.DeltaConfig(after=activation_types(model), threshold_init=0.05),
                    example_input=torch.rand(1, 3, a.res, a.res)).eval().to(dev, dt)  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    frames = [torch.rand(1, 3, a.res, a.res, generator=g, device=dev).to(dt)
              for _ in range(a.steps + 3)]  # fmt: skip
    eng = ds.DeltaEngine(gm)
    dense = fused_dense(gm).to(dev, dt).to(memory_format=torch.channels_last)
    out = {"command": " ".join(sys.argv), "torch": torch.__version__, "model": a.model,
           "dtype": a.dtype}
    with torch.no_grad():
        eng.step(frames[0])
        out["engine_dense_step"] = kernels(eng.step, frames, a.steps)
        out["dense_steps"] = eng._dense.steps if eng._dense is not None else 0
        out["graph_step"] = eng._graph is not None
        if dt == torch.float32:
            with no_tf32():
                out["dense_graph_ieee32"] = kernels(cuda_graphed(dense, frames[0]), frames,
                                                    a.steps)  # fmt: skip
            out["dense_graph_tf32"] = kernels(cuda_graphed(dense, frames[0]), frames, a.steps)
        else:
            out[f"dense_graph_{a.dtype}"] = kernels(cuda_graphed(dense, frames[0]), frames, a.steps)
    json.dump(out, open(a.out, "w"), indent=1)
    for k in ("engine_dense_step", "dense_graph_ieee32", "dense_graph_tf32",
              f"dense_graph_{a.dtype}"):  # fmt: skip
        if k in out:
            print(k, round(out[k]["us_per_step"]), "us", out[k]["launches_per_step"], "launches")
    for r in out["engine_dense_step"]["top"][:12]:
        print(round(r["us_per_step"], 1), r["calls_per_step"], r["kernel"][:90])


if __name__ == "__main__":
    main()
