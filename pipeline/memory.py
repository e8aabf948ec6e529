"""Process-wide allocator settings for a video pipeline (glibc only).

Every frame allocates and frees buffers of the frame's size: the decoded picture, the
probabilities resized to the frame, masks, encoded pictures. glibc serves large blocks
(over its mmap threshold, 128 KiB at first) straight from the kernel and gives freed memory
at the top of its heaps back once more than its trim threshold is free; a pipeline then
pays for fresh, zeroed pages on every frame: hundreds of page faults per 720p frame, the
cost showing up wherever a buffer is first written (resizing the probabilities to the
frame doubled in time). :func:`keep_frame_buffers` raises both limits, so freed frame
buffers stay in the process and are reused by the next frame.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2): blocks up to 32 MiB
# (a 1080p float32 map is 8 MiB) come from the heap. A 4K float map still goes to the kernel.
MMAP_THRESHOLD = 32 << 20
# Free memory a heap keeps before trimming: several frames' worth of buffers at 4K.
TRIM_THRESHOLD = 128 << 20
# The allocator settings a user may have chosen themselves: those are left alone.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied: bool | None = None


def keep_frame_buffers() -> bool:
    """Keep freed frame-sized buffers for reuse instead of returning them to the kernel.

    Applied once per process on Linux with glibc; skipped (False) on other platforms and C
    libraries, and where the environment sets glibc's malloc options (``MALLOC_*_`` variables
    or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``). Returns whether the settings are in
    effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        log.debug("allocator settings left as the environment sets them")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, for one, has no mallopt)
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap_ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    _applied = mmap_ok and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
