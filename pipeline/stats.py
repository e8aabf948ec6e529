"""Small, thread-safe rolling statistics: rates and latency percentiles over a time window."""

from __future__ import annotations

import threading
import time
from collections import deque


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

    def rate(self) -> float:
        """Events per second over the window (0 with fewer than two events)."""
        items = self._recent()
        if len(items) < 2:
            return 0.0
        span = items[-1][0] - items[0][0]
        return (len(items) - 1) / span if span > 0 else 0.0

    def percentiles(self, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
        values = sorted(v for _, v in self._recent())
        if not values:
            return {}
        out = {}
        for q in qs:
            k = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
            out[f"p{int(q)}"] = round(values[k], 2)
        return out
