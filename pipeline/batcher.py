"""Cross-stream batch gathering: fair, bounded in wait, grouped by model.

The batcher is pure logic over the streams' slots, a clock and a wait function, so its
fairness and ``max_wait_ms`` behaviour are tested with a fake clock; the engine thread
supplies the real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.slot import FrameSlot
from pipeline.types import DropCause, Frame


@dataclass
class Lane:
    """One stream as the batcher sees it."""

    stream_id: str
    slot: FrameSlot
    group: str  # frames are batched only with frames of the same group (model name)
    # a stale frame dropped here carried a discontinuity mark: the next frame taken gets it
    pending_mark: bool = False


@dataclass
class Batch:
    group: str
    frames: list[Frame]
    lanes: list[Lane]
    gathered_at: float  # clock time the batch was closed
    first_at: float  # clock time the first frame was taken
    stale: list[tuple[Lane, Frame]] = field(default_factory=list)


class Batcher:
    """Round-robin gathering of at most ``max_batch`` frames, one per stream per batch.

    After the first frame of a batch is taken, the batcher waits at most ``max_wait_s``
    for frames of other streams in the same group, and not at all when every stream of
    the group has already contributed (waiting could only add latency then).
    """

    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_s: float,
        latency_budget_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.latency_budget_s = latency_budget_s
        self.clock = clock
        self._lanes: list[Lane] = []
        self._next = 0  # round-robin cursor into _lanes
        self._lock = threading.Lock()

    def add(self, lane: Lane) -> None:
        with self._lock:
            if any(existing.stream_id == lane.stream_id for existing in self._lanes):
                raise ValueError(f"stream {lane.stream_id!r} is already batched")
            self._lanes.append(lane)

    def remove(self, stream_id: str) -> None:
        with self._lock:
            self._lanes = [lane for lane in self._lanes if lane.stream_id != stream_id]
            if self._next >= len(self._lanes):
                self._next = 0

    def lanes(self) -> list[Lane]:
        with self._lock:
            return list(self._lanes)

    def _take_fresh(self, lane: Lane, now: float, stale: list[tuple[Lane, Frame]]) -> Frame | None:
        while True:
            frame = lane.slot.take()
            if frame is None:
                return None
            if self.latency_budget_s is not None and now - frame.captured_at > self.latency_budget_s:
                lane.slot.drops.add(DropCause.STALE)
                stale.append((lane, frame))
                lane.pending_mark = lane.pending_mark or frame.discontinuity
                continue
            if lane.pending_mark:
                # The engine must still reset this stream's temporal and ROI state.
                lane.pending_mark = False
                frame = frame.marked()
            return frame

    def poll(self, wait: Callable[[float], None]) -> Batch | None:
        """Gather one batch, or None when no stream has a frame right now.

        ``wait(timeout_s)`` blocks until a slot receives a frame or the timeout passes.
        """
        with self._lock:
            lanes = list(self._lanes)
            start = self._next
        if not lanes:
            return None
        n = len(lanes)
        order = [lanes[(start + i) % n] for i in range(n)]
        stale: list[tuple[Lane, Frame]] = []
        now = self.clock()
        first: tuple[int, Lane, Frame] | None = None
        for pos, lane in enumerate(order):
            frame = self._take_fresh(lane, now, stale)
            if frame is not None:
                first = (pos, lane, frame)
                break
        if first is None:
            if stale:
                return Batch(group="", frames=[], lanes=[], gathered_at=now, first_at=now, stale=stale)
            return None
        pos0, lane0, frame0 = first
        group = lane0.group
        first_at = now
        taken: dict[str, tuple[Lane, Frame]] = {lane0.stream_id: (lane0, frame0)}
        members = [lane for lane in order if lane.group == group]
        deadline = first_at + self.max_wait_s
        while len(taken) < min(self.max_batch, len(members)):
            now = self.clock()
            for lane in order[pos0 + 1 :] + order[: pos0 + 1]:
                if len(taken) >= self.max_batch:
                    break
                if lane.group != group or lane.stream_id in taken:
                    continue
                frame = self._take_fresh(lane, now, stale)
                if frame is not None:
                    taken[lane.stream_id] = (lane, frame)
            if len(taken) >= min(self.max_batch, len(members)):
                break
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            wait(remaining)
        # Order the batch by round-robin position so the cursor moves past everyone served.
        ordered = [(lane, taken[lane.stream_id][1]) for lane in order if lane.stream_id in taken]
        last_served = ordered[-1][0].stream_id
        with self._lock:
            ids = [lane.stream_id for lane in self._lanes]
            if last_served in ids and self._lanes:
                self._next = (ids.index(last_served) + 1) % len(self._lanes)
        return Batch(
            group=group,
            frames=[f for _, f in ordered],
            lanes=[lane for lane, _ in ordered],
            gathered_at=self.clock(),
            first_at=first_at,
            stale=stale,
        )
