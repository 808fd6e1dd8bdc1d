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
# Live-camera settings (no B-frames, no lookahead, as IP cameras stream). They also make the
# output reproducible: with x264's lookahead, PyAV gave a different bitstream from run to run.
_X264_OPTIONS = {"preset": "veryfast", "tune": "zerolatency"}


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


def _encode_all(container, stream, frames: np.ndarray) -> None:
    """Encode and mux every frame, then flush.

    Each frame is converted to the stream's pixel format here and kept alive until the flush,
    so that no queued picture can outlive its buffer."""
    import av

    keep = []
    for arr in frames:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        frame = frame.reformat(format=stream.pix_fmt)
        keep.append(frame)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    del keep


def write_video(path: str | Path, frames: np.ndarray, *, fps: int = 25,
                codec: str | None = None, bits_per_pixel: float = 1.5, crf: int = 18) -> str:
    """Encode uint8 ``frames`` ``(F, H, W, 3)`` (RGB) to ``path``; returns the encoder used.

    ``bits_per_pixel`` sets the bit rate (``H*W*fps*bits_per_pixel``) for encoders without
    a quality setting; libx264 uses ``crf`` (18: visually lossless; 23: x264's default, what
    cameras and web video typically use)."""
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
                stream.options = _X264_OPTIONS | {"crf": str(int(crf))}
            else:
                stream.bit_rate = max(64_000, int(h * w * fps * bits_per_pixel))
            _encode_all(container, stream, frames)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return name


def compress_video(frames: np.ndarray, *, crf: int = 23, fps: int = 25) -> np.ndarray:
    """``frames`` (uint8 ``(F, H, W, 3)``, even H and W) through libx264 at ``crf`` and back,
    in memory: the blocking, quantisation and skipped blocks of real compressed footage."""
    import io

    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise DatasetError(f"compress_video: expected non-empty uint8 frames (F, H, W, 3), got "
                           f"{frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise DatasetError(f"compress_video: frame size {h}x{w} must be even for 4:2:0 video")
    if not has_encoder("libx264"):
        raise DatasetError("compress_video needs PyAV with libx264 (the PyPI 'av' wheels have "
                           "it); install such a build or pass crf=None")
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = _X264_OPTIONS | {"crf": str(int(crf))}
        _encode_all(container, stream, frames)
    buf.seek(0)
    with av.open(buf, "r", format="h264") as container:
        # copy while the frame lives: the array can be a view of the frame's buffer
        out = [f.to_ndarray(format="rgb24").copy() for f in container.decode(video=0)]
    if len(out) != len(frames):
        raise DatasetError(f"compress_video: {len(frames)} frames in, {len(out)} out")
    return np.stack(out)
