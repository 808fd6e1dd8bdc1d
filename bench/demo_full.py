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


def _commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when files differ from it), or None."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


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
    summary["commit"] = _commit()
    Path(args.results).write_text(json.dumps(summary, indent=1, allow_nan=False))
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
