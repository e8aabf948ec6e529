"""Bounded per-stream frame slots with a named drop policy and drop counters.

A live source must never build a queue: when the engine has not taken the previous
frame yet, the newest frame wins and the older one is counted as ``source_overrun``.
Offline processing (``segstream segment``) uses ``block`` instead, so nothing is lost.

A frame that never reaches the engine passes its ``discontinuity`` mark on to the next
frame that does: the engine must still reset its temporal and ROI state when the first
frame after a (re)connect or loop restart is the one dropped.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable

from pipeline.types import DropCause, Frame


class DropPolicy(enum.StrEnum):
    LATEST = "latest"  # keep only the newest frames; older ones are dropped
    DROP_OLDEST = "drop_oldest"  # a short FIFO; when full, the oldest goes
    BLOCK = "block"  # the producer waits for room (offline work: nothing is dropped)


class DropCounter:
    """Thread-safe counts of drops by cause."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, cause: DropCause, n: int = 1) -> None:
        with self._lock:
            self._counts[cause.value] = self._counts.get(cause.value, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


class FrameSlot:
    """A bounded buffer between one stream's source thread and the engine thread."""

    def __init__(
        self,
        *,
        capacity: int = 1,
        policy: DropPolicy = DropPolicy.LATEST,
        drops: DropCounter | None = None,
        on_put: Callable[[], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"slot capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.policy = DropPolicy(policy)
        self.drops = drops if drops is not None else DropCounter()
        self._on_put = on_put
        self._items: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # a discontinuity mark of a frame that was offered but never queued (a ``block`` put
        # that timed out), waiting for the next frame that gets in
        self._pending_mark = False

    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        """Offer a frame. Returns False when the slot is closed (or, for ``block``, on timeout)."""
        with self._cond:
            if self._closed:
                return False
            if len(self._items) >= self.capacity:
                if self.policy is DropPolicy.BLOCK:
                    ok = self._cond.wait_for(
                        lambda: self._closed or len(self._items) < self.capacity, timeout=timeout
                    )
                    if not ok or self._closed:
                        self._pending_mark = self._pending_mark or frame.discontinuity
                        return False
                else:
                    while len(self._items) >= self.capacity:
                        dropped = self._items.popleft()
                        self.drops.add(DropCause.SOURCE_OVERRUN)
                        if dropped.discontinuity:
                            # the frame now first in line (or the incoming one) takes the mark
                            if self._items:
                                self._items[0] = self._items[0].marked()
                            else:
                                self._pending_mark = True
            if self._pending_mark:
                frame = frame.marked()
                self._pending_mark = False
            self._items.append(frame)
        if self._on_put is not None:
            self._on_put()
        return True

    def take(self) -> Frame | None:
        """The oldest frame held, or None. Never blocks."""
        with self._cond:
            if not self._items:
                return None
            frame = self._items.popleft()
            self._cond.notify_all()
            return frame

    def peek_time(self) -> float | None:
        """Capture time of the frame ``take`` would return, or None when empty."""
        with self._cond:
            return self._items[0].captured_at if self._items else None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
