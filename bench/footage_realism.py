"""How much of a frame changes between consecutive frames: the embedded synthetic videos against
what decoded camera footage does.

    python bench/footage_realism.py [--out bench/results/footage_realism.json]

Measured on real camera clips (decoded H.264 through PyAV): resized to 64x64, 65-79% of the
pixels change at all between consecutive frames; at 720p, 11% change by more than 8/255 and 2%
by more than 24/255 (a pixel's change is the largest of its three channels). This script renders
the synthetic videos at both sizes with the defaults the demo uses (photo background, sub-pixel
shake, flicker, sensor noise, libx264 at CRF 23) and with the clean rendering of earlier
versions (procedural background, no shake, no flicker, no compression), and writes the same
statistics as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deltasparse.data import render_video

REAL = {"64x64": {"any": (0.65, 0.79)}, "720p": {"gt8": 0.11, "gt24": 0.02}}
CLEAN = dict(background="procedural", camera_shake=0.0, flicker=0.0, crf=None)


def changes(video: np.ndarray) -> dict:
    d = np.abs(np.diff(video.astype(np.int16), axis=0)).max(-1)
    return {"any": float((d > 0).mean()), "gt8": float((d > 8).mean()),
            "gt24": float((d > 24).mean())}  # fmt: skip


def measure(size, videos: int, frames: int, **kw) -> dict:
    rows = [changes(render_video(i, frames=frames, size=size, split="test", **kw)[0])
            for i in range(videos)]  # fmt: skip
    return {k: {"mean": float(np.mean([r[k] for r in rows])),
                "min": float(np.min([r[k] for r in rows])),
                "max": float(np.max([r[k] for r in rows]))} for k in rows[0]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/footage_realism.json")
    p.add_argument("--videos-64", type=int, default=60)
    p.add_argument("--videos-720", type=int, default=8)
    args = p.parse_args()
    t0 = time.perf_counter()
    result = {
        "benchmark": "footage_realism",
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "real_footage": REAL,
        "synthetic": {
            "64x64": measure((64, 64), args.videos_64, 16),
            "720p": measure((720, 1280), args.videos_720, 4),
        },
        "clean_rendering": {
            "64x64": measure((64, 64), args.videos_64, 16, **CLEAN),
            "720p": measure((720, 1280), args.videos_720, 4, **CLEAN),
        },
    }
    result["elapsed_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name in ("synthetic", "clean_rendering"):
        r = result[name]
        print(f"{name:16s} 64x64 any {100 * r['64x64']['any']['mean']:.1f}%   720p >8/255 "
              f"{100 * r['720p']['gt8']['mean']:.1f}%  >24/255 {100 * r['720p']['gt24']['mean']:.1f}%")
    print("real footage     64x64 any 65-79%   720p >8/255 11%  >24/255 2%")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
