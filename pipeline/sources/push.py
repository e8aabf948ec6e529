"""A source fed from outside the process: pictures pushed in by a caller (the browser camera).

The pusher (an ingest websocket) calls :meth:`PushFeed.push` with decoded RGB pictures;
the stream worker reads them through :class:`PushSource`. Latest wins: a picture the
worker has not taken yet is replaced by a newer one, so a fast pusher never builds a
queue. The pusher learns when its picture was taken (:meth:`PushFeed.wait_taken`) and
uses that as back-pressure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import SourceOptions
from pipeline.sources import SourceSpec
from pipeline.sources.base import RawFrame, Source, SourceError, SourceInfo

_POLL_S = 0.25  # how often a waiting reader yields None so the worker can check stop/stall


class PushFeed:
    """The hand-over point between one pusher and one stream worker. Thread-safe."""

    def __init__(self, *, open_timeout_s: float = 10.0) -> None:
        if open_timeout_s <= 0:
            raise ValueError(f"open_timeout_s must be > 0, got {open_timeout_s}")
        self.open_timeout_s = open_timeout_s
        self._cond = threading.Condition()
        self._latest: RawFrame | None = None
        self._pushed = 0
        self._taken = 0
        self._replaced = 0
        self._size: tuple[int, int] | None = None
        self._closed = False

    def push(self, image: np.ndarray, *, pts: float | None = None, decode_ms: float = 0.0) -> int:
        """Offer a picture (RGB uint8 HxWx3). Returns its sequence number (1-based)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        frame = RawFrame(image=np.ascontiguousarray(image), pts=pts, decode_ms=decode_ms)
        with self._cond:
            if self._closed:
                raise SourceError("the push feed is closed", retryable=False)
            if self._latest is not None:
                self._replaced += 1
            self._latest = frame
            self._pushed += 1
            self._size = (image.shape[1], image.shape[0])
            self._cond.notify_all()
            return self._pushed

    def wait_taken(self, seq: int, timeout: float) -> bool:
        """Block until picture ``seq`` (or a later one) was taken by the worker, or replaced."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or self._taken >= seq or self._pushed > seq, timeout
            )

    def take(self, timeout: float) -> RawFrame | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._latest is not None, timeout)
            frame, self._latest = self._latest, None
            if frame is not None:
                self._taken = self._pushed
                self._cond.notify_all()
            return frame

    def wait_size(self, timeout: float) -> tuple[int, int] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._size is not None, timeout)
            return self._size

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def replaced(self) -> int:
        """Pictures overwritten before the worker took them."""
        return self._replaced


class PushSource(Source):
    """Reads a :class:`PushFeed`; ends when the feed closes (the pusher went away)."""

    def __init__(self, spec: SourceSpec, feed: PushFeed) -> None:
        self.uri = spec.uri
        self.feed = feed
        self._interrupted = threading.Event()

    def open(self) -> SourceInfo:
        deadline = time.monotonic() + self.feed.open_timeout_s
        while not self._interrupted.is_set():
            size = self.feed.wait_size(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            if size is not None:
                return SourceInfo(width=size[0], height=size[1], fps=None, codec="jpeg", live=True)
            if self.feed.closed:
                raise SourceError("the pusher left before sending a picture", retryable=False)
            if time.monotonic() >= deadline:
                raise SourceError(f"no picture pushed within {self.feed.open_timeout_s:g} s")
        raise SourceError("interrupted", retryable=False)

    def frames(self) -> Iterator[RawFrame | None]:
        while not self._interrupted.is_set() and not self.feed.closed:
            yield self.feed.take(_POLL_S)

    def interrupt(self) -> None:
        self._interrupted.set()

    def close(self) -> None:
        self._interrupted.set()


@dataclass(frozen=True)
class PushSpec(SourceSpec):
    """A source spec whose decoder reads ``feed`` (built in code, never parsed from a URI)."""

    feed: PushFeed | None = None

    def create(self) -> Source:
        if self.feed is None:
            raise SourceError("push source without a feed", retryable=False)
        return PushSource(self, self.feed)


def push_spec(name: str, feed: PushFeed) -> PushSpec:
    """The spec for a pushed stream called ``name`` (shown as ``push:<name>``)."""
    uri = f"push:{name}"
    return PushSpec(uri=uri, kind="push", options=SourceOptions(), display=uri, target=name, feed=feed)  # type: ignore[arg-type]
