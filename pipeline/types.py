"""What passes between the pipeline's stages.

Everything here is immutable once built: a stage that adds information makes a new
value (``dataclasses.replace``) instead of mutating the one it received, so a frame
that fans out to several consumers can never be changed under one of them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


def now() -> float:
    """Wall-clock seconds (epoch). Used for every timestamp that leaves the process."""
    return time.time()


class DropCause(enum.StrEnum):
    """Why a frame or result was thrown away. Every drop is counted under one of these."""

    SOURCE_OVERRUN = "source_overrun"  # the source produced a frame before the engine took the last one
    ENGINE_BUSY = "engine_busy"  # a stage after the source (engine inbox, encoder) was still busy
    CLIENT_SLOW = "client_slow"  # a websocket client had not sent the previous result yet
    STALE = "stale"  # older than the latency budget when the engine reached it
    ERROR = "error"  # the model raised on the batch holding this frame


def every_cause(drops: dict[str, int]) -> dict[str, int]:
    """Drop counters with every cause present (0 where it never happened), for readers that
    should not have to guess that a missing key means none."""
    return {**{c.value: 0 for c in DropCause}, **drops}


class StreamState(enum.StrEnum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STALLED = "stalled"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (StreamState.STOPPED, StreamState.FAILED)

    def can_become(self, other: StreamState) -> bool:
        return other in _TRANSITIONS[self]


_TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    StreamState.CONNECTING: frozenset(
        {StreamState.STREAMING, StreamState.RECONNECTING, StreamState.STOPPED, StreamState.FAILED}
    ),
    StreamState.STREAMING: frozenset(
        {StreamState.STALLED, StreamState.RECONNECTING, StreamState.STOPPED, StreamState.FAILED}
    ),
    StreamState.STALLED: frozenset(
        {StreamState.STREAMING, StreamState.RECONNECTING, StreamState.STOPPED, StreamState.FAILED}
    ),
    StreamState.RECONNECTING: frozenset(
        {StreamState.CONNECTING, StreamState.STREAMING, StreamState.STOPPED, StreamState.FAILED}
    ),
    StreamState.STOPPED: frozenset(),
    StreamState.FAILED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded picture of one stream.

    ``image`` is RGB, uint8, HxWx3, C-contiguous. ``pts`` is the source's presentation
    time in seconds (None when the source has none, e.g. a webcam). ``captured_at`` is
    the wall-clock time the decoder handed the frame over. ``discontinuity`` marks the
    first frame after a (re)connect, a seek or a loop restart: temporal state must not
    carry across it. ``model_input``, when set, is the stream's model input for this frame,
    made by the capture thread (``models.segmenter.prepare_input``, taking ``prepare_ms``),
    so the engine thread does not resize or normalise full frames.
    """

    stream_id: str
    index: int
    pts: float | None
    captured_at: float
    image: np.ndarray
    discontinuity: bool = False
    decode_ms: float = 0.0
    model_input: np.ndarray | None = None
    prepare_ms: float = 0.0

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def marked(self) -> Frame:
        """This frame carrying the discontinuity mark: it takes the mark of a frame dropped
        before it, so state is still not carried across the restart that frame began."""
        return self if self.discontinuity else replace(self, discontinuity=True)


@dataclass(frozen=True, slots=True)
class SegmentationResult:
    """The engine's answer for one frame.

    ``labels`` is uint8 HxW at the frame's resolution, one class index per pixel
    (index into ``classes``). ``probs`` is the foreground probability (float32 HxW in
    [0, 1]) for binary models, else None. ``latency_ms`` holds each stage's duration;
    later stages add theirs with :meth:`with_stage`.
    """

    frame: Frame
    labels: np.ndarray
    classes: tuple[str, ...]
    model: str
    probs: np.ndarray | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    segmented_at: float = 0.0
    full_pass: bool = True  # False when temporal refinement carried the previous mask forward
    info: dict[str, Any] = field(default_factory=dict)

    def with_stage(self, stage: str, ms: float) -> SegmentationResult:
        from dataclasses import replace

        return replace(self, latency_ms={**self.latency_ms, stage: ms})
