"""Offline segmentation of a whole file: every frame, in order, as fast as the machine allows.

Uses the same stream worker and engine as the live service, with a blocking slot so
nothing is dropped, and writes an overlaid video and/or one label PNG per frame.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from models.device import resolve_device
from pipeline.config import AppConfig, RoiConfig, StreamConfig, TemporalConfig
from pipeline.manager import StreamManager
from pipeline.render import overlay
from pipeline.slot import DropPolicy
from pipeline.sources import SourceError, parse_source
from pipeline.types import SegmentationResult, StreamState

log = logging.getLogger(__name__)

_DEFAULT_FPS = 25.0  # video rate for a source whose rate is not known ahead


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
    """H.264 (yuv420p) video of the overlaid frames. 4:2:0 chroma needs even sizes, so an odd
    width or height is padded by repeating the last column or row: every source pixel is
    kept at its place (the video of an 853x479 input is 854x480).

    Frames keep their source timestamps (relative to the first), so a variable-frame-rate
    input (a phone video, a screen recording) plays at its own pace rather than at its
    average rate; frames without a usable timestamp follow the previous one by 1/fps.

    The video has the first picture's size. A source that changes its size midway (a camera
    switching streams, a broadcast going from 576i to 720p) has its later pictures scaled to
    fit inside it, keeping their shape, on black."""

    _TIME_BASE = Fraction(1, 90000)

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._first_pts: float | None = None
        self._last_tick = -1
        self._size: tuple[int, int] | None = None  # (height, width) of the first picture
        self._resized_from: set[tuple[int, int]] = set()

    def _tick(self, pts: float | None) -> int:
        step = max(1, round(1.0 / (self.fps * self._TIME_BASE)))
        tick = self._last_tick + step if self._last_tick >= 0 else 0
        if pts is not None and math.isfinite(pts):
            if self._first_pts is None:
                self._first_pts = pts
            at = round((pts - self._first_pts) / self._TIME_BASE)
            if at > self._last_tick:  # never backwards (a loop, a broken timestamp)
                tick = at
        self._last_tick = tick
        return tick

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """A picture of another size than the first, scaled inside the first's size on black."""
        assert self._size is not None
        (h0, w0), (h, w) = self._size, image.shape[:2]
        if (h, w) not in self._resized_from:
            self._resized_from.add((h, w))
            log.info("%s: the source's pictures changed from %dx%d to %dx%d: scaled to fit the video",
                     self.path, w0, h0, w, h)
        scale = min(h0 / h, w0 / w)
        sh, sw = max(1, min(h0, round(h * scale))), max(1, min(w0, round(w * scale)))
        shrink = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        canvas = np.zeros((h0, w0, 3), np.uint8)
        top, left = (h0 - sh) // 2, (w0 - sw) // 2
        canvas[top : top + sh, left : left + sw] = cv2.resize(image, (sw, sh), interpolation=shrink)
        return canvas

    def write(self, image: np.ndarray, pts: float | None = None) -> None:
        if self._size is None:
            self._size = (int(image.shape[0]), int(image.shape[1]))
        elif image.shape[:2] != self._size:
            image = self._fit(image)
        h, w = image.shape[:2]
        if self._container is None:
            self._container = av.open(str(self.path), mode="w")
            rate = Fraction(self.fps).limit_denominator(1001)
            stream = self._container.add_stream("libx264", rate=rate)
            stream.codec_context.time_base = self._TIME_BASE
            stream.width = w + w % 2
            stream.height = h + h % 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "20"}
            self._stream = stream
        assert self._stream is not None
        pad_h, pad_w = self._stream.height - h, self._stream.width - w
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self._tick(pts)
        frame.time_base = self._TIME_BASE
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is not None and self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()


def check_output(path: Path) -> None:
    """Refuse, before any work, a video output FFmpeg could not write as H.264: no container
    known for its extension, a container without H.264, or a directory. Writes nothing."""
    if path.is_dir():
        raise OfflineError(f"output {path} is a directory; give a file name such as out.mp4")
    try:
        container = av.open(str(path), mode="w")  # the file itself is created on the first frame
    except (ValueError, av.error.FFmpegError):
        ext = f"the extension {path.suffix!r}" if path.suffix else "a name without an extension"
        raise OfflineError(
            f"output {path}: FFmpeg knows no video container for {ext}; use .mp4, .mkv or .mov"
        ) from None
    try:
        container.add_stream("libx264", rate=25)
    except (ValueError, av.error.FFmpegError):
        raise OfflineError(
            f"output {path}: the {container.format.name} container cannot hold H.264 video; "
            "use .mp4, .mkv or .mov"
        ) from None
    finally:
        container.close()


def _make_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OfflineError(f"cannot create the {what} directory {path}: {e.strerror or e}") from None


def _probe_source(source: str, config: AppConfig) -> tuple[int | None, float]:
    """(frame count or None, frame rate) of ``source``: a file in any form the service
    accepts (a path, ``file://…``, with query options) is opened as the stream will open it,
    so what cannot be served fails here, with the same message; other sources, whose rate
    the container cannot tell ahead, are written at 25 fps."""
    try:
        spec = parse_source(source, allowed_schemes=config.server.allowed_schemes)
    except ValueError as e:
        raise OfflineError(str(e)) from None
    if spec.kind != "file":
        return None, _DEFAULT_FPS
    reader = spec.create()
    try:
        info = reader.open()
    except SourceError as e:
        raise OfflineError(f"cannot read video {spec.display}: {e}") from None
    finally:
        reader.close()
    fps = info.fps or _DEFAULT_FPS
    target = spec.options.target_fps
    if target and target < fps:  # thinned to target_fps: that is the rate written
        return None, target
    return info.frames, fps


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
    # Everything that would stop the run is checked before any work or any file is written.
    resolve_device(config.engine.device)
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        check_output(out_path)
    total, fps = _probe_source(str(source), config)
    masks = Path(masks_dir) if masks_dir is not None else None
    engine_cfg = config.engine.model_copy(update={"latency_budget_ms": 1e12})
    cfg = config.model_copy(update={"engine": engine_cfg, "streams": []})
    mgr = StreamManager(cfg, realtime=False, slot_policy=DropPolicy.BLOCK)
    mgr.load_model(model or cfg.default_model)  # the name and the weights, before any directory is made
    if out_path is not None:
        _make_dir(out_path.parent, "output")
        if not os.access(out_path.parent, os.W_OK):
            raise OfflineError(f"output {out_path}: the directory {out_path.parent} is not writable")
    if masks is not None:
        _make_dir(masks, "masks")
    results: queue.Queue[SegmentationResult] = queue.Queue(maxsize=64)
    # Back-pressure: the engine thread waits for the writer rather than dropping results.
    mgr.result_listeners.append(lambda r: results.put(r))
    writer = _VideoWriter(out_path, fps) if out_path is not None else None
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
                    why = f": {st.error}" if st.error else ""  # e.g. why it keeps reconnecting
                    raise OfflineError(
                        f"no progress for {stall_timeout_s:.0f}s (state {st.state.value}{why})"
                    ) from None
                continue
            last_progress = time.monotonic()
            if first_index is None:
                first_index = res.frame.index
            if masks is not None:
                cv2.imwrite(str(masks / f"{written:05d}.png"), res.labels)
            if writer is not None:
                writer.write(overlay(res.frame.image, res.labels), res.frame.pts)
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
