"""Webcams (``webcam:N``, ``/dev/videoN``) through OpenCV.

A missing or busy camera is retryable: it may be plugged in or released later, and the
stream worker's backoff keeps the retries cheap.

``deinterlace=on`` deinterlaces every picture (FFmpeg's bwdif, as for files and network
sources): a USB capture device on an analogue camera delivers woven fields, and V4L2
through OpenCV does not say so, so ``auto`` leaves webcam pictures as they come.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.sources.av_source import Deinterlacer
from pipeline.sources.base import RawFrame, Source, SourceError, SourceInfo

_MS = Fraction(1, 1000)

if TYPE_CHECKING:
    from pipeline.sources import SourceSpec


class WebcamSource(Source):
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.uri = spec.display
        self._stop = threading.Event()
        self._cap: Any = None
        self._deinterlacer: Deinterlacer | None = None
        self._scaler = VideoReformatter()
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
        self._deinterlacer = Deinterlacer("on", _MS) if o.deinterlace == "on" else None
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
        start, last = time.monotonic(), -1
        while not self._stop.is_set():
            ok, bgr = self._cap.read()
            if not ok or bgr is None:
                raise SourceError(f"camera {self._path} stopped delivering frames")
            rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if self._deinterlacer is None:
                yield RawFrame(image=rgb, pts=None)
                continue
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            last = max(last + 1, round((time.monotonic() - start) * 1000))  # strictly increasing
            frame.pts, frame.time_base = last, _MS
            for shown in self._deinterlacer.push(frame):  # one picture behind: bwdif needs the next
                image = self._scaler.reformat(shown, format="rgb24", threads=1).to_ndarray()
                yield RawFrame(image=np.ascontiguousarray(image), pts=None)

    def interrupt(self) -> None:
        self._stop.set()

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
