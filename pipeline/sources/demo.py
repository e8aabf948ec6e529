"""``demo``: a live source with a real person in it, for machines without a camera.

The public-domain NASA portrait of Eileen Collins (``pipeline/assets/astronaut.jpg``,
provenance in ``pipeline/assets/NOTICE.md``) drifts and zooms smoothly, like a slow
handheld camera, over a background that scrolls at a different speed, so consecutive
frames differ everywhere and a segmenter has to follow the person.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.sources.base import RawFrame, Source, SourceError, SourceInfo

if TYPE_CHECKING:
    from pipeline.sources import SourceSpec

ASSET = Path(__file__).resolve().parent.parent / "assets" / "astronaut.jpg"
WIDTH, HEIGHT, FPS = 640, 360, 25.0


def load_portrait() -> np.ndarray:
    bgr = cv2.imread(str(ASSET), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SourceError(f"demo asset missing or unreadable: {ASSET}", retryable=False)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _background(width: int, height: int) -> np.ndarray:
    """A tileable backdrop twice as wide as the frame: soft colour bands and blobs."""
    w2 = width * 2
    x = np.linspace(0, 2 * math.pi, w2, endpoint=False, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    r = 90 + 50 * np.sin(x) + 40 * y
    g = 110 + 40 * np.sin(2 * x + 1.0) + 30 * (1 - y)
    b = 150 + 60 * np.cos(x + 0.5) * (0.5 + 0.5 * y)
    bg = np.stack(np.broadcast_arrays(r, g, b), axis=-1).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(7)  # fixed: the demo looks the same every run
    for _ in range(14):
        cx, cy = int(rng.integers(0, w2)), int(rng.integers(0, height))
        color = tuple(int(c) for c in rng.integers(40, 230, size=3))
        radius = int(rng.integers(height // 14, height // 5))
        for dx in (-w2, 0, w2):  # draw wrapped copies so the band tiles seamlessly
            cv2.circle(bg, (cx + dx, cy), radius, color, -1, lineType=cv2.LINE_AA)
    return np.ascontiguousarray(cv2.GaussianBlur(bg, (0, 0), 3))


class DemoRenderer:
    """Pure function of time: ``render(t)`` is the picture at ``t`` seconds."""

    def __init__(self, width: int = WIDTH, height: int = HEIGHT) -> None:
        self.width, self.height = width, height
        self.portrait = load_portrait()
        self.backdrop = _background(width, height)

    def render(self, t: float) -> np.ndarray:
        w, h = self.width, self.height
        shift = int(t * 40) % (2 * w)  # background scrolls at 40 px/s
        frame = np.roll(self.backdrop, -shift, axis=1)[:, :w].copy()
        ph, pw = self.portrait.shape[:2]
        # Slow camera: zoom breathes, pan sways; periods are incommensurate so it never repeats exactly.
        scale = (0.78 + 0.1 * math.sin(t * 0.45)) * h / ph
        cx = w / 2 + 0.22 * w * math.sin(t * 0.31)
        cy = h / 2 + 0.05 * h * math.sin(t * 0.73 + 1.0)
        angle = 3.0 * math.sin(t * 0.23)
        m = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, scale)
        m[0, 2] += cx - pw / 2
        m[1, 2] += cy - ph / 2
        cv2.warpAffine(
            self.portrait, m, (w, h), dst=frame, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT
        )
        return frame


class DemoSource(Source):
    """Paces itself like a camera; ``target_fps`` sets the rate (default 25)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.uri = spec.display
        self.fps = float(spec.options.target_fps or FPS)
        self._stop = threading.Event()
        self._renderer: DemoRenderer | None = None

    def open(self) -> SourceInfo:
        self._renderer = DemoRenderer()
        return SourceInfo(width=WIDTH, height=HEIGHT, fps=self.fps, codec="demo", live=True)

    def frames(self) -> Iterator[RawFrame | None]:
        if self._renderer is None:
            raise SourceError("demo source is not open")
        period = 1.0 / self.fps
        start = time.monotonic()
        n = 0
        while not self._stop.is_set():
            due = start + n * period
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            if delay < -1.0:  # fell far behind (suspended process): skip ahead instead of bursting
                n = int((time.monotonic() - start) / period)
            t = n * period
            t0 = time.perf_counter()
            image = self._renderer.render(t)
            yield RawFrame(image=image, pts=t, decode_ms=(time.perf_counter() - t0) * 1000.0)
            n += 1

    def interrupt(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._renderer = None
