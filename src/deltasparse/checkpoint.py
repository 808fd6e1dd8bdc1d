"""Atomic checkpoint and JSON writes: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "load_model", "save_atomic", "write_json_atomic"]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json_atomic(obj: Any, path: str | Path) -> None:
    data = json.dumps(obj, indent=2, allow_nan=True).encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the model.pt or checkpoint.pt of a run folder"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} could not be read ({exc}); is it complete?") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(
            f"{path} is not a deltasparse checkpoint (expected keys 'model' and 'config')"
        )
    return ckpt


def load_model(path: str | Path, map_location="cpu") -> tuple:
    """Rebuild the model of a run from its ``model.pt`` (or ``checkpoint.pt``).

    Returns ``(VideoModel, TrainConfig, checkpoint dict)``.
    """
    from .train import TrainConfig, build_model  # the recipe owns model construction

    ckpt = load_checkpoint(path, map_location)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg, ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model, cfg, ckpt
