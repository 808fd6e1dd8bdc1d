"""Decode video files with PyAV (imported lazily, inside the functions).

``decode_video`` returns all frames as uint8 ``(F, H, W, 3)`` RGB, optionally resized by
FFmpeg's swscale while decoding (area filter: cheap and alias-free when shrinking) and
temporally subsampled (keep every ``step``-th frame). Any FFmpeg error, a file with no
video stream, no decodable frame, or far fewer frames than the container declares
(a truncated file) raises ``VideoDecodeError`` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VideoDecodeError
from .transforms import Size, resized_hw

VIDEO_EXTENSIONS: tuple[str, ...] = (".avi", ".mp4", ".mkv", ".webm")


@dataclass(frozen=True)
class VideoInfo:
    """What a cheap probe learns: frame size and the frame count the container declares
    (0 when the container does not say)."""

    height: int
    width: int
    declared_frames: int


def _truncated(count: int, declared: int) -> bool:
    # Headers round (and VFR durations estimate) the count; only a clear shortfall means
    # lost data.
    return declared > 0 and count < declared - max(3, int(0.1 * declared))


def _declared_frames(container, stream) -> int:
    """Frame count from the header (AVI, MP4), else estimated from the container duration
    (Matroska/WebM keep it in the header even when the file is cut); 0 if unknown."""
    if stream.frames:
        return int(stream.frames)
    if container.duration and stream.average_rate:
        return round(container.duration * 1e-6 * float(stream.average_rate))
    return 0


def probe_video(path: str | Path) -> VideoInfo:
    """Check a file without decoding it all: open it, decode the first frame, and count the
    compressed packets against the declared frame count (reading packets costs I/O only).

    Catches garbage, files without video, and truncated files; raises ``VideoDecodeError``."""
    import av

    path = Path(path)
    first = None
    packets = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # one frame: threads cost more than they save
            declared = _declared_frames(container, stream)
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                packets += 1
                if first is None:
                    first = next(iter(stream.decode(packet)), None)
            if first is None:  # decoders with delay return the first frame on flush
                first = next(iter(stream.decode(None)), None)
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoDecodeError(path, f"{type(exc).__name__}: {exc}") from exc
    if first is None:
        raise VideoDecodeError(path, "no decodable frame")
    if _truncated(packets, declared):
        raise VideoDecodeError(path, f"truncated: {packets} of {declared} frames present")
    return VideoInfo(first.height, first.width, declared)


def decode_video(path: str | Path, *, size: Size | None = None, step: int = 1,
                 threads: int = 1) -> np.ndarray:
    """All frames (every ``step``-th) as uint8 ``(F, H, W, 3)``, resized to ``size``
    (an int short side, or ``(H, W)``) if given.

    ``threads`` is FFmpeg's decoder thread count (0: automatic). One is fastest for small
    videos decoded many at a time (DataLoader workers, the cache scan); use 0 for one
    large video."""
    import av

    path = Path(path)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    frames: list[np.ndarray] = []
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            if threads != 1:
                stream.thread_type = "AUTO"
            declared = _declared_frames(container, stream)
            for frame in container.decode(stream):
                decoded += 1
                if (decoded - 1) % step:
                    continue
                if size is not None:
                    h, w = resized_hw(frame.height, frame.width, size)
                    if (h, w) != (frame.height, frame.width):
                        frame = frame.reformat(width=w, height=h, interpolation="AREA")
                frames.append(frame.to_ndarray(format="rgb24"))
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoDecodeError(path, f"{type(exc).__name__} after {decoded} frames: {exc}"
                               ) from exc
    if not frames:
        raise VideoDecodeError(path, "no decodable frame")
    if _truncated(decoded, declared):
        raise VideoDecodeError(path, f"truncated: decoded {decoded} of {declared} frames")
    return np.stack(frames)
