"""Offline segmentation of a whole file: every frame, in order, as fast as the machine allows.

Uses the same stream worker and engine as the live service, with a blocking slot so
nothing is dropped, and writes an overlaid video and/or one label PNG per frame.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from pipeline.config import AppConfig, RoiConfig, StreamConfig, TemporalConfig
from pipeline.manager import StreamManager
from pipeline.render import overlay
from pipeline.slot import DropPolicy
from pipeline.types import SegmentationResult, StreamState


class OfflineError(RuntimeError):
    pass


@dataclass(frozen=True)
class OfflineReport:
    frames: int
    seconds: float
    output: str | None
    masks_dir: str | None
    full_passes: int

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class _VideoWriter:
    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None

    def write(self, image: np.ndarray) -> None:
        if self._container is None:
            self._container = av.open(str(self.path), mode="w")
            rate = Fraction(self.fps).limit_denominator(1001)
            stream = self._container.add_stream("libx264", rate=rate)
            stream.width = image.shape[1] - image.shape[1] % 2
            stream.height = image.shape[0] - image.shape[0] % 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "20"}
            self._stream = stream
        assert self._stream is not None
        img = image[: self._stream.height, : self._stream.width]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is not None and self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()


def probe_frames(path: str) -> tuple[int | None, float]:
    """(frame count if the container knows it, frame rate) of a video file."""
    try:
        with av.open(path) as c:
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 25)
            return (int(s.frames) or None), fps
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise OfflineError(f"cannot read video {path}: {e}") from None


def segment_file(
    config: AppConfig,
    source: str,
    *,
    output: str | Path | None = None,
    masks_dir: str | Path | None = None,
    model: str | None = None,
    temporal: TemporalConfig | None = None,
    roi: RoiConfig | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    stall_timeout_s: float = 60.0,
) -> OfflineReport:
    """Segment every frame of ``source`` (a file path or URI). Blocks until done."""
    if output is None and masks_dir is None:
        raise OfflineError("nothing to write: give --output and/or --masks-dir")
    path = Path(source)
    total, fps = probe_frames(str(path)) if path.exists() else (None, 25.0)
    masks = Path(masks_dir) if masks_dir is not None else None
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    engine_cfg = config.engine.model_copy(update={"latency_budget_ms": 1e12})
    cfg = config.model_copy(update={"engine": engine_cfg, "streams": []})
    mgr = StreamManager(cfg, realtime=False, slot_policy=DropPolicy.BLOCK)
    results: queue.Queue[SegmentationResult] = queue.Queue(maxsize=64)
    # Back-pressure: the engine thread waits for the writer rather than dropping results.
    mgr.result_listeners.append(lambda r: results.put(r))
    writer = _VideoWriter(Path(output), fps) if output is not None else None
    started = time.perf_counter()
    written = 0
    full = 0
    first_index: int | None = None
    mgr.start()
    try:
        sc = StreamConfig(
            id="offline",
            source=str(source),
            model=model,
            **({"temporal": temporal} if temporal else {}),
            **({"roi": roi} if roi else {}),
        )
        handle = mgr.add(sc)
        last_progress = time.monotonic()
        while True:
            try:
                res = results.get(timeout=0.1)
            except queue.Empty:
                st = handle.worker.status()
                if st.state is StreamState.FAILED:
                    raise OfflineError(st.error or "source failed") from None
                done = handle.frames_out + handle.drops.total()
                finished = st.state is StreamState.STOPPED and done >= st.frames
                if finished and results.empty():
                    break
                if time.monotonic() - last_progress > stall_timeout_s:
                    raise OfflineError(
                        f"no progress for {stall_timeout_s:.0f}s (state {st.state.value})"
                    ) from None
                continue
            last_progress = time.monotonic()
            if first_index is None:
                first_index = res.frame.index
            if masks is not None:
                cv2.imwrite(str(masks / f"{written:05d}.png"), res.labels)
            if writer is not None:
                writer.write(overlay(res.frame.image, res.labels))
            written += 1
            full += int(res.full_pass)
            if progress is not None:
                progress(written, total)
    finally:
        mgr.shutdown(timeout=5.0)
        if writer is not None:
            writer.close()
    if written == 0:
        raise OfflineError(f"no frames decoded from {source}")
    return OfflineReport(
        frames=written,
        seconds=time.perf_counter() - started,
        output=str(output) if output else None,
        masks_dir=str(masks) if masks else None,
        full_passes=full,
    )
