"""The stream manager: adds and removes streams at run time and wires each one to the engine.

A stream is: a parsed source spec, a bounded slot, a worker thread decoding into the
slot, and a registration in the engine's batcher. The manager is the only place that
creates or destroys those, so a stream is either fully there or fully gone.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import torch

from models.device import resolve_device
from models.registry import build_model, get_spec
from models.segmenter import Segmenter, prepare_input
from models.temporal import TemporalParams
from pipeline.affinity import AffinityError, CpuSplit, available_cpus, pin_process, split_cpus
from pipeline.config import AppConfig, RoiConfig, StreamConfig, TemporalConfig, check_stream_id
from pipeline.engine import Engine
from pipeline.memory import keep_frame_buffers
from pipeline.slot import DropCounter, DropPolicy, FrameSlot
from pipeline.sources import SourceSpec, parse_source
from pipeline.stats import RollingWindow
from pipeline.stream import StreamStatus, StreamWorker
from pipeline.types import DropCause, SegmentationResult, StreamState, every_cause, now

log = logging.getLogger("segstream.manager")
_STALL_CHECK_S = 0.5  # how often the watchdog looks for live streams without pictures



class StreamExistsError(ValueError):
    pass


class StreamNotFoundError(KeyError):
    pass


class LimitError(ValueError):
    pass


@dataclass
class StreamHandle:
    id: str
    spec: SourceSpec
    model: str
    slot: FrameSlot
    worker: StreamWorker
    drops: DropCounter
    temporal: TemporalConfig
    roi: RoiConfig
    created_at: float
    results: RollingWindow = field(default_factory=lambda: RollingWindow(5.0))
    latency: RollingWindow = field(default_factory=lambda: RollingWindow(10.0))
    frames_out: int = 0
    last_error: str | None = None
    engine_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        st: StreamStatus = self.worker.status()
        error = st.error or self.engine_error
        return {
            "id": self.id,
            "source": self.spec.display,
            "kind": self.spec.kind,
            "model": self.model,
            "state": st.state.value,
            "error": error,
            "state_since": st.state_since,
            "created_at": self.created_at,
            "last_frame_at": st.last_frame_at,
            "width": st.width,
            "height": st.height,
            "source_fps": st.source_fps,
            "fps_in": round(st.fps, 2),
            "fps": 0.0 if st.state.terminal else round(self.results.rate(), 2),
            "frames_in": st.frames,
            "frames": self.frames_out,
            "reconnects": st.reconnects,
            "latency_ms": self.latency.percentiles(),
            "drops": every_cause(self.drops.snapshot()),
            "temporal": self.temporal.mode,
            "roi": self.roi.enabled,
            "temporal_settings": self.temporal.model_dump(),
            "roi_settings": self.roi.model_dump(),
        }


def default_threads() -> int:
    cores = os.cpu_count() or 1
    return cores if cores <= 2 else cores - 1


def default_torch_threads() -> int:
    """Torch intra-op threads when the config leaves them open: one core fewer than the machine.

    Decoding, encoding and the event loop need a core too; torch threads that spin on a
    core someone else holds are far slower than fewer threads (on a busy 2-core machine,
    2 threads ran the default model end to end at 0.07x the frame rate of 1 thread).
    """
    return max(1, (os.cpu_count() or 1) - 1)


class StreamManager:
    """Owns the engine and every stream. Thread-safe."""

    def __init__(
        self,
        config: AppConfig,
        *,
        realtime: bool = True,
        slot_policy: DropPolicy = DropPolicy.LATEST,
        restrict_files: bool = False,
    ) -> None:
        self.config = config
        self.realtime = realtime
        self.slot_policy = slot_policy
        self.restrict_files = restrict_files
        self.device = resolve_device(config.engine.device)
        threads = config.engine.threads or default_torch_threads()
        # engine.pin_threads: the CPUs split between the engine thread and everything else,
        # checked first (a split that cannot be made stops the service before anything changes)
        self._cpus: CpuSplit | None = None
        if config.engine.pin_threads and self.device == "cpu":
            allowed = available_cpus()
            if allowed is None:
                raise AffinityError(
                    "engine.pin_threads: this process may not pin threads to CPUs here "
                    "(no sched_setaffinity, or the sandbox refuses it)"
                )
            self._cpus = CpuSplit(allowed, *split_cpus(allowed, threads))
        torch.set_num_threads(threads)
        # Every stage already runs on its own thread (capture per stream, engine, render pool):
        # OpenCV's own pool on top of that only adds hand-offs and busy waiting (about 1 ms of
        # CPU per 720p frame on 2 cores) for no gain in throughput.
        cv2.setNumThreads(1)
        # Frame-sized buffers are freed and allocated again on every frame: keep them in the
        # process instead of paying for fresh pages each time (pipeline.memory).
        keep_frame_buffers()
        self._lock = threading.RLock()
        self._streams: dict[str, StreamHandle] = {}
        self._modules: dict[str, tuple[torch.nn.Module, Any]] = {}
        self._counter = 0
        self.result_listeners: list[Callable[[SegmentationResult], None]] = []
        self.status_listeners: list[Callable[[str, StreamStatus], None]] = []
        self.removal_listeners: list[Callable[[str], None]] = []  # called with the id of a stream removed
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self.engine = Engine(
            config=config.engine,
            segmenter_factory=self._make_segmenter,
            on_result=self._on_result,
            on_error=self._on_engine_error,
            preload=[config.default_model],
            cpus=self._cpus.engine if self._cpus else None,
        )
        self._started = False

    # -- models ----------------------------------------------------------------------
    def load_model(self, name: str) -> Any:
        """Build a model on the CPU (validating name and weights); the engine moves it to the device."""
        with self._lock:
            if name not in self._modules:
                spec = get_spec(name)
                module, spec = build_model(name, weights=self.config.weights.get(name))
                self._modules[name] = (module, spec)
            return self._modules[name][1]

    def _make_segmenter(self, name: str) -> Segmenter:
        # Runs on the engine thread: the device and everything on it belong to that thread.
        self.load_model(name)
        module, spec = self._modules[name]
        cfg = self.config.engine
        seg = Segmenter(
            module,
            spec,
            device=self.device,
            precision=cfg.precision,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
            cuda_graphs=cfg.cuda_graphs,
        )
        # Frozen CPU graphs build their fused kernels per batch size on first use (0.3-0.9 s),
        # and so do cuDNN's kernel choice, CUDA graphs and compiled code on a GPU: warm every
        # size the batcher can form so live frames never pay it. Large models cost seconds per
        # warm-up pass on a CPU, so only batch 1 is warmed for them there.
        h, w = spec.input_size
        every_size = h * w <= 256 * 256 or seg.device.type == "cuda"
        seg.warmup(range(1, cfg.max_batch + 1) if every_size else (1,))
        return seg

    def _prepare_for(self, model: str, roi: RoiConfig) -> Callable[[Any], Any] | None:
        """What a stream's capture thread does to each frame for the engine: on the CPU, make
        the model's input (shrink, normalise) in parallel with the engine instead of on its
        thread; the engine would compute exactly the same. On a GPU the device does that faster
        than a CPU core; ROI streams crop full frames, so neither gets a prepared input."""
        if self.device != "cpu" or roi.enabled:
            return None
        return functools.partial(prepare_input, self.load_model(model))

    # -- lifecycle -------------------------------------------------------------------
    def _watch_stalls(self) -> None:
        """Marks live streams ``stalled`` whose source thread is blocked in a read (see
        ``StreamWorker.check_stall``): users see it at ``stall_timeout_s``, not only when
        FFmpeg's read timeout runs out."""
        while not self._watchdog_stop.wait(_STALL_CHECK_S):
            for handle in self.list():
                try:
                    handle.worker.check_stall()
                except Exception:  # the watchdog must outlive any one stream's trouble
                    log.exception("stream %s: stall check failed", handle.id)

    def start(self) -> None:
        if self._started:
            return
        self._watchdog_stop.clear()
        if self._cpus is not None:
            # Every thread there is now, and every thread they start (sources, decoders, encoders,
            # the server's), on the CPUs the engine thread leaves; it moves to its own when it starts.
            split = self._cpus
            pin_process(split.rest)
            log.info("engine thread on CPUs %s, the rest on %s", sorted(split.engine), sorted(split.rest))
        self._watchdog = threading.Thread(target=self._watch_stalls, name="stall-watchdog", daemon=True)
        self._watchdog.start()
        self.load_model(self.config.default_model)
        self.engine.start()
        self._started = True
        for sc in self.config.streams:
            self.add(sc, trusted=True)

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Stop every stream and the engine within about ``timeout`` in all: every source is
        told to stop first, then all are waited for together. False when a thread is left."""
        deadline = time.monotonic() + timeout
        handles = []
        for sid in list(self._streams):
            try:
                handles.append(self._detach(sid))
            except StreamNotFoundError:
                continue  # removed meanwhile
        stuck = []
        for h in handles:
            if h.worker.join(deadline - time.monotonic()):
                log.info("stream %s: removed", h.id)
            else:
                stuck.append(h.id)
        if stuck:
            log.error(
                "source threads did not stop within %.1f s (blocked in an open or a read): %s",
                timeout, ", ".join(stuck),
            )
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(1.0)
        left = max(0.5, deadline - time.monotonic())
        engine_stopped = self.engine.stop(left)
        if not engine_stopped:
            log.error("the engine did not stop within %.1f s (a model call still running)", left)
        if self._cpus is not None:
            pin_process(self._cpus.allowed)  # the process's threads may use all its CPUs again
        self._started = False
        return engine_stopped and not stuck

    # -- streams ---------------------------------------------------------------------
    def _new_id(self) -> str:
        while True:
            self._counter += 1
            sid = f"s{self._counter}"
            if sid not in self._streams:
                return sid

    def add(self, sc: StreamConfig, *, spec: SourceSpec | None = None, trusted: bool = False) -> StreamHandle:
        """Start a stream. ``spec`` bypasses URI parsing for sources built in code (pushed frames).

        ``trusted`` streams (config file, command line) may open any file; others (the API)
        only files under the configured media directory.
        """
        restrict = self.restrict_files and not trusted
        media_dir = self.config.server.media_dir if restrict else None
        if spec is None:
            spec = parse_source(
                sc.source,
                options=sc.options,
                allowed_schemes=self.config.server.allowed_schemes,
                media_dir=media_dir,
            )
        if restrict and spec.kind == "file" and media_dir is None:
            raise ValueError(
                "file sources cannot be added through the API unless the server has a media "
                "directory (--media-dir DIR); files must live under it"
            )
        TemporalParams(**sc.temporal.model_dump())  # ValueError names a bad threshold now, not later
        model = sc.model or self.config.default_model
        self.load_model(model)  # raises UnknownModelError / WeightsError before anything starts
        with self._lock:
            sid = sc.id or self._new_id()
            check_stream_id(sid)
            if sid in self._streams:  # named before the limit: the id is the caller's mistake
                raise StreamExistsError(f"stream {sid!r} already exists")
            if len(self._streams) >= self.config.limits.max_streams:
                raise LimitError(f"stream limit reached ({self.config.limits.max_streams} streams)")
            drops = DropCounter()
            capacity = 2 if self.slot_policy is DropPolicy.BLOCK else 1
            slot = FrameSlot(
                capacity=capacity, policy=self.slot_policy, drops=drops, on_put=self.engine.notify
            )
            worker = StreamWorker(
                sid,
                spec,
                slot,
                reconnect=self.config.reconnect,
                realtime=self.realtime,
                max_pixels=self.config.limits.max_source_pixels,
                on_status=functools.partial(self._on_status, sid, slot),
                prepare=self._prepare_for(model, sc.roi),
                ready=functools.partial(self.engine.wait_model, model),
            )
            handle = StreamHandle(
                id=sid,
                spec=spec,
                model=model,
                slot=slot,
                worker=worker,
                drops=drops,
                temporal=sc.temporal,
                roi=sc.roi,
                created_at=now(),
                engine_error=self.engine.stats.last_error if self.engine.died else None,
            )
            self._streams[sid] = handle
            self.engine.add_stream(sid, slot, model=model, temporal=sc.temporal, roi=sc.roi)
            self.engine.want(model)  # built and warmed up before the source is opened
        worker.start()
        log.info("stream %s: added source=%s model=%s", sid, spec.display, model)
        return handle

    def _detach(self, stream_id: str) -> StreamHandle:
        """Take a stream out of the table and the engine and tell its source to stop."""
        with self._lock:
            handle = self._streams.pop(stream_id, None)
        if handle is None:
            raise StreamNotFoundError(stream_id)
        self.engine.remove_stream(stream_id)
        handle.worker.request_stop()
        handle.slot.close()  # a source waiting to hand over a frame gives up at once
        for listener in list(self.removal_listeners):
            try:
                listener(stream_id)
            except Exception:  # an observer must not stop a removal
                log.exception("stream %s: removal listener failed", stream_id)
        return handle

    def remove(self, stream_id: str, timeout: float = 5.0) -> bool:
        """Remove a stream; True when its source thread ended within ``timeout``.

        The stream is gone for everyone at once either way. A source blocked in a call
        FFmpeg does not interrupt (a host name lookup) leaves its thread behind until that
        call ends; it is a daemon and delivers nothing more. (An open or a read blocked on a
        silent camera is interrupted within about 100 ms.)"""
        handle = self._detach(stream_id)
        stopped = handle.worker.join(timeout)
        if stopped:
            log.info("stream %s: removed", stream_id)
        else:
            log.warning(
                "stream %s: removed; its source thread is blocked in an open or a read and ends by "
                "that call's timeout",
                stream_id,
            )
        return stopped

    def update(
        self, stream_id: str, *, temporal: TemporalConfig | None = None, roi: RoiConfig | None = None
    ) -> StreamHandle:
        handle = self.get(stream_id)
        if temporal is not None:
            TemporalParams(**temporal.model_dump())
            handle.temporal = temporal
        if roi is not None:
            handle.roi = roi
            handle.worker.prepare = self._prepare_for(handle.model, roi)
        self.engine.update_stream(stream_id, temporal=temporal, roi=roi)
        return handle

    def get(self, stream_id: str) -> StreamHandle:
        with self._lock:
            handle = self._streams.get(stream_id)
        if handle is None:
            raise StreamNotFoundError(stream_id)
        return handle

    def find(self, stream_id: str) -> StreamHandle | None:
        with self._lock:
            return self._streams.get(stream_id)

    def list(self) -> list[StreamHandle]:
        with self._lock:
            return list(self._streams.values())

    # -- callbacks from worker and engine threads ------------------------------------
    def _on_status(self, stream_id: str, slot: FrameSlot, status: StreamStatus) -> None:
        handle = self.find(stream_id)
        if handle is not None and handle.slot is not slot:
            # A removed stream's source thread ending after another stream took its id (its
            # removal stopped waiting for it, or it was blocked in a call FFmpeg does not
            # interrupt): that one is not stopping.
            return
        if handle is not None and status.state is StreamState.STREAMING and self.engine.died is None:
            handle.engine_error = None  # a dead engine's error stays: nothing is segmented
        for listener in list(self.status_listeners):
            try:
                listener(stream_id, status)
            except Exception:
                log.exception("stream %s: status listener failed", stream_id)

    def _on_engine_error(self, stream_id: str, message: str) -> None:
        handle = self.find(stream_id)
        if handle is not None:
            handle.engine_error = message

    def _on_result(self, result: SegmentationResult) -> None:
        handle = self.find(result.frame.stream_id)
        if handle is None:
            return
        handle.frames_out += 1
        if self.engine.died is None:
            # Segmenting again: an earlier model error is over. (A dead engine's error stays: its
            # finisher can still hand on the last batch's results after the engine thread died.)
            handle.engine_error = None
        handle.results.add()
        handle.latency.add((result.segmented_at - result.frame.captured_at) * 1000.0)
        for listener in list(self.result_listeners):
            listener(result)

    def count_drop(self, stream_id: str, cause: DropCause) -> None:
        handle = self.find(stream_id)
        if handle is not None:
            handle.drops.add(cause)
