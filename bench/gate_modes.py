"""Grid against hysteresis, scalar against pixel gates: which Delta Activation Layer turns into
executed sparsity, on clean synthetic video and on footage that behaves like a camera's.

    python bench/gate_modes.py [--out bench/results/gate_modes.json] [--videos 1200]

For each footage (``clean``: the earlier rendering -- procedural background, no shake, flicker
or compression; ``realistic``: the embedded default, see bench/footage_realism.py) one
baseline is trained, then each variant is refined from it with the same budget:

* ``scalar-grid``: the paper's layer (round(a/thr)*thr, per-scalar L1 loss);
* ``pixel-grid``: the same quantiser, the pixel group loss weighted by the rows it reaches;
* ``pixel-hysteresis+input``: changes sent only above the step against the last value sent,
  whole pixels, the input gated too (the demo's recipe).

The JSON holds accuracy, the counted op_fraction and the executed density that measure()
predicts from the engine's rules on the held-out clips, per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltasparse.data import SyntheticActions, write_class_folders
from deltasparse.train import TrainConfig, train

FOOTAGE = {
    "clean": dict(background="procedural", camera_shake=0.0, flicker=0.0, crf=None),
    "realistic": {},
}
VARIANTS = {
    "scalar-grid": dict(gate="scalar", mode="grid"),
    "pixel-grid": dict(gate="pixel", mode="grid"),
    "pixel-hysteresis+input": dict(gate="pixel", mode="hysteresis", input_gate=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/gate_modes.json")
    p.add_argument("--videos", type=int, default=1200)
    p.add_argument("--baseline-epochs", type=int, default=10)
    p.add_argument("--delta-epochs", type=int, default=4)
    p.add_argument("--sparsity-weight", type=float, default=3e-2)
    p.add_argument("--model", default="dsconvnet", help="the demo's model by default")
    p.add_argument("--width", type=float, default=1.5)
    p.add_argument("--work", default=None, help="folder for data and runs (default: temporary)")
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="gate_modes_"))
    t0 = time.perf_counter()
    runs = []
    for footage, render in FOOTAGE.items():
        data = work / footage / "data"  # a plain folder of class folders, as camera footage
        if not (data / ".complete").is_file():
            ds = SyntheticActions(num_videos=args.videos, num_classes=10, frames=16, size=64,
                                  seed=1, **render)  # fmt: skip
            write_class_folders(ds, data)
            (data / ".complete").write_text("")
        base = TrainConfig(data=str(data), cache_dir=str(work / footage / "cache"), resolution=64,
                           resize=64, model=args.model, width=args.width, device="cpu", clip_len=4,
                           eval_clip_len=8, eval_clips_per_video=2, batch_size=32,
                           warmup_epochs=0.5, threshold_init=0.15, threshold_lr_mult=10.0,
                           progress=False)  # fmt: skip
        bdir = work / footage / "baseline"
        if not (bdir / "eval.json").is_file():
            train(dataclasses.replace(base, phase="baseline", out=str(bdir), lr=3e-3,
                                      epochs=args.baseline_epochs, sparsity_weight=0.0))
        ev = json.loads((bdir / "eval.json").read_text())
        runs.append(_row(footage, "baseline", ev))
        for name, kw in VARIANTS.items():
            rdir = work / footage / name
            if not (rdir / "eval.json").is_file():
                train(dataclasses.replace(base, phase="delta", out=str(rdir), lr=1e-3,
                                          epochs=args.delta_epochs, clip_len=2,
                                          sparsity_weight=args.sparsity_weight,
                                          init_from=str(bdir / "model.pt"), **kw))  # fmt: skip
            runs.append(_row(footage, name, json.loads((rdir / "eval.json").read_text())))
            print(json.dumps(runs[-1]), flush=True)
    result = {
        "benchmark": "gate_modes",
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "settings": vars(args),
        "runs": runs,
        "elapsed_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written to {args.out}")


def _row(footage: str, variant: str, ev: dict) -> dict:
    return {"footage": footage, "variant": variant, "accuracy": ev["accuracy"],
            "op_fraction": ev["op_fraction"],
            "executed_fraction": ev["sparsity"].get("executed_fraction")}  # fmt: skip


if __name__ == "__main__":
    main()
