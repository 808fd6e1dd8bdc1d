"""``run_stream``: delta inference over a real video file.

Frames are decoded one at a time with PyAV (imported lazily), optionally resized by FFmpeg,
normalised with the ImageNet statistics and fed to :class:`DeltaEngine`. Returns (and
optionally writes as JSON) the per-frame predictions, per-frame density and time, and the
engine stats; ``verify_every=N`` also runs the dense model every N frames and records the
largest output difference.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .engine import DeltaEngine

__all__ = ["iter_video", "run_stream"]

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


def _load(checkpoint: str | Path) -> tuple[nn.Module, tuple[int, int] | None]:
    from .checkpoint import load_model

    model, cfg, _ = load_model(checkpoint)
    res = getattr(cfg, "resolution", None)
    return model, ((int(res), int(res)) if res else None)


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
    out: str | Path | None = None,
    labels: list[str] | None = None,
    on_frame: Callable[[dict], None] | None = None,
) -> dict:
    """Run delta inference over ``video``; returns a JSON-able dict (written to ``out``).

    Give either ``checkpoint`` (a run's ``model.pt``; its training resolution is used unless
    ``size`` is given) or ``model`` (a converted per-frame model or ``VideoModel``).
    ``on_frame(info)`` is called after each frame (the CLI's progress bar).
    """
    if (checkpoint is None) == (model is None):
        raise ValueError("run_stream needs exactly one of checkpoint= or model=")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available; use --device cpu")
    if model is None:
        model, ckpt_size = _load(checkpoint)
        size = size or ckpt_size
    model = model.to(device).eval()
    dense = getattr(model, "frame_model", model)
    engine = DeltaEngine(model, backend=backend)
    frames: list[dict] = []
    max_err = 0.0
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
        if verify_every and i % verify_every == 0:
            with torch.no_grad():
                err = float((dense(x) - y).abs().max())
            info["max_abs_err"] = err
            max_err = max(max_err, err)
        frames.append(info)
        if on_frame is not None:
            on_frame(info)
    if not frames:
        raise ValueError(f"video {video} gave no frames")
    wall = time.perf_counter() - t_start
    st = engine.stats
    step_s = sum(f["time_ms"] for f in frames) / 1e3
    result = {
        "video": str(video),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "device": device,
        "backend": engine.backend.name,
        "frames": len(frames),
        "height": int(x.shape[2]),
        "width": int(x.shape[3]),
        "engine_fps": len(frames) / step_s if step_s else None,
        "wall_s": wall,
        "density": st.density,
        "ideal_speedup": st.ideal_speedup,
        "max_abs_err": max_err if verify_every else None,
        "per_frame": frames,
        "stats": st.to_dict(),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        log.info("run_stream: wrote %s", out)
    return result
