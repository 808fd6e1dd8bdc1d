"""Read one run folder (``config.json``, ``metrics.json``, ``eval.json``, ``engine.json``).

Only ``config.json`` is required: a run that has not been evaluated or has logged no epoch
yet still gets a report, and :attr:`RunData.missing` says what could not be shown.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PHASES", "RunData", "load_run"]

log = logging.getLogger(__name__)

#: Training phases in the order of the paper's pipeline (dense → spatial L1 → temporal delta).
PHASES = ("baseline", "l1", "delta_scratch", "delta", "calibrated")


@dataclass
class RunData:
    """The parsed files of one run folder."""

    path: Path
    name: str
    config: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None  # engine.json: the held-out videos through the engine
    missing: list[str] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return str(self.config.get("phase") or (self.eval or {}).get("phase") or "unknown")

    @property
    def model(self) -> str:
        return str(self.config.get("model") or "unknown")

    @property
    def sparsity(self) -> dict[str, Any] | None:
        s = (self.eval or {}).get("sparsity")
        return s if isinstance(s, dict) else None

    @property
    def layers(self) -> list[dict[str, Any]]:
        s = self.sparsity
        return list(s.get("layers") or []) if s else []


def _read_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, eval.json, engine.json)."""
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); the run may have been interrupted while writing "
            f"it: re-run the step that writes it or delete the file"
        ) from e


def load_run(path: str | Path) -> RunData:
    """Load a run folder; raise :class:`FileNotFoundError` when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"run folder {str(path)!r} does not exist or is not a directory; expected a folder "
            f"written by `deltasparse train` (containing config.json, metrics.json, eval.json)"
        )
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a training run folder: expected {cfg_path.name} there "
            f"(written by `deltasparse train`, with metrics.json and, after "
            f"`deltasparse eval`, eval.json)"
        )
    config = _read_object(cfg_path)
    run = RunData(path=path, name=str(config.get("name") or path.name), config=config)

    metrics_path = path / "metrics.json"
    if metrics_path.is_file():
        metrics = _read_json(metrics_path)
        epochs = metrics.get("epochs") if isinstance(metrics, dict) else None
        run.epochs = [e for e in (epochs or []) if isinstance(e, dict)]
        if not run.epochs:
            run.missing.append("metrics.json has no epochs yet: no training curves")
    else:
        run.missing.append("no metrics.json: no training curves")

    eval_path = path / "eval.json"
    if eval_path.is_file():
        run.eval = _read_object(eval_path)
        if run.sparsity is None:
            run.missing.append("eval.json has no 'sparsity' section: no per-layer densities")
        elif not run.layers:
            run.missing.append("eval.json lists no layers: no per-layer densities")
    else:
        run.missing.append(
            "not evaluated (no eval.json): no test accuracy, op reduction or per-layer "
            "densities; run `deltasparse eval` on this folder"
        )
    engine_path = path / "engine.json"
    if engine_path.is_file():
        run.engine = _read_object(engine_path)
    for m in run.missing:
        log.info("report: run %s: %s", run.name, m)
    return run
