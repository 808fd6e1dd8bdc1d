"""``run_stream``: delta inference over a real video file.

Frames are decoded one at a time with PyAV (imported lazily), optionally resized by FFmpeg,
normalised with the ImageNet statistics and fed to :class:`DeltaEngine`. Returns (and
optionally writes as JSON) the per-frame predictions, per-frame density and time, and the
engine stats; ``verify_every=N`` also runs the dense model every N frames and gives a
verdict: the largest relative output difference against a tolerance, and the top-1 agreement.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .engine import DeltaEngine
from .layers import is_stateful, streaming

__all__ = ["StreamVerificationError", "engine_fps", "iter_video", "run_stream", "to_tensor",
           "verify_message", "verify_summary"]

log = logging.getLogger(__name__)


def iter_video(path: str | Path, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """uint8 RGB frames ``(H, W, 3)`` of a video file, decoded lazily (``size`` = (H, W))."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video {path} has no video stream")
            n = 0
            for frame in container.decode(container.streams.video[0]):
                if size is not None:
                    frame = frame.reformat(width=size[1], height=size[0])
                n += 1
                yield frame.to_ndarray(format="rgb24")
            if n == 0:
                raise ValueError(f"video {path} has no decodable frame")
    except av.error.FFmpegError as exc:
        raise ValueError(f"video {path} could not be decoded ({exc}); is it complete?") from exc


