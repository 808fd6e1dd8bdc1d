"""glibc's allocator thresholds, raised for timing dense and delta inference side by side.

A dense CNN on a batch of streams allocates large per-frame temporaries (the demo model: 12 MB
activations). glibc maps allocations above its adaptive ``M_MMAP_THRESHOLD`` with ``mmap`` and
returns freed heap tops above ``M_TRIM_THRESHOLD`` to the system, so whether each frame's
temporaries page-fault again depends on the allocator's history: on the same frames the demo's
dense model measured 0.21-0.50 ms a frame. Raising both thresholds keeps the temporaries on
the heap, the state in which the dense model is fastest, so a speedup is quoted against the
dense model at its best rather than at the allocator's mercy.

``mallopt`` has no getter: once raised, the thresholds stay for the rest of the process (and
glibc's adaptive threshold is off). Elsewhere than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_applied: dict | None = None


def tune_malloc() -> dict:
    """Raise glibc's mmap and trim thresholds once per process; returns what was done,
    ``{"allocator": "glibc 2.xx", "mmap_threshold": ..., "trim_threshold": ...}``, or
    ``{"allocator": None, "reason": ...}`` where the C library is not glibc."""
    global _applied
    if _applied is not None:
        return dict(_applied)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        _applied = {"allocator": None, "reason": "not glibc: allocator left as it is"}
        log.info("tune_malloc: %s", _applied["reason"])
        return dict(_applied)
    version.restype = ctypes.c_char_p
    name = f"glibc {version().decode()}"
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        _applied = {"allocator": None, "reason": f"{name}: mallopt refused the thresholds"}
        log.warning("tune_malloc: %s; dense timings may vary with the allocator's state",
                    _applied["reason"])
        return dict(_applied)
    _applied = {"allocator": name, "mmap_threshold": MMAP_THRESHOLD,
                "trim_threshold": TRIM_THRESHOLD}  # fmt: skip
    log.info("tune_malloc: %s mmap threshold %d MB, trim threshold %d MB", name,
             MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return dict(_applied)
