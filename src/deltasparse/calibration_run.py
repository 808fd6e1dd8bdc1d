"""``deltasparse calibrate``: a run folder made without training -- gates inserted into a
finished baseline run and their steps picked on its unlabeled training clips
(:func:`deltasparse.calibrate`; the practice of DeltaCNN and CBinfer).

The folder looks like a trained one (``config.json`` with ``phase="calibrated"``, ``model.pt``,
``eval.json``) plus ``calibration.json`` (the search record), so ``eval``, ``stream``,
``report`` and the engine stage read it as they read any run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from .calibrate import CalibrationResult, calibrate, parse_target
from .checkpoint import load_model, save_atomic, write_json_atomic
from .layers import VideoModel

__all__ = ["calibrate_run"]

log = logging.getLogger(__name__)


def calibrate_run(checkpoint: str | Path, out: str | Path, *, target: dict | str,
                  clips: int = 64, gate: str = "pixel", mode: str = "hysteresis",
                  input_gate: bool = True, engine: str = "auto", force: bool = False,
                  device: str = "cpu",
                  progress: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Calibrate the baseline run ``checkpoint`` into the run folder ``out``.

    ``clips`` unlabeled training clips (the run's own training clips, labels unused) drive the
    search. Returns the evaluation of the calibrated model (also ``out/eval.json``), with the
    calibration record under ``"calibration"``.
    """
    from .train import _clear_run, build_datasets, delta_config, evaluate, run_state

    out = Path(out)
    name, goal = parse_target(target)  # fail before loading anything
    if run_state(out) != "new" and not force:
        raise ValueError(f"{out} already holds a run; pass another --out, or --force to "
                         f"replace it")
    if Path(checkpoint).resolve().parent == out.resolve():
        raise ValueError(f"--out {out} is the folder of the baseline --checkpoint {checkpoint}; "
                         "a calibrated run gets its own folder (pass another --out)")
    base, cfg, ckpt = load_model(checkpoint, map_location=device)
    if cfg.phase != "baseline":
        raise ValueError(f"calibrate needs a baseline run (trained without sparsity layers), "
                         f"but {checkpoint} is a {cfg.phase!r} run")
    if not isinstance(clips, int) or clips < 1:
        raise ValueError(f"--clips must be an integer >= 1, got {clips!r}")
    ccfg = dataclasses.replace(cfg, phase="calibrated", out=str(out), name=out.name,
                               init_from=str(checkpoint), gate=gate, mode=mode,
                               input_gate=input_gate)  # fmt: skip
    train_set, eval_set, num_classes = build_datasets(ccfg)
    torch.manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=cfg.workers)  # fmt: skip
    dcfg = dataclasses.replace(delta_config(ccfg), threshold_trainable=False)
    base = base.to(device).eval()
    result: CalibrationResult = calibrate(base, loader, target={name: goal}, config=dcfg,
                                          engine=engine, max_clips=clips,
                                          progress=progress)  # fmt: skip
    model = VideoModel(result.model).eval()
    if not result.met:
        log.warning("calibrate: the target %s %s %g was not met even at the %s steps "
                    "searched (achieved %s)", name, "<=" if name != "agreement" else ">=", goal,
                    "largest" if name == "executed_density" else "smallest", result.achieved)
    ev = evaluate(model, eval_set, ccfg, torch.device(device))
    ev["calibration"] = result.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    _clear_run(out)  # --force: nothing of the replaced run stays next to the new model
    write_json_atomic(ccfg.to_dict(), out / "config.json")
    write_json_atomic(result.to_dict(), out / "calibration.json")
    write_json_atomic(ev, out / "eval.json")  # model.pt last: it marks the run finished
    save_atomic({"model": model.state_dict(), "config": ccfg.to_dict(),
                 "num_classes": num_classes, "class_names": list(train_set.class_names),
                 "calibration": result.to_dict()}, out / "model.pt")  # fmt: skip
    return ev
