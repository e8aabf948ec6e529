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

# FFmpeg demuxers that read a local file as a list of other files or URLs to open (playlists,
# file lists, manifests, session descriptions) or as a filter graph. A local file source
# never uses them: the media directory check covers the file a user names, not the files it
# would point to.
REFERENCE_FORMATS: frozenset[str] = frozenset(
    {
        "hls",
        "applehttp",  # the HLS demuxer's old name
        "concat",  # ffconcat lists
        "dash",
        "webm_dash_manifest",
        "imf",  # IMF composition playlists name other MXF files
        "sdp",  # session descriptions open RTP sockets
        "rtp",
        "rtsp",
        "sap",
        "lavfi",  # a filter graph can read any file (movie=...)
    }
)


def reference_format(name: str | None) -> str | None:
    """The first of the comma-separated demuxer names in ``name`` that is in
    :data:`REFERENCE_FORMATS`, or None."""
    for part in (name or "").lower().split(","):
        if part.strip() in REFERENCE_FORMATS:
            return part.strip()
    return None


def reference_refusal(file_name: str, fmt: str) -> str:
    """The message for a local file that is a playlist, file list or similar (``fmt``)."""
    return f"{file_name}: playlists and file lists are not served as file sources ({fmt})"


class SourceError(Exception):
    """A source could not be opened or stopped delivering. The message is shown to users."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class SourceAuthError(SourceError):
    """The source refused the credentials (or asked for some). Retried, but slowly: many
    cameras lock the account, or the address, after a few failed logins."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


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
    frames: int | None = None  # how many frames a file's header declares, when it does
    # Pictures arrive a segment at a time (HLS): served live they are paced by their
    # timestamps, as a file is, or the one-frame slot would drop most of each burst.
    segmented: bool = False


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
