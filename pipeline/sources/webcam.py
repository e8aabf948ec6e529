"""Webcams (``webcam:N``, ``/dev/videoN``) through OpenCV.

A missing or busy camera is retryable: it may be plugged in or released later, and the
stream worker's backoff keeps the retries cheap.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pipeline.sources.base import RawFrame, Source, SourceError, SourceInfo

if TYPE_CHECKING:
    from pipeline.sources import SourceSpec


class WebcamSource(Source):
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.uri = spec.display
        self._stop = threading.Event()
        self._cap: Any = None
        target = spec.target
        self._device: int | str = int(target) if target.isdigit() else target
        self._path = Path(f"/dev/video{target}") if target.isdigit() else Path(target)

    def open(self) -> SourceInfo:
        if not self._path.exists():
            raise SourceError(f"camera {self._path} not found (is it plugged in?)", retryable=True)
        o = self.spec.options
        cap = cv2.VideoCapture(
            self._device,
            cv2.CAP_ANY,
            [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(o.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(o.read_timeout_s * 1000),
            ],
        )
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open camera {self._path} (busy or not a capture device?)")
        # One buffered frame at most: a driver queue is latency that grows when we fall behind.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if o.target_fps:
            cap.set(cv2.CAP_PROP_FPS, float(o.target_fps))
        self._cap = cap
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0) or None
        return SourceInfo(
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            fps=fps,
            codec="v4l2",
            live=True,
        )

    def frames(self) -> Iterator[RawFrame | None]:
        if self._cap is None:
            raise SourceError("camera is not open")
        while not self._stop.is_set():
            ok, bgr = self._cap.read()
            if not ok or bgr is None:
                raise SourceError(f"camera {self._path} stopped delivering frames")
            yield RawFrame(image=np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), pts=None)

    def interrupt(self) -> None:
        self._stop.set()

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
