"""CPU benchmark of the delta engine: dense vs delta side by side.

    PYTHONPATH=src python bench/engine_cpu.py [--quick] [--out bench/results/engine_cpu.json]

MobileNet v1 (width 1.0, random weights with calibrated batch norm) at 224x224, 360x640 and
720x1280, 1 and 2 threads, effective densities ~5/10/20/30/100%. Writes JSON and prints a
table. Takes about 10 minutes on a 2-core machine (``--quick``: 224x224 only).
"""

from __future__ import annotations

import os
import sys

# OpenMP threads spin while waiting. On a 2-core machine where another process takes a core
# that makes every frame ~20x slower (dense and delta alike), and passive waiting instead
# costs ~25% (dense) to ~45% (delta, many small ops). Default: as users run it (spinning),
# on a quiet machine; --omp-passive for a busy one. The load average is recorded.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from deltasparse.benchmark import run_bench
from deltasparse.printing import bench_markdown, print_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/engine_cpu.json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--resolutions", nargs="+", default=None)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3, 1.0])
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE (robust on a busy machine, slower on a quiet one)")
    p.add_argument("--merge", action="store_true",
                   help="replace the matching rows of an existing --out file (re-run a subset)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    res = args.resolutions or (["224"] if args.quick else ["224", "360p", "720p"])
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    def progress(r):
        print(
            f"{r['resolution']:>5} t={r['threads']} target={r['target_density']:.2f} "
            f"density={r['density']:.3f} dense={r['dense_ms']:.1f}ms delta={r['delta_ms']:.1f}ms "
            f"speedup={r['achieved_speedup']:.2f} ideal={r['ideal_speedup']:.2f} "
            f"ratio={r['ratio']:.2f} err={r['max_abs_err']:.1e}",
            flush=True,
        )

    result = run_bench(resolutions=res, threads=args.threads, densities=args.densities,
                       frames=args.frames, progress=progress)  # fmt: skip
    result["wall_s"] = time.perf_counter() - t0
    result["machine"] = {"processor": platform.processor(), "cpus": os.cpu_count(),
                         "python": platform.python_version(),
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                         "load_avg_at_start": load_start,
                         "load_avg_at_end": os.getloadavg()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.is_file():
        old = json.loads(out.read_text())

        def key(r):
            return (r["model"], r["resolution"], r["threads"], r["target_density"])

        new = {key(r): r for r in result["rows"]}
        rows = [new.pop(key(r), r) for r in old["rows"]]
        result = {**old, "rows": rows + list(new.values()),
                  "wall_s": old.get("wall_s", 0) + result["wall_s"]}  # fmt: skip
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(bench_markdown(result))
    print_bench(result)
    print(f"wrote {out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
