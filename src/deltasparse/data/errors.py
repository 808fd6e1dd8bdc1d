"""Errors raised by ``deltasparse.data``.

Every message names the file or folder at fault and what to do about it (DESIGN.md §5).
"""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A dataset cannot be built or read: missing root or split file, empty class, ..."""


class VideoDecodeError(DatasetError):
    """One video file cannot be decoded (corrupt, truncated, no video stream)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}. The file is corrupt or "
                         "truncated; re-download or re-encode it, or delete it.")


class CorruptVideoWarning(UserWarning):
    """A video was skipped because it cannot be decoded (or is missing); the dataset also
    records it in ``skipped``."""
