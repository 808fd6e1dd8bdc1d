"""Write uint8 frames to a real video file with PyAV.

The encoder is picked from the file extension, first available wins:
``.mp4``/``.mkv``: libx264, then mpeg4; ``.avi``: mpeg4 (the MPEG-4 part 2 / Xvid family
UCF101 ships), then mjpeg; ``.webm``: libvpx-vp9, then libvpx. Files are written to a
temporary name and renamed into place, so an interrupted run never leaves a half file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from .errors import DatasetError

_CONTAINERS = {".mp4": "mp4", ".avi": "avi", ".mkv": "matroska", ".webm": "webm"}
_ENCODERS = {
    ".mp4": ("libx264", "mpeg4"),
    ".avi": ("mpeg4", "mjpeg"),
    ".mkv": ("libx264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
}
_PIX_FMT = {"mjpeg": "yuvj420p"}


def has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with codec ``name``."""
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:  # PyAV raises several types for an unknown codec
        return False
    return True


def pick_encoder(suffix: str, codec: str | None = None) -> str:
    """The encoder used for a file with extension ``suffix`` (or check ``codec``)."""
    suffix = suffix.lower()
    if suffix not in _CONTAINERS:
        raise DatasetError(f"unsupported video extension {suffix!r}; use one of "
                           f"{sorted(_CONTAINERS)}")
    candidates = (codec,) if codec else _ENCODERS[suffix]
    for name in candidates:
        if has_encoder(name):
            return name
    raise DatasetError(f"none of the encoders {candidates} is available in this PyAV build "
                       f"for {suffix} files; install a PyAV wheel with FFmpeg encoders or "
                       "choose another format")


def write_video(path: str | Path, frames: np.ndarray, *, fps: int = 25,
                codec: str | None = None, bits_per_pixel: float = 1.5) -> str:
    """Encode uint8 ``frames`` ``(F, H, W, 3)`` (RGB) to ``path``; returns the encoder used.

    ``bits_per_pixel`` sets the bit rate (``H*W*fps*bits_per_pixel``) for encoders without
    a quality setting; libx264 uses ``crf=18`` (visually lossless)."""
    import av

    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise DatasetError(f"write_video({path}): expected non-empty uint8 frames (F, H, W, 3),"
                           f" got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise DatasetError(f"write_video({path}): frame size {h}x{w} must be even for 4:2:0 "
                           "video; crop or resize to an even size")
    name = pick_encoder(path.suffix, codec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        with av.open(str(tmp), "w", format=_CONTAINERS[path.suffix.lower()]) as container:
            stream = container.add_stream(name, rate=fps)
            stream.width, stream.height = w, h
            stream.pix_fmt = _PIX_FMT.get(name, "yuv420p")
            if h * w <= 256 * 256:  # encoder threads cost more than they save on tiny frames
                stream.codec_context.thread_count = 1
            if name == "libx264":
                stream.options = {"crf": "18", "preset": "veryfast"}
            else:
                stream.bit_rate = max(64_000, int(h * w * fps * bits_per_pixel))
            for arr in frames:
                frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return name
