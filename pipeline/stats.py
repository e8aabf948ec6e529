"""Small, thread-safe rolling statistics: rates and latency percentiles over a time window."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence


def events_per_second(times: Sequence[float], now: float) -> float:
    """Rate of the events at ``times`` (ascending seconds) as seen at ``now``: events over the
    span from the first to the last, while the next one is not overdue. Once more than two
    mean intervals have passed since the last, the wait counts as well, so a rate falls as
    soon as events stop, instead of holding until they age out of their window."""
    if len(times) < 2:
        return 0.0
    span = times[-1] - times[0]
    if span <= 0:
        return 0.0
    interval = span / (len(times) - 1)
    overdue = max(0.0, now - times[-1] - 2.0 * interval)
    return (len(times) - 1) / (span + overdue)


class RollingWindow:
    """Values with timestamps, kept for ``window_s`` seconds (and at most ``max_items``)."""

    def __init__(self, window_s: float = 5.0, max_items: int = 4096) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque(maxlen=max_items)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, value: float = 0.0, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        with self._lock:
            self._items.append((t, value))
            self.count += 1

    def _recent(self, t: float | None = None) -> list[tuple[float, float]]:
        t = time.monotonic() if t is None else t
        with self._lock:
            while self._items and t - self._items[0][0] > self.window_s:
                self._items.popleft()
            return list(self._items)

    def rate(self, now: float | None = None) -> float:
        """Events per second over the window (0 with fewer than two events); see
        :func:`events_per_second`."""
        now = time.monotonic() if now is None else now
        return events_per_second([t for t, _ in self._recent(now)], now)

    def percentiles(self, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
        values = sorted(v for _, v in self._recent())
        if not values:
            return {}
        out = {}
        for q in qs:
            k = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
            out[f"p{int(q)}"] = round(values[k], 2)
        return out
