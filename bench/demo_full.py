"""The README's main job, measured: ``deltasparse demo`` (full) in a fresh folder, its summary
kept as ``bench/results/demo_full_summary.json`` with the command and the torch version.

    python bench/demo_full.py [--out demo_out] [--results bench/results/demo_full_summary.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from deltasparse.demo import run_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--results", default="bench/results/demo_full_summary.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    summary = run_demo(Path(args.out))
    summary["command"] = " ".join(["python", *sys.argv])
    summary["torch"] = torch.__version__
    summary["machine"] = {"processor": platform.processor() or platform.machine(),
                          "cpu_count": __import__("os").cpu_count()}  # fmt: skip
    summary["wall_s"] = time.perf_counter() - t0
    Path(args.results).write_text(json.dumps(summary, indent=1, allow_nan=False))
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