def to_tensor(rgb: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> ``(1, 3, H, W)``, normalised exactly as the training loader does."""
    from .data.transforms import normalize_frames

    return normalize_frames(rgb[None]).to(device=device, dtype=dtype)


def _class_names(cfg, ckpt: dict) -> list[str] | None:
    """The class names of a run (index = class id), when its checkpoint or data tell them."""
    n = ckpt.get("num_classes")
    names = ckpt.get("class_names")
    if names is None and getattr(cfg, "data", None) == "synthetic":
        from .data import MOTIONS

        names = list(MOTIONS[: int(n or 0)])
    elif names is None and getattr(cfg, "data", None):
        names = _folder_class_names(Path(cfg.data))
    if names is None or (n is not None and len(names) != int(n)):
        return None
    return [str(v) for v in names]


def _folder_class_names(root: Path) -> list[str] | None:
    """UCF101's classInd.txt, else the sorted class sub-folders (the two data layouts)."""
    from .data.layout import SPLITS_FOLDER, find_splits_dir

    try:
        splits = find_splits_dir(root)
        if splits is not None:
            lines = (splits / "classInd.txt").read_text().split("\n")
            pairs = sorted((int(a), b) for a, b in (ln.split() for ln in lines if ln.strip()))
            return [b for _, b in pairs]
        return sorted(p.name for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name != SPLITS_FOLDER)
    except (OSError, ValueError) as exc:  # the data folder moved or is another machine's
        log.info("run_stream: no class names from %s (%s)", root, exc)
        return None


def _load(checkpoint: str | Path) -> tuple[nn.Module, tuple[int, int] | None, list[str] | None]:
    from .checkpoint import load_model

    model, cfg, ckpt = load_model(checkpoint)
    res = getattr(cfg, "resolution", None)
    return model, ((int(res), int(res)) if res else None), _class_names(cfg, ckpt)


def engine_fps(times_ms) -> float | None:
    """Frames per second of the engine: frames / the sum of their ``step()`` times. The one
    definition of the live bar and of the JSON (decoding and verification excluded)."""
    times = list(times_ms)
    total = sum(times)
    return 1e3 * len(times) / total if total > 0 else None


class StreamVerificationError(RuntimeError):
    """``run_stream(verify_every=N)`` found the engine off the dense model by more than the
    tolerance; ``.result`` holds the full result (also written to ``out``)."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


def _compare(dense_y: torch.Tensor, y: torch.Tensor) -> dict:
    """Relative error ``max |dense - engine| / max |dense|`` and top-1 of one frame."""
    abs_err = float((dense_y - y).abs().max())
    scale = float(dense_y.abs().max())
    out = {"max_abs_err": abs_err, "rel_err": abs_err / scale if scale > 0 else abs_err}
    if y.dim() == 2:
        out["top1_match"] = bool((dense_y.argmax(-1) == y.argmax(-1)).all())
    return out


def verify_summary(checks: list[dict], every: int, rtol: float) -> dict | None:
    """The verdict of the verified frames (``None`` when nothing was verified)."""
    if not checks:
        return None
    worst = max(checks, key=lambda c: c["rel_err"])
    failed = [c["frame"] for c in checks if not c["rel_err"] <= rtol]  # NaN fails
    top1 = [c["top1_match"] for c in checks if "top1_match" in c]
    return {
        "every": every,
        "frames": len(checks),
        "tolerance": rtol,
        "max_rel_err": worst["rel_err"],
        "max_abs_err": max(c["max_abs_err"] for c in checks),
        "worst_frame": worst["frame"],
        "failed_frames": failed,
        "top1_agreement": sum(top1) / len(top1) if top1 else None,
        "top1_frames": len(top1),
        "passed": not failed,
    }


def verify_message(v: dict) -> str:
    """One line: the verdict, the worst relative error against the tolerance, top-1 agreement."""
    verdict = "PASS" if v["passed"] else "FAIL"
    cmp = "<=" if v["passed"] else ">"
    line = (f"verify {verdict}: max relative error {v['max_rel_err']:.2e} {cmp} tolerance "
            f"{v['tolerance']:.0e} (frame {v['worst_frame']}; {v['frames']} frames checked, "
            f"every {v['every']})")  # fmt: skip
    if not v["passed"]:
        line += f"; {len(v['failed_frames'])} of {v['frames']} frames over"
    if v["top1_agreement"] is not None:
        agree = round(v["top1_agreement"] * v["top1_frames"])
        line += (f"; top-1 agreement {v['top1_agreement']:.1%} "
                 f"({agree}/{v['top1_frames']})")  # fmt: skip
    return line


def run_stream(
    video: str | Path,
    checkpoint: str | Path | None = None,
    *,
    model: nn.Module | None = None,
    device: str = "cpu",
    backend: str = "auto",
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    verify_every: int = 0,
    rtol: float = 1e-4,
    strict: bool = True,
    out: str | Path | None = None,
    labels: list[str] | None = None,
    on_frame: Callable[[dict], None] | None = None,
) -> dict:
    """Run delta inference over ``video``; returns a JSON-able dict (written to ``out``).

    Give either ``checkpoint`` (a run's ``model.pt``; its training resolution is used unless
    ``size`` is given, and its class names unless ``labels`` is) or ``model`` (a converted
    per-frame model or ``VideoModel``). ``on_frame(info)`` is called after each frame (the
    CLI's progress bar).

    ``verify_every=N`` runs the dense model on every N-th frame: ``result["verify"]`` holds the
    verdict (largest relative error ``max |dense - engine| / max |dense|`` against ``rtol``,
    top-1 agreement). A failed verification raises :class:`StreamVerificationError` after the
    JSON is written (``strict=False``: only ``result["verify"]["passed"]`` is False).
    ``engine_fps`` is frames / the sum of the ``step()`` times (see :func:`engine_fps`).
    """
    if (checkpoint is None) == (model is None):
        raise ValueError("run_stream needs exactly one of checkpoint= or model=")
    if verify_every < 0:
        raise ValueError(f"verify_every must be >= 0 (0: never), got {verify_every}")
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
    if model is None:
        model, ckpt_size, ckpt_labels = _load(checkpoint)
        size = size or ckpt_size
        labels = labels if labels is not None else ckpt_labels
    model = model.to(device).eval()
    dense = getattr(model, "frame_model", model)
    engine = DeltaEngine(model, backend=backend)
    # Hysteresis layers depend on the stream: the dense reference then streams too (every
    # frame, its layers keeping their references), and is compared every N-th frame.
    stateful = is_stateful(dense)
    with streaming(dense) if verify_every and stateful else nullcontext():
        return _run(video, checkpoint, model, dense, engine, device=device, size=size,
                    max_frames=max_frames, verify_every=verify_every, rtol=rtol,
                    strict=strict, out=out, labels=labels, on_frame=on_frame,
                    stateful=stateful)  # fmt: skip


def _run(video, checkpoint, model, dense, engine, *, device, size, max_frames, verify_every,
         rtol, strict, out, labels, on_frame, stateful):  # fmt: skip
    frames: list[dict] = []
    checks: list[dict] = []
    prev_eff = prev_dense = 0
    t_start = time.perf_counter()
    for i, rgb in enumerate(iter_video(video, size)):
        if max_frames is not None and i >= max_frames:
            break
        x = to_tensor(rgb, device)
        t0 = time.perf_counter()
        y = engine.step(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        st = engine.stats
        eff, dn = st.effective_macs - prev_eff, st.dense_macs - prev_dense
        prev_eff, prev_dense = st.effective_macs, st.dense_macs
        info = {"frame": i, "time_ms": 1e3 * dt, "density": eff / dn if dn else None}
        if y.dim() == 2:
            prob = y.float().softmax(-1)[0]
            k = int(prob.argmax())
            info["pred"] = k
            info["score"] = float(prob[k])
            if labels is not None and k < len(labels):
                info["label"] = labels[k]
        if verify_every and stateful and i % verify_every:
            with torch.no_grad():
                dense(x)  # advance the streaming reference
        if verify_every and i % verify_every == 0:
            with torch.no_grad():
                check = {"frame": i, **_compare(dense(x), y)}
            info.update({k: v for k, v in check.items() if k != "frame"})
            checks.append(check)
        frames.append(info)
        if on_frame is not None:
            on_frame(info)
    if not frames:
        raise ValueError(f"video {video} gave no frames")
    wall = time.perf_counter() - t_start
    st = engine.stats.to_dict()
    verify = verify_summary(checks, verify_every, rtol)
    result = {
        "video": str(video),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "device": device,
        "backend": engine.backend.name,
        "frames": len(frames),
        "height": int(x.shape[2]),
        "width": int(x.shape[3]),
        "engine_fps": engine_fps(f["time_ms"] for f in frames),
        "fps_definition": "frames / sum of engine.step() times",
        "wall_s": wall,
        "density": st["density"],
        "ideal_speedup": st["ideal_speedup"],
        "labels": labels,
        "max_abs_err": None if verify is None else verify["max_abs_err"],
        "verify": verify,
        "per_frame": frames,
        "stats": st,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, allow_nan=False))
        log.info("run_stream: wrote %s", out)
    if verify is not None and not verify["passed"] and strict:
        raise StreamVerificationError(
            f"run_stream: the engine is off the dense model on {video}: {verify_message(verify)}"
            "; per-frame errors are in the result (rel_err); pass a larger rtol if flips at "
            "quantiser boundaries are expected", result
        )
    return result
