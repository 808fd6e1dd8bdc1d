"""Which frames of a video make up a clip.

A clip is ``clip_len`` frames taken every ``stride`` frames, so it spans
``(clip_len - 1) * stride + 1`` frames of the video. Training takes one clip at a uniformly
random start; evaluation takes ``n`` clips at evenly spaced starts from the first possible
start to the last (one clip: the centre one). A video shorter than the span is padded by
repeating its last frame, so every clip has exactly ``clip_len`` frames.
"""

from __future__ import annotations

import numpy as np


def clip_span(clip_len: int, stride: int) -> int:
    """Number of video frames covered by a clip."""
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got clip_len={clip_len}, "
                         f"stride={stride}")
    return (clip_len - 1) * stride + 1


def clip_indices(num_frames: int, clip_len: int, stride: int, start: int) -> np.ndarray:
    """Frame indices of the clip starting at ``start``; indices past the end repeat the
    last frame (padding for short videos)."""
    if num_frames < 1:
        raise ValueError("cannot take a clip from a video with no frames")
    idx = start + stride * np.arange(clip_len)
    return np.minimum(idx, num_frames - 1)


def random_start(num_frames: int, clip_len: int, stride: int,
                 rng: np.random.Generator) -> int:
    """A uniformly random start such that the clip fits inside the video (0 if it cannot)."""
    last = max(num_frames - clip_span(clip_len, stride), 0)
    return int(rng.integers(0, last + 1))


def even_starts(num_frames: int, clip_len: int, stride: int, n: int) -> list[int]:
    """``n`` evenly spaced starts covering the video; ``n == 1`` gives the centre clip."""
    if n < 1:
        raise ValueError(f"clips per video must be >= 1, got {n}")
    last = max(num_frames - clip_span(clip_len, stride), 0)
    if n == 1:
        return [last // 2]
    return [int(s) for s in np.rint(np.linspace(0, last, n))]
