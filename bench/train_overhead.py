"""Training overhead of the inserted layers: forward + backward + SGD step of
``VideoModel(mobilenet_v1(num_classes=101))`` on clips ``(B=2, T=4, 3, 112, 112)`` on CPU.

The variants run side by side in one process, interleaved round-robin so that drift of the
machine hits them alike: the plain model, ``convert(kind="l1")``, ``convert(kind="delta")``
(the paper's scalar layer), and the engine-granular layers of the video recipe:
``gate="pixel"`` in grid mode and in hysteresis mode with an input gate (``pixel_hyst``, what
the demo trains). Medians and ratios to plain are printed and written as JSON.

    PYTHONPATH=src python bench/train_overhead.py [--repeats 15] [--threads 1,2] [--profile]

``--threads`` takes a list: the whole comparison runs once per thread count. On a shared
machine one thread gives the steadier ratios (a descheduled worker stalls every parallel op);
the load average before and after each run is recorded so a noisy figure can be recognised.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_model

import deltasparse as ds

VARIANTS = ("plain", "l1", "delta", "pixel", "pixel_hyst")
CONFIGS = {
    "l1": ds.DeltaConfig(kind="l1"),
    "delta": ds.DeltaConfig(kind="delta"),
    "pixel": ds.DeltaConfig(kind="delta", gate="pixel"),
    "pixel_hyst": ds.DeltaConfig(kind="delta", gate="pixel", mode="hysteresis", on_input=True),
}


def build(variant: str, base: torch.nn.Module, example: torch.Tensor):
    model = copy.deepcopy(base)
    if variant != "plain":
        model = ds.convert(model, CONFIGS[variant], example_input=example)
    video = ds.VideoModel(model).train()
    opt = torch.optim.SGD(video.parameters(), lr=1e-3, momentum=0.9)
    return video, opt


def step(video, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(video(x), y) + ds.sparsity_loss(video)
    loss.backward()
    opt.step()


def profile(video, opt, x, y, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    step(video, opt, x, y)
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(3):
            step(video, opt, x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def time_variants(runs, x, y, warmup: int, repeats: int) -> dict:
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    for _ in range(warmup):
        for v in VARIANTS:
            step(*runs[v], x, y)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        k = r % len(VARIANTS)
        order = VARIANTS[k:] + VARIANTS[:k]  # rotate so no variant always goes first
        for v in order:
            t0, c0 = time.perf_counter(), time.process_time()
            step(*runs[v], x, y)
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    med = {v: statistics.median(t) for v, t in times.items()}
    cpu_med = {v: statistics.median(t) for v, t in cpu.items()}
    run = {
        "threads": threads,
        "median_s": med,
        "min_s": {v: min(t) for v, t in times.items()},
        "ratio_vs_plain": {v: med[v] / med["plain"] for v in VARIANTS},
        "min_ratio_vs_plain": {v: min(times[v]) / min(times["plain"]) for v in VARIANTS},
        # ratio within each round, then the median: robust to slow drift of the machine
        "paired_ratio_median": {
            v: statistics.median(a / b for a, b in zip(times[v], times["plain"], strict=True))
            for v in VARIANTS
        },
        # CPU time of this process: with one thread it ignores time spent waiting for a core
        # that other processes hold, so it is the steadier figure on a shared machine
        "cpu_median_s": cpu_med,
        "cpu_ratio_vs_plain": {v: cpu_med[v] / cpu_med["plain"] for v in VARIANTS},
        "loadavg_1min": [load_before[0], os.getloadavg()[0]],
        "times_s": times,
    }
    for v in VARIANTS:
        print(
            f"threads {threads}  {v:>10}: median {med[v] * 1e3:7.1f} ms  "
            f"x{run['ratio_vs_plain'][v]:.3f} vs plain  (paired x"
            f"{run['paired_ratio_median'][v]:.3f}, min x{run['min_ratio_vs_plain'][v]:.3f}, "
            f"cpu x{run['cpu_ratio_vs_plain'][v]:.3f})",
            flush=True,
        )
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", default=str(torch.get_num_threads()), help="e.g. 1,2")
    p.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table per variant"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_overhead.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = ds.models.mobilenet_v1(num_classes=101)
    x = torch.randn(args.batch, args.frames, 3, args.size, args.size)
    y = torch.randint(0, 101, (args.batch,))
    runs = {v: build(v, base, x[0, :1]) for v in VARIANTS}

    result = {
        "benchmark": "train_overhead",
        "what": "forward + backward + SGD step of VideoModel(mobilenet_v1(num_classes=101))",
        "clip": [args.batch, args.frames, 3, args.size, args.size],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "goal": {"ratio_max": 1.25, "of": ["delta", "pixel", "pixel_hyst"]},
        "torch": torch.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "runs": [],
    }
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        result["runs"].append(time_variants(runs, x, y, args.warmup, args.repeats))
    result["goal"]["met"] = {
        v: all(r["ratio_vs_plain"][v] <= 1.25 for r in result["runs"]) for v in CONFIGS
        if v != "l1"
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.profile:
        for v in VARIANTS:
            print(f"\n=== {v} ===")
            print(profile(*runs[v], x, y, rows=25))
    return result


if __name__ == "__main__":
    main()
