"""Atomic checkpoint and JSON writes: a killed run never leaves a half-written file behind.

A checkpoint (``model.pt`` or ``checkpoint.pt``) is a dict with ``model`` (state dict),
``config`` (the ``TrainConfig`` as a dict), ``num_classes`` and, since class names are stored,
``class_names`` (checkpoints written before that lack it and still load).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_classes", "load_checkpoint", "load_model", "save_atomic", "write_json_atomic"]


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


def sanitize(obj: Any) -> Any:
    """Replace NaN and infinities by ``None`` so that the JSON is strict (readable from JS)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """``obj`` as strict JSON (NaN and infinities written as null), atomically."""
    data = json.dumps(sanitize(obj), indent=2, allow_nan=False).encode()
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
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in ("model", "config", "num_classes")):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not a deltasparse checkpoint (expected keys 'model', 'config' and "
            f"'num_classes', got {have}); pass the model.pt or checkpoint.pt of a run folder"
        )
    return ckpt


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_classes(ckpt: dict, class_names: list[str], *, what: str, data: str) -> None:
    """Refuse a checkpoint whose classes are not those of the data (``what`` names the
    checkpoint, ``data`` the dataset, in the message): the number, and the names in label order
    (case-insensitively) where the checkpoint has them. Scores of a model on other classes are
    wrong but plausible, so this is an error, not a warning."""
    n = int(ckpt["num_classes"])
    saved = ckpt.get("class_names")
    trained = f" ({_names(list(saved))})" if saved else ""
    fix = ("use data with the classes the model was trained on (--data), or a checkpoint "
           "trained on this data")
    if n != len(class_names):
        raise ValueError(
            f"{what} was trained on {n} classes{trained} but {data} has {len(class_names)} "
            f"({_names(list(class_names))}); {fix}")
    if saved is None:
        return
    for label, (a, b) in enumerate(zip(saved, class_names, strict=True)):
        if str(a).lower() != str(b).lower():
            raise ValueError(
                f"{what} and {data} disagree on the classes: label {label} is {a!r} in the "
                f"checkpoint but {b!r} in the data (checkpoint: {_names(list(saved))}; data: "
                f"{_names(list(class_names))}); {fix}")


def load_model(path: str | Path, map_location="cpu") -> tuple:
    """Rebuild the model of a run from its ``model.pt`` (or ``checkpoint.pt``).

    Returns ``(VideoModel, TrainConfig, checkpoint dict)``; ``ckpt.get("class_names")`` is
    None for checkpoints written before class names were stored.
    """
    from .train import TrainConfig, build_model  # the recipe owns model construction

    ckpt = load_checkpoint(path, map_location)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg, ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model, cfg, ckpt
