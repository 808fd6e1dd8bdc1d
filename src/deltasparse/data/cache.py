"""On-disk frame cache: decode each video once, then memory-map it every epoch.

Decoding ``.avi`` files every epoch dominates CPU training time, so ``FrameCache`` keeps the
decoded frames of each video as one uint8 ``(F, H, W, 3)`` ``.npy`` file, loaded with
``mmap_mode="r"`` (a clip reads only the frames and crop it needs).

Layout: ``cache_dir/<tag>/<stem>-<path hash>-<fingerprint>.npy`` where ``tag`` names the
decode settings (resize and temporal step), ``path hash`` the absolute source path and
``fingerprint`` the source's size and ``mtime_ns``. A changed source file therefore gets a
new entry (the stale one is deleted when the new one is written). A video that fails to
decode gets a ``.bad`` entry holding the reason, so later runs skip it without decoding.
Writes go to a temporary file that is renamed into place (``os.replace`` is atomic), so a
killed run never leaves a half-written entry.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import VideoDecodeError


def _serialise_ast_parse() -> None:
    """Let one thread at a time build Python ASTs (``ast.parse``).

    ``np.load`` parses each ``.npy`` header with ``ast.literal_eval``, and the loaders read
    cache entries from several threads while the main thread parses too (numpy, inspect,
    matplotlib). CPython before 3.13 keeps the AST constructor's recursion depth in state
    shared by all threads; a thread switch inside the constructor (a garbage collection
    running a finalizer) corrupts it, and ``ast.parse`` raises ``SystemError: AST
    constructor recursion depth mismatch`` (python/cpython#106905; seen here on 3.11.7 in a
    demo run). The wrapper changes nothing else (a reentrant lock: a finalizer may parse).
    """
    if sys.version_info >= (3, 13) or getattr(ast.parse, "_deltasparse_serialised", False):
        return
    lock = threading.RLock()
    parse = ast.parse

    @functools.wraps(parse)
    def serialised(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    serialised._deltasparse_serialised = True
    ast.parse = serialised


_serialise_ast_parse()

logger = logging.getLogger(__name__)

_STALE_TMP_S = 3600.0


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class FrameCache:
    """Decoded-frame cache under ``root/tag`` (see the module docstring)."""

    def __init__(self, root: str | Path, tag: str = "default") -> None:
        if not re.fullmatch(r"[\w.\-]+", tag):
            raise ValueError(f"cache tag {tag!r} must be a plain file name")
        self.dir = Path(root).expanduser() / tag
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the frame cache folder {self.dir}: {exc}; "
                          "pass a writable cache_dir (or cache_dir=None)") from exc
        self._remove_stale_tmp()

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.dir.glob("*.tmp*"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass  # another process removed or is writing it

    def _prefix(self, source: Path) -> str:
        # Only [A-Za-z0-9_.-] survive, so the prefix is also a literal glob pattern.
        stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", source.stem)[:60]
        return f"{stem}-{_digest(str(source.resolve()))}"

    def entry(self, source: str | Path) -> Path:
        """Cache path (``.npy``) for the current version of ``source``."""
        source = Path(source)
        st = source.stat()
        return self.dir / f"{self._prefix(source)}-{_digest(f'{st.st_size}:{st.st_mtime_ns}')}.npy"

    def load(self, source: str | Path) -> np.ndarray | None:
        """Memory-mapped frames of ``source``, or None if not cached (or stale)."""
        path = self.entry(source)
        if not path.exists():
            return None
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            logger.warning("unreadable cache entry %s (%s); decoding again", path, exc)
            return None

    def bad_reason(self, source: str | Path) -> str | None:
        """Why ``source`` (this version of it) failed to decode before, or None."""
        bad = self.entry(source).with_suffix(".bad")
        return bad.read_text() if bad.exists() else None

    def _atomic_write(self, path: Path, write: Callable[[object], None]) -> None:
        tmp = path.with_name(f"{path.name}.tmp{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _drop_stale(self, source: Path, keep: Path) -> None:
        for old in self.dir.glob(f"{self._prefix(source)}-*"):
            if old.stem != keep.stem and ".tmp" not in old.name:
                old.unlink(missing_ok=True)

    def store(self, source: str | Path, frames: np.ndarray) -> Path:
        """Write ``frames`` as the entry of ``source`` (atomically); returns its path."""
        source = Path(source)
        path = self.entry(source)
        arr = np.ascontiguousarray(frames, dtype=np.uint8)
        self._atomic_write(path, lambda fh: np.save(fh, arr))
        self._drop_stale(source, path)
        return path

    def mark_bad(self, source: str | Path, reason: str) -> None:
        source = Path(source)
        path = self.entry(source).with_suffix(".bad")
        self._atomic_write(path, lambda fh: fh.write(reason.encode()))
        self._drop_stale(source, path)

    def get(self, source: str | Path, decode: Callable[[Path], np.ndarray]) -> np.ndarray:
        """Cached frames of ``source``, decoding (and storing) them on a miss.

        Raises ``VideoDecodeError`` for a video that fails now or failed before."""
        source = Path(source)
        frames = self.load(source)
        if frames is not None:
            return frames
        reason = self.bad_reason(source)
        if reason is not None:
            raise VideoDecodeError(source, f"{reason} (remembered in {self.dir})")
        try:
            frames = decode(source)
        except VideoDecodeError as exc:
            self.mark_bad(source, exc.reason)
            raise
        self.store(source, frames)
        return frames

