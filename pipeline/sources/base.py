"""The interface every source implements, and the errors it raises.

A source only decodes. Numbering frames, stamping capture times, pacing, reconnecting
and watching for stalls are the stream worker's job (``pipeline.stream``), so each
source stays small and every source gets the same lifecycle.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


class SourceError(Exception):
    """A source could not be opened or stopped delivering. The message is shown to users."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class SourceStalled(SourceError):
    """The source stopped sending data (a read timed out). Always worth a reconnect."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


@dataclass(frozen=True, slots=True)
class SourceInfo:
    width: int
    height: int
    fps: float | None  # nominal frame rate, None when unknown
    codec: str = ""
    live: bool = True  # True when frames arrive in real time (cameras, network streams)


@dataclass(frozen=True, slots=True)
class RawFrame:
    image: np.ndarray  # RGB uint8 HxWx3, C-contiguous
    pts: float | None  # seconds in the source's timeline
    discontinuity: bool = False  # e.g. a file looped back to its start
    decode_ms: float = 0.0  # time spent decoding and converting this picture


class Source(abc.ABC):
    """One decoder for one URI.

    ``open`` and ``frames`` run on the stream's own thread. ``interrupt`` may be called
    from any thread and must make a blocked ``open`` or ``frames`` return or raise soon.
    ``frames`` ending without an exception means end of stream (a file's end, or a live
    peer that went away). ``frames`` may yield None when data arrived but no picture was
    decoded, so the caller can check its stall deadline without waiting for a picture.
    """

    uri: str

    @abc.abstractmethod
    def open(self) -> SourceInfo: ...

    @abc.abstractmethod
    def frames(self) -> Iterator[RawFrame | None]: ...

    def interrupt(self) -> None:  # noqa: B027 - optional for sources that never block
        """Make a blocked read return soon. Default: nothing blocks."""

    @abc.abstractmethod
    def close(self) -> None: ...
