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

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "applied", "tune_malloc"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 256 << 20
MMAP_THRESHOLD_FALLBACK = 32 << 20  # glibc <= 2.34 caps it at HEAP_MAX_SIZE / 2 (64-bit)
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_applied: dict | None = None


def applied() -> dict | None:
    """What :func:`tune_malloc` did in this process (None: not called yet). Once raised, the
    thresholds stay raised: a later timing without tuning still runs in that state."""
    return None if _applied is None else dict(_applied)


def tune_malloc() -> dict:
    """Raise glibc's mmap and trim thresholds once per process; returns what was done,
    ``{"allocator": "glibc 2.xx", "mmap_threshold": ..., "trim_threshold": ...}``, or
    ``{"allocator": None, "reason": ...}`` where the C library is not glibc or refuses.

    The mmap threshold is tried at 256 MB, then at 32 MB (the cap of glibc up to 2.34, still
    above the demo model's 12 MB temporaries); the trim threshold is raised only once the mmap
    threshold took, so that what is reported is what the process runs with."""
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
    mmap = next((v for v in (MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK)
                 if libc.mallopt(_M_MMAP_THRESHOLD, v) == 1), None)  # fmt: skip
    if mmap is None:
        _applied = {"allocator": None, "reason": f"{name}: mallopt refused the mmap threshold"}
    elif libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        _applied = {"allocator": name, "mmap_threshold": mmap, "trim_threshold": None,
                    "reason": "mallopt refused the trim threshold"}  # fmt: skip
    else:
        _applied = {"allocator": name, "mmap_threshold": mmap, "trim_threshold": TRIM_THRESHOLD}
    if _applied.get("reason"):
        log.warning("tune_malloc: %s; dense timings may vary with the allocator's state",
                    _applied["reason"])
    else:
        log.info("tune_malloc: %s mmap threshold %d MB, trim threshold %d MB", name, mmap >> 20,
                 TRIM_THRESHOLD >> 20)
    return dict(_applied)
