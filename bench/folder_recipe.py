"""The README's training recipe, run through the CLI on a plain folder of class folders of
realistic footage, then its held-out videos streamed through DeltaEngine.

    python bench/folder_recipe.py [--work /tmp/folder_recipe] [--out bench/results/folder_recipe.json]

The footage is the embedded realistic rendering (camera shake, flicker, sensor noise, H.264 at
the default CRF; bench/footage_realism.py) written as ``<class>/clip_NNNN.mp4`` with no split
files, a seed other than the demo's, so the demo's videos are not reused. The phases are the
README's commands (``deltasparse train --phase baseline``, ``--phase l1``, ``--phase delta
--gate pixel --mode hysteresis --input-gate``) with the demo's full budgets
(``deltasparse.demo.DEMO_SETTINGS["full"]``), then ``deltasparse eval --engine``. The JSON
holds every command, each phase's accuracy and counted op fraction, and the engine's executed
density (measured and predicted), latency and agreement on the held-out videos.

A killed run is resumed by running the script again with the same ``--work``: finished
phases (their ``eval.json``) are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import cpu_model

from deltasparse.data import SyntheticActions, write_class_folders
from deltasparse.demo import _ENGINE_KEYS, DEMO_SETTINGS

EXECUTED_MAX = 0.30  # issue 8: the recipe on a folder of realistic videos streams at <= 30%


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltasparse.cli", *args]


def _run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/folder_recipe", help="data, cache and run folders")
    p.add_argument("--out", default="bench/results/folder_recipe.json")
    p.add_argument("--seed", type=int, default=1, help="footage seed (the demo's is 0)")
    args = p.parse_args()
    s = DEMO_SETTINGS["full"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, cache, log = work / "data", work / "cache", work / "log.txt"
    t0 = time.perf_counter()
    if not (data / ".complete").is_file():
        print(f"writing {s['videos']} videos to {data}", flush=True)
        write_class_folders(SyntheticActions(num_videos=s["videos"], num_classes=s["classes"],
                                             frames=s["frames"], size=s["resolution"],
                                             seed=args.seed), data)  # fmt: skip
        (data / ".complete").write_text("")
    common = ["--data", str(data), "--layout", "folder", "--cache-dir", str(cache),
              "--resolution", str(s["resolution"]), "--model", s["model"],
              "--width", str(s["width"]), "--batch-size", str(s["batch_size"]),
              "--eval-clip-len", str(s["frames"] // 2), "--warmup-epochs", "0.5",
              "--threshold-init", str(s["threshold_init"]),
              "--threshold-lr-mult", str(s["threshold_lr_mult"]), "--device", "cpu",
              "--no-progress"]  # fmt: skip
    d = s["delta"]
    phases = {
        "baseline": [],
        "l1": ["--init-from", str(work / "baseline" / "model.pt"),
               "--sparsity-weight", str(s["sparsity_weight"]["l1"])],
        "delta": ["--init-from", str(work / "l1" / "model.pt"), "--clip-len", str(d["clip_len"]),
                  "--gate", d["gate"], "--mode", d["mode"],
                  "--input-gate" if d["input_gate"] else "--no-input-gate",
                  "--sparsity-weight", str(s["sparsity_weight"]["delta"]),
                  *(["--sparsity-schedule", d["sparsity_schedule"]]
                    if "sparsity_schedule" in d else []),
                  *(["--distill", str(d["distill"])] if d.get("distill") else [])],
    }  # fmt: skip
    commands, phase_rows, seconds = [], {}, {}
    for phase, extra in phases.items():
        run = work / phase
        cmd = _cli("train", "--phase", phase, "--out", str(run), "--epochs",
                   str(s["epochs"][phase]), "--lr", str(s["lr"][phase]), *common, *extra)
        commands.append(" ".join(["deltasparse", *cmd[3:]]))
        if not (run / "eval.json").is_file():
            seconds[phase] = _run([*cmd, *(["--force"] if run.exists() else [])], log)
        ev = json.loads((run / "eval.json").read_text())
        phase_rows[phase] = {"accuracy": ev["accuracy"], "op_fraction": ev["op_fraction"],
                             "executed_fraction": (ev.get("sparsity") or {})
                             .get("executed_fraction")}  # fmt: skip
    engine_json = work / "delta" / "eval_engine.json"
    cmd = _cli("eval", "--checkpoint", str(work / "delta" / "model.pt"), "--engine",
               "--streams", str(s["streams"]), "--threads", str(s["threads"]),
               "--out", str(engine_json))
    commands.append(" ".join(["deltasparse", *cmd[3:]]))
    if not engine_json.is_file():
        seconds["eval_engine"] = _run(cmd, log)
    ev = json.loads(engine_json.read_text())
    e = ev["engine"]
    executed = e["executed_density"]
    result = {
        "benchmark": "folder_recipe",
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": s["threads"],
        "footage": {"videos": s["videos"], "classes": s["classes"], "frames": s["frames"],
                    "resolution": s["resolution"], "seed": args.seed, "format": "mp4",
                    "layout": "class folders"},  # fmt: skip
        "commands": commands,
        "phases": phase_rows,
        "engine": {k: e.get(k) for k in _ENGINE_KEYS},
        "goal": {"executed_density_max": EXECUTED_MAX, "met": executed <= EXECUTED_MAX},
        "seconds": seconds,
        "elapsed_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["engine"], indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
