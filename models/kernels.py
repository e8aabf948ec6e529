"""Compiled CPU kernels for the temporal refiner (numba, optional): loading and status.

The refiner's CPU path for two-class float32 maps is a dozen OpenCV calls per frame. Each is
cheap, but right after the network every call starts with cold caches, so together they cost
several times their warm time. These kernels do the same arithmetic in three calls per
frame: the residual's thumbnail and the residual against the previous one (with its mean),
the motion gate with the box around the previous output's unsure pixels, and the fusion of
the new probabilities with the previous output (finding its box on the way). Results equal
the OpenCV path's to float rounding. The kernels themselves are in ``models.kernels_numba``.

They are used when numba is installed (``pip install 'segstream[jit]'``; the Docker images
and ``make`` install it) and ``SEGSTREAM_JIT`` is not ``0``. Compiled code is cached on disk
(next to ``kernels_numba.py``, or in ``NUMBA_CACHE_DIR`` when set, or numba's user cache when
the package is read-only), so only the first process after an install compiles them (about
five seconds; loading them later takes under one). The engine never waits for that: when a
stream with refinement is added it calls :func:`current`, which starts loading in the
background, and the OpenCV path runs until it is done.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from types import SimpleNamespace

log = logging.getLogger("segstream.kernels")
_lock = threading.Lock()
_start_lock = threading.Lock()
# While numba imports (half a second holding the GIL, in a background thread), the interpreter
# hands the GIL over this often instead of every 5 ms: the engine thread takes it back after
# each torch call without waiting (a live stream switched to refinement drops 6 pictures, not 15).
_LOADING_SWITCH_S = 0.0005
_kernels: SimpleNamespace | None = None
_error: str | None = None
_tried = False
_loader: threading.Thread | None = None


def enabled() -> bool:
    """Whether the kernels may be used: ``SEGSTREAM_JIT`` is not 0/false/off/no."""
    return os.environ.get("SEGSTREAM_JIT", "1").strip().lower() not in ("0", "false", "off", "no")


def load() -> SimpleNamespace | None:
    """The compiled kernels, or None when numba is missing, fails, or they are disabled.

    Compiles (or loads from the cache) once per process; later calls return at once.
    """
    global _kernels, _error, _tried
    if not enabled():
        return None
    if _tried:
        return _kernels
    with _lock:
        if not _tried:
            interval = sys.getswitchinterval()
            sys.setswitchinterval(_LOADING_SWITCH_S)
            try:
                _kernels = _compile()
                log.info("temporal refinement: compiled CPU kernels ready (numba %s)", _kernels.version)
            except ImportError as e:
                _error = f"{type(e).__name__}: {e}"
                log.info("temporal refinement: numba is not installed, the CPU path uses OpenCV")
            except Exception as e:  # any failure means the OpenCV path, which gives the same results
                _error = f"{type(e).__name__}: {e}"
                log.warning("temporal refinement: the CPU kernels failed to compile (%s): OpenCV", _error)
            finally:
                sys.setswitchinterval(interval)
            _tried = True
    return _kernels


def current() -> SimpleNamespace | None:
    """The kernels if they are loaded, else None, without waiting: the first call starts
    loading them in a background thread."""
    global _loader
    if _tried or not enabled():
        return _kernels if enabled() else None
    if _loader is None:
        with _start_lock:  # not ``_lock``: the loader holds that while it compiles
            if _loader is None:
                _loader = threading.Thread(target=load, name="jit-kernels", daemon=True)
                _loader.start()
    return None


def status() -> str:
    """One line for logs: which implementation the refiner's CPU path uses, and why."""
    if not enabled():
        return "OpenCV (SEGSTREAM_JIT=0)"
    k = load()
    if k is not None:
        return f"numba {k.version}"
    return f"OpenCV ({_error or 'numba not installed'})"


def _compile() -> SimpleNamespace:
    from models import kernels_numba as k

    return SimpleNamespace(
        version=k.numba.__version__, thumbnail=k.thumbnail, residual=k.residual, gate=k.gate, fuse=k.fuse
    )
