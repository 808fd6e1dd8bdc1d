"""A trained run's held-out videos through DeltaEngine, timed against the dense BN-folded model
side by side in one process (``deltasparse.exploit``, as the demo's engine stage does), without
training again: what an engine change does to a model that training already produced.

    python bench/engine_trained.py --checkpoint demo_out/delta/model.pt \\
        [--streams 64] [--threads 2] [--out bench/results/engine_trained.json]

``exploit`` raises glibc's mmap and trim thresholds (``mallopt``) before timing, so that the
dense model's large per-frame temporaries stay on the heap instead of being mapped and
page-faulted every frame (its fastest state; measured 0.21-0.50 ms a frame on the demo model
without it). ``--no-malloc-tune`` leaves the allocator alone, to compare; ``--crossover
depthwise=0.35`` runs the engine with another crossover for an op kind, to compare.

The JSON holds the command, the torch version, the commit and the engine stage's fields
(executed and predicted density, ms per frame dense and delta, speedup, accuracy, agreement).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import cpu_model

from deltasparse.checkpoint import load_model, write_json_atomic
from deltasparse.engine.kernels import OP_KINDS
from deltasparse.exploit import exploit, summary_line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="model.pt of a run (e.g. demo_out/delta)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/engine_trained.json")
    ap.add_argument("--no-malloc-tune", action="store_true",
                    help="leave glibc's M_MMAP_THRESHOLD / M_TRIM_THRESHOLD as they are")
    ap.add_argument("--crossover", action="append", default=[], metavar="KIND=FRACTION",
                    help="override the engine's crossover for an op kind (e.g. depthwise=0.35; "
                         "repeatable), to measure a default against another")
    args = ap.parse_args()
    crossover = {}
    for item in args.crossover:
        kind, _, val = item.partition("=")
        if kind not in OP_KINDS:
            ap.error(f"--crossover {item!r}: unknown op kind {kind!r}; one of "
                     f"{', '.join(OP_KINDS)}")
        try:
            crossover[kind] = float(val)
        except ValueError:
            ap.error(f"--crossover {item!r}: expected KIND=FRACTION, e.g. depthwise=0.35")
    model, cfg, _ = load_model(args.checkpoint)
    t0 = time.perf_counter()
    r = exploit(model.eval(), cfg, streams=args.streams, threads=args.threads,
                tune_malloc=not args.no_malloc_tune, crossover=crossover or None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    write_json_atomic({
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__, "commit": commit, "machine": cpu_model(),
        "checkpoint": str(args.checkpoint), "run": {"phase": cfg.phase, "gate": cfg.gate,
                                                     "mode": cfg.mode},
        "malloc_tune": not args.no_malloc_tune, "wall_s": time.perf_counter() - t0, "engine": r,
    }, args.out)  # fmt: skip
    print(summary_line(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
