"""Device-side diagnostics of the Triton kernels: eager-path variants and a tile sweep.

    PYTHONPATH=src python3 bench/gpu/debug_kernels.py --out $OUT/debug.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from deltasparse.engine.kernels import ReferenceBackend  # noqa: E402
from deltasparse.engine.kernels import triton_gpu as tg  # noqa: E402
from deltasparse.engine.kernels.specs import LinearSpec  # noqa: E402


def eager_variants() -> dict:
    torch.manual_seed(0)
    p, k, n = 70, 24, 40
    out = {}
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(p + 1, k, dtype=dtype, device="cuda")
        x[-1] = 0
        wt = torch.randn(k, n, dtype=dtype, device="cuda")
        b = torch.randn(n, dtype=dtype, device="cuda")
        rows = torch.randperm(p, device="cuda")[:30].sort().values
        ref_nb = ReferenceBackend("cuda").linear(x, LinearSpec(wt, None), rows)
        ref = ref_nb + b

        def err(y, r):
            return float((y - r).norm() / r.norm())

        res = {}
        for name, idx in (("i64", rows), ("i32", rows.int())):
            y = torch.full((30, n), float("nan"), dtype=dtype, device="cuda")
            tg.launch_rows_gemm(x, wt, b, idx, y, n_rows=30)
            res[f"eager_{name}_vs_ref"] = err(y, ref)
            res[f"eager_{name}_vs_ref_nobias"] = err(y, ref_nb)
            res[f"eager_{name}_vs_ref_2bias"] = err(y, ref + b)
            y = torch.full((30, n), float("nan"), dtype=dtype, device="cuda")
            tg.launch_rows_gemm(x, wt, None, idx, y, n_rows=30)
            res[f"eager_{name}_nobias_vs_ref_nobias"] = err(y, ref_nb)
        # DYN (count on device), no fuse
        cnt = torch.tensor([30], dtype=torch.int32, device="cuda")
        y = torch.full((30, n), float("nan"), dtype=dtype, device="cuda")
        tg.launch_rows_gemm(x, wt, b, rows.int(), y, cnt=cnt, grid=4)
        res["dyn_vs_ref"] = err(y, ref)
        # FUSE into a state buffer
        st = torch.zeros(p + 1, n, dtype=dtype, device="cuda")
        mo = torch.zeros(p + 1, dtype=torch.int8, device="cuda")
        tg.launch_rows_gemm(x, wt, b, rows.int(), st, cnt=cnt, mo=mo, grid=4)
        res["fuse_vs_ref"] = err(st[rows], ref)
        # separate bias tensor with a dummy passed elsewhere
        y = torch.full((30, n), float("nan"), dtype=dtype, device="cuda")
        chain = tg.ChainArgs.empty(torch.zeros(1, dtype=dtype, device="cuda"))
        tg.launch_rows_gemm(x, wt, b, rows, y, n_rows=30, chain=chain)
        res["eager_sepdummy_vs_ref"] = err(y, ref)
        y = torch.full((30, n), float("nan"), dtype=dtype, device="cuda")
        tg.launch_rows_gemm(x, wt, b, rows, y, n_rows=30, chain=chain,
                            cnt=torch.tensor([0], dtype=torch.int32, device="cuda"))  # noqa: E501
        out[str(dtype)] = res
    return out


def tile_sweep(args) -> dict:
    import copy

    import engine_gpu as eb

    import deltasparse as ds
    from deltasparse.engine import DeltaEngine
    from deltasparse.engine.kernels.triton_graph import GraphStep

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = eb.calibrated_mobilenet()
    ex = eb.smooth_frame((1, 3, 224, 224), torch.Generator().manual_seed(3))
    gm = ds.convert(copy.deepcopy(model), ds.DeltaConfig(threshold_init=0.05),
                    example_input=ex).eval().cuda()  # fmt: skip
    h, w = 720, 1280
    gen = torch.Generator().manual_seed(7)
    base = eb.smooth_frame((1, 3, h, w), gen, "cuda")
    eng = DeltaEngine(gm, backend="triton")
    eng.step(base)
    frames = {a: eb.patch_frames(base, a, gen) for a in args.areas}
    configs = [("auto", {})]
    for g in [(64, 64, 32, 4), (32, 32, 32, 4), (16, 32, 32, 4), (32, 64, 32, 4),
              (64, 64, 32, 8), (16, 64, 32, 4), (32, 32, 64, 4)]:  # fmt: skip
        configs.append((f"gemm{g}", {"gemm": g}))
    for d in [(32, 128, 4), (16, 64, 4), (32, 64, 4), (64, 32, 4), (16, 32, 2)]:
        configs.append((f"dw{d}", {"dw": d}))
    res = {}
    for name, tune in configs:
        tg.TUNE.clear()
        tg.TUNE.update(tune)
        gs = GraphStep(eng._runtime, eng.backend)
        row = {}
        for a, fr in frames.items():
            gs.step(fr[0])
            ts = eb.time_steps(gs.step, fr, 30, warmup=2)
            row[str(a)] = eb.med(ts)
            gs.step(fr[0])
        res[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        del gs
    tg.TUNE.clear()
    # Per-kernel times in launch order for one uncaptured step at the middle area.
    from torch.profiler import ProfilerActivity, profile

    gs = GraphStep(eng._runtime, eng.backend, cuda_graph=False)
    fr = frames[args.areas[len(args.areas) // 2]]
    gs.step(fr[0])
    gs.step(fr[1])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gs.step(fr[0])
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
    ev.sort(key=lambda e: e.time_range.start)
    res["trace_area"] = args.areas[len(args.areas) // 2]
    res["trace"] = [(e.name[:40], round(e.time_range.elapsed_us(), 2)) for e in ev]
    counts = (gs.totals[1:, 0]).tolist()
    res["rows_per_op"] = [(op.name, op.out.rows, c) for op, c in zip(gs.rt.ops, counts,
                                                                      strict=True)]  # noqa
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="debug.json")
    ap.add_argument("--areas", nargs="+", type=float, default=[0.001, 0.02, 0.08])
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    out = {"eager": eager_variants()}
    print(json.dumps(out["eager"], indent=1), flush=True)
    if not args.skip_sweep:
        out["sweep"] = tile_sweep(args)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
