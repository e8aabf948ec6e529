"""Device names: the one place ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` are interpreted.

Every entry point (the server's start-up check, the stream manager, ``segstream segment``,
``segstream eval``, the segmenter itself) resolves the configured name here, so an unknown
name or a CUDA device this machine does not have is one clear ``ValueError`` before any
model is built, never a failure deep inside torch.
"""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"^cuda(?::(\d{1,3}))?$")


def resolve_device(name: str) -> str:
    """The torch device string for ``name``: ``auto`` is ``cuda`` when a GPU is usable, else ``cpu``.

    Raises ValueError (one line) for a name other than auto, cpu, cuda, cuda:N, and for a
    CUDA device this machine cannot use (a torch build without CUDA, no GPU visible, or an
    index beyond the GPUs present).
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    m = _CUDA.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown device {name!r}: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device found"
        raise ValueError(f"device {name!r} requested but {why}; use --device cpu or auto")
    count = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= count:
        raise ValueError(
            f"device {name!r} requested but only {count} CUDA device(s) present (cuda:0 to cuda:{count - 1})"
        )
    return name


def check_device(name: str) -> None:
    """Raise ValueError (one line) unless ``name`` is a device this machine can run on."""
    resolve_device(name)
