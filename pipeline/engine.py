"""The engine thread: the one owner of the models and the device.

It gathers frames from every stream's slot into batches (``pipeline.batcher``), runs
preprocessing, the network and per-stream temporal refinement / ROI on the device, and
hands ``SegmentationResult`` values to a callback. No other thread touches a device tensor.

On the CPU the stages either side of the network run beside it: capture threads make each
frame's model input (``Frame.model_input``), so the engine only stacks them, and a finisher
thread sizes the masks back to the frames and emits the results, in order, while the next
batch runs (at most two batches wait for it; then the engine waits too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from models import kernels
from models.temporal import Plan, TemporalParams, TemporalRefiner, TemporalState
from pipeline.affinity import pin_this_thread
from pipeline.batcher import Batch, Batcher, Lane
from pipeline.config import EngineConfig, RoiConfig, TemporalConfig
from pipeline.roi import RoiOutput, RoiPlan, RoiTracker
from pipeline.slot import FrameSlot
from pipeline.types import DropCause, Frame, SegmentationResult, now

log = logging.getLogger("segstream.engine")

# A model that failed to build is not tried again for this long: its streams' frames fail at
# once with the reason, instead of rebuilding (and logging a traceback) on every batch.
MODEL_RETRY_S = 30.0


class ModelUnavailable(RuntimeError):
    """The model failed to build a moment ago; raised for its batches until the retry is due."""


class SegmenterLike(Protocol):
    """What the engine needs of a segmenter (``models.segmenter.Segmenter`` is one)."""

    spec: Any

    def preprocess(self, images: Sequence[np.ndarray]) -> Any: ...

    def from_prepared(self, inputs: Sequence[np.ndarray]) -> Any: ...

    def infer(self, x: Any) -> Any: ...

    def postprocess(self, probs: Any, sizes: Sequence[tuple[int, int]]) -> list[tuple[np.ndarray, Any]]: ...


# Builds the segmenter for a model name. Called on the engine thread only, so device
# placement, compilation and warm-up all happen on the thread that owns the device.
SegmenterFactory = Callable[[str], SegmenterLike]


@dataclass
class EngineStats:
    batches: int = 0
    frames: int = 0
    errors: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    last_error: str | None = None
    infer_ms_ema: float = 0.0
    started: bool = False
    ready: bool = False
    # Images through the network; in full-frame mode one per frame, so per frame it is the
    # compute relative to full-frame mode. ROI frames add their crops and full passes here.
    model_inputs: int = 0
    roi_frames: int = 0
    roi_crops: int = 0
    roi_full: int = 0
    # Models whose last build failed, with the reason (a later successful build removes them).
    failed_models: dict[str, str] = field(default_factory=dict)
    preload: tuple[str, ...] = ()  # the models the engine builds before it is ready
    # Why the engine thread ended on its own (an unexpected error); None while it runs.
    died: str | None = None

    def snapshot(self) -> dict[str, Any]:
        failed = dict(self.failed_models)
        return {
            "model_inputs": self.model_inputs,
            "inputs_per_frame": round(self.model_inputs / self.frames, 4) if self.frames else 0.0,
            "roi": {
                "frames": self.roi_frames,
                "crops": self.roi_crops,
                "full_passes": self.roi_full,
                "crops_per_frame": round(self.roi_crops / self.roi_frames, 4) if self.roi_frames else 0.0,
                "compute_vs_full": (
                    round((self.roi_crops + self.roi_full) / self.roi_frames, 4) if self.roi_frames else 0.0
                ),
            },
            "batches": self.batches,
            "frames": self.frames,
            "errors": self.errors,
            "batch_sizes": dict(self.batch_sizes),
            "last_error": self.last_error,
            "infer_ms_ema": round(self.infer_ms_ema, 3),
            "running": self.started,
            "ready": self.ready,
            # ready, and every preloaded model built (none of them failed its last build)
            "models_ready": self.ready and not any(m in failed for m in self.preload),
            "failed_models": failed,
            "died": self.died,
        }


@dataclass
class _StreamCtx:
    stream_id: str
    model: str
    temporal: TemporalConfig
    roi: RoiConfig
    slot: FrameSlot | None = None  # where this stream's frames come from (a re-added id has another)
    temporal_state: TemporalState | None = None
    refiner: TemporalRefiner | None = None
    roi_state: Any = None


def _on_cpu(device: str) -> bool:
    """Whether an engine configured for ``device`` runs its models on the CPU."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _model_input(seg: SegmenterLike, frames: Sequence[Frame], crops: Sequence[np.ndarray]) -> Any:
    """The batch's network input: the plain frames' rows, then the ROI crops' rows.

    Frames whose capture thread already made their input (``Frame.model_input``) are only
    stacked; anything else is preprocessed here.
    """
    ready = [f.model_input for f in frames if f.model_input is not None]
    parts = []
    if frames:
        if ready and len(ready) == len(frames) and all(
            a.shape == (*seg.spec.input_size, 3) for a in ready
        ):
            parts.append(seg.from_prepared(ready))
        else:
            parts.append(seg.preprocess([f.image for f in frames]))
    if crops:
        parts.append(seg.preprocess(crops))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class _Finish:
    """What is left of a batch after the network: sizing masks and emitting results."""

    seg: SegmenterLike
    batch: Batch
    frames: list[Frame]
    plans: list[Plan | None]
    plain: Any  # refined probabilities of the plain (non-ROI) frames
    roi_outs: dict[int, RoiOutput]
    timings: dict[str, float]
    failed: set[int] = field(default_factory=set)  # batch positions whose stream's own step failed


class _Finisher:
    """One thread that finishes batches in the order they were submitted.

    At most ``depth`` batches wait: when it falls behind, ``submit`` blocks the engine
    rather than letting results pile up (latency must not grow under overload).
    """

    def __init__(self, work: Callable[[_Finish], None], depth: int = 2) -> None:
        self._work = work
        self._jobs: deque[_Finish | None] = deque()
        self._cond = threading.Condition()
        self._depth = depth
        self._thread = threading.Thread(target=self._run, name="engine-finish", daemon=True)
        self._thread.start()

    def submit(self, job: _Finish) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._jobs) < self._depth)
            self._jobs.append(job)
            self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Finish what was submitted, then end the thread; False if it did not end in time."""
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                job = self._jobs[0]
            if job is None:
                return
            try:
                self._work(job)
            except Exception:  # a broken consumer must not end the thread
                log.exception("engine: finishing a batch failed")
            with self._cond:
                self._jobs.popleft()
                self._cond.notify_all()


class Engine:
    """Owns the batcher, the segmenters and the engine thread."""

    def __init__(
        self,
        *,
        config: EngineConfig,
        segmenter_factory: SegmenterFactory,
        on_result: Callable[[SegmentationResult], None],
        on_error: Callable[[str, str], None] | None = None,
        on_batch: Callable[[str, int, dict[str, float]], None] | None = None,
        preload: Sequence[str] = (),
        cpus: set[int] | None = None,
    ) -> None:
        """``cpus``: the CPUs the engine thread (and the threads it starts: torch's workers,
        model builders) runs on; None leaves it where it is started (pipeline.affinity)."""
        self.config = config
        self._cpus = cpus
        self._factory = segmenter_factory
        self._on_result = on_result
        self._on_error = on_error
        self._on_batch = on_batch
        # Models to build and warm up on the engine thread before their streams' first frame:
        # the preloaded ones at start, and each stream's when it is added.
        self._wanted: list[str] = list(preload)
        self._settled: set[str] = set()  # wanted models built (or failed to build)
        self._models_cond = threading.Condition()
        # On a CPU, models wanted while streams run are built on a thread of their own, so the
        # streams already running keep being served meanwhile (a large model takes seconds).
        self._builder: threading.Thread | None = None
        self._building: str | None = None
        self._batcher = Batcher(
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000.0,
            latency_budget_s=config.latency_budget_ms / 1000.0,
        )
        self._cond = threading.Condition()
        self._pending = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._segmenters: dict[str, SegmenterLike] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # model -> (reason, monotonic time)
        self._streams: dict[str, _StreamCtx] = {}
        self._streams_lock = threading.Lock()
        self._finisher: _Finisher | None = None
        self.stats = EngineStats(preload=tuple(preload))

    # -- registration (any thread) -------------------------------------------------
    def notify(self) -> None:
        """Wake the engine: a slot received a frame."""
        with self._cond:
            self._pending = True
            self._cond.notify()

    def add_stream(
        self,
        stream_id: str,
        slot: FrameSlot,
        *,
        model: str,
        temporal: TemporalConfig | None = None,
        roi: RoiConfig | None = None,
    ) -> None:
        with self._streams_lock:
            self._streams[stream_id] = _StreamCtx(
                stream_id, model, temporal or TemporalConfig(), roi or RoiConfig(), slot
            )
        self._prepare_refinement(temporal)
        self._batcher.add(Lane(stream_id=stream_id, slot=slot, group=model))
        self.notify()

    def _prepare_refinement(self, temporal: TemporalConfig | None) -> None:
        """A stream will be refined on the CPU: start loading the compiled kernels now, in the
        background (about a second of CPU, and 100 MB that a server without refinement does
        not spend), while its source connects rather than once its frames flow."""
        if temporal is not None and temporal.mode != "off" and _on_cpu(self.config.device):
            kernels.current()

    def update_stream(
        self, stream_id: str, *, temporal: TemporalConfig | None = None, roi: RoiConfig | None = None
    ) -> None:
        with self._streams_lock:
            ctx = self._streams.get(stream_id)
            if ctx is None:
                raise KeyError(stream_id)
            if temporal is not None:
                ctx.temporal = temporal
                ctx.temporal_state = None
                ctx.refiner = None
            if roi is not None:
                ctx.roi = roi
                ctx.roi_state = None
        self._prepare_refinement(temporal)

    def remove_stream(self, stream_id: str) -> None:
        self._batcher.remove(stream_id)
        with self._streams_lock:
            self._streams.pop(stream_id, None)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        if _on_cpu(self.config.device):
            # On a GPU the engine thread finishes its own batches: device tensors never leave it.
            self._finisher = _Finisher(self._finish)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        self.stats.started = True

    def stop(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        self.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            alive = self._thread.is_alive()
            if not alive and self._finisher is not None:
                alive = not self._finisher.close(timeout)
            self.stats.started = alive
            return not alive
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def died(self) -> str | None:
        """Why the engine thread ended by itself (an error no batch handling caught), or None."""
        return self.stats.died

    def want(self, name: str) -> None:
        """Have the engine thread build and warm up model ``name`` now, ahead of its first frame."""
        with self._models_cond:
            if name in self._settled or name in self._wanted:
                return
            self._wanted.append(name)
        self.notify()

    def wait_model(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a wanted model to be built and warmed up. True once
        it is (or failed: its streams then get the error), or when the engine is not running."""
        with self._models_cond:
            return self._models_cond.wait_for(lambda: name in self._settled or not self.alive, timeout)

    @property
    def loaded_models(self) -> tuple[str, ...]:
        """Names of the models built and warmed up on the device (for readiness checks)."""
        return tuple(self._segmenters)

    # -- the engine thread -----------------------------------------------------------
    def _wait(self, timeout: float) -> None:
        with self._cond:
            if not self._pending and not self._stop.is_set():
                self._cond.wait(timeout)
            self._pending = False

    def _segmenter(self, name: str) -> SegmenterLike:
        seg = self._segmenters.get(name)
        if seg is not None:
            return seg
        builder = self._builder
        if builder is not None and self._building == name and builder is not threading.current_thread():
            builder.join()  # frames came before their stream waited for the model: wait here
            if (seg := self._segmenters.get(name)) is not None:
                return seg
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() - failed[1] < MODEL_RETRY_S:
            raise ModelUnavailable(f"could not be built: {failed[0]} (next try in {MODEL_RETRY_S:.0f} s)")
        try:
            seg = self._factory(name)
        except Exception as e:
            self._failed[name] = (f"{type(e).__name__}: {e}", time.monotonic())
            self.stats.failed_models[name] = self._failed[name][0]
            raise
        self._failed.pop(name, None)
        self._segmenters[name] = seg
        self.stats.failed_models.pop(name, None)
        return seg

    def _build_wanted(self, *, beside: bool = False) -> None:
        """Build the wanted models not built yet: here, or (``beside``) one at a time on a
        builder thread while this thread goes on serving the models it has."""
        while True:
            with self._models_cond:
                if self._builder is not None and self._builder.is_alive():
                    return
                name = next((n for n in self._wanted if n not in self._settled), None)
            if name is None:
                return
            if beside:
                self._building = name
                self._builder = threading.Thread(
                    target=self._build, args=(name,), name=f"engine-build-{name}", daemon=True
                )
                self._builder.start()
                return
            self._build(name)

    def _build(self, name: str) -> None:
        try:
            self._segmenter(name)
        except Exception as e:  # reported, the engine still serves other models
            self.stats.last_error = f"loading model {name!r}: {e}"
            log.error("engine: %s", self.stats.last_error)
        with self._models_cond:
            self._settled.add(name)
            self._models_cond.notify_all()
        self.notify()

    def _run(self) -> None:
        try:
            if self._cpus is not None:
                pin_this_thread(self._cpus)
            self._build_wanted()  # the preloaded models
            self.stats.ready = True
            while not self._stop.is_set():
                # A GPU and everything on it belong to this thread; a CPU model can be built beside.
                self._build_wanted(beside=self._finisher is not None)
                self._step()
        except Exception as e:
            # Nothing segments any more: say so where operators look (the log, every stream's
            # error, /readyz and /healthz) instead of only on stderr.
            self.stats.died = f"{type(e).__name__}: {e}"
            self.stats.last_error = f"engine thread died: {self.stats.died}"
            log.critical("engine: the engine thread died; no stream is segmented any more", exc_info=e)
            if self._on_error is not None:
                with self._streams_lock:
                    ids = list(self._streams)
                for sid in ids:
                    try:
                        self._on_error(sid, self.stats.last_error)
                    except Exception:
                        log.exception("engine: reporting the engine's end to stream %s failed", sid)
        finally:
            self.stats.started = False
            with self._models_cond:  # nobody waits for a model from a stopped engine
                self._models_cond.notify_all()

    def _step(self) -> None:
        batch = self._batcher.poll(self._wait)
        if batch is None:
            self._wait(0.05)
            return
        for lane, frame in batch.stale:
            log.debug("engine: dropped stale frame %s/%d", lane.stream_id, frame.index)
        keep = [i for i, lane in enumerate(batch.lanes) if self._current(lane)]
        if len(keep) < len(batch.frames):
            # Taken just before their stream was removed: nobody wants them.
            frames, lanes = [batch.frames[i] for i in keep], [batch.lanes[i] for i in keep]
            batch = replace(batch, frames=frames, lanes=lanes)
        if batch.frames:
            self._process(batch)

    def _current(self, lane: Lane) -> bool:
        """Whether ``lane`` still feeds its stream: not once the stream was removed, nor after
        another stream was added under the same id (the old source's frames, decided or in
        the network when that happened, must not reach the new stream's clients, counters or
        temporal and ROI state)."""
        ctx = self._ctx(lane.stream_id)
        return ctx is not None and ctx.slot is lane.slot

    def _process(self, batch: Batch) -> None:
        size = len(batch.frames)
        t0 = time.perf_counter()
        try:
            seg = self._segmenter(batch.group)
            # ROI frames contribute their crops (and full frame, when due) to the same batch.
            # A stream whose own step fails loses that frame; the batch goes on without it.
            failed: set[int] = set()
            roi = self._roi_begin(seg, batch, failed)
            frames = [f for i, f in enumerate(batch.frames) if i not in roi and i not in failed]
            crops = [im for _, _, ims in roi.values() for im in ims]
            x = _model_input(seg, frames, crops)
            n_images = len(frames) + len(crops)
            plans, steps = self._plan(seg, x, frames)
            run = [i for i, p in enumerate(plans) if p is None or p.run_model]
            rows = run + list(range(len(frames), n_images))
            t1 = time.perf_counter()
            probs = None
            if rows and x is not None:
                probs = seg.infer(x if len(rows) == n_images else x[rows])
            t2 = time.perf_counter()
            plain = self._refine(plans, steps, run, probs if not roi or probs is None else probs[: len(run)])
            roi_outs = self._roi_finish(roi, probs, len(run), batch, failed)
            t3 = time.perf_counter()
        except Exception as e:
            self._fail(batch, e)
            return
        timings = {
            "preprocess": (t1 - t0) * 1000.0,
            "infer": (t2 - t1) * 1000.0,
            "postprocess": (t3 - t2) * 1000.0,
        }
        self.stats.batches += 1
        self.stats.frames += size
        self.stats.batch_sizes[size] = self.stats.batch_sizes.get(size, 0) + 1
        self.stats.model_inputs += len(rows)
        if rows:
            per_frame_infer = timings["infer"] / len(rows)
            a = 0.1 if self.stats.infer_ms_ema else 1.0
            self.stats.infer_ms_ema = (1 - a) * self.stats.infer_ms_ema + a * per_frame_infer
        job = _Finish(seg, batch, frames, plans, plain, roi_outs, timings, failed)
        if self._finisher is not None:
            # Resizing masks to frame size and handing results on overlaps the next batch's
            # network pass.
            self._finisher.submit(job)
        else:
            self._finish(job)

    def _finish(self, job: _Finish) -> None:
        """Masks at frame size for the plain frames, then results, in batch order."""
        t0 = time.perf_counter()
        batch, frames = job.batch, job.frames
        try:
            sizes = [(f.height, f.width) for f in frames]
            outs = job.seg.postprocess(job.plain, sizes) if frames else []
        except Exception as e:
            self._fail(batch, e)
            return
        post_ms = job.timings["postprocess"] + (time.perf_counter() - t0) * 1000.0
        timings = {**job.timings, "postprocess": post_ms}
        if self._on_batch is not None:
            self._on_batch(batch.group, len(batch.frames), timings)
        done = now()
        classes = tuple(job.seg.spec.classes)
        plain_iter = iter(zip(job.plans, outs, strict=True))
        for i, frame in enumerate(batch.frames):
            info: dict[str, Any]
            if i in job.failed or not self._current(batch.lanes[i]):
                continue  # failed, or its stream was removed (or replaced) while the batch ran
            if i in job.roi_outs:
                r = job.roi_outs[i]
                labels, fg, full_pass, info = r.labels, r.fg, bool(r.info["full"]), {"roi": r.info}
            else:
                plan, (labels, fg) = next(plain_iter)
                full_pass = plan is None or plan.run_model
                info = {} if plan is None else {"temporal": plan.reason}
            self._emit(
                frame,
                labels,
                fg,
                classes,
                batch.group,
                timings,
                done,
                batch.first_at,
                full_pass=full_pass,
                info=info,
            )

    def _fail(self, batch: Batch, e: Exception) -> None:
        msg = f"model {batch.group!r} failed on a batch of {len(batch.frames)}: {type(e).__name__}: {e}"
        if isinstance(e, ModelUnavailable):
            log.debug("engine: %s", msg)  # its build failure was logged with the traceback
        else:
            log.error("engine: %s", msg, exc_info=e)
        self._report(batch.lanes, msg)

    def _fail_frame(self, batch: Batch, i: int, e: Exception, failed: set[int]) -> None:
        """One stream's own step (ROI planning or pasting) failed: only its frame is lost
        (batch position ``i`` goes to ``failed``), and that stream's tracking starts again
        from a full frame."""
        frame, lane = batch.frames[i], batch.lanes[i]
        failed.add(i)
        ctx = self._ctx(frame.stream_id)
        if ctx is not None:
            ctx.roi_state = None
        msg = f"frame {frame.index} failed in the stream's own processing: {type(e).__name__}: {e}"
        log.error("engine: stream %s: %s", frame.stream_id, msg, exc_info=e)
        self._report([lane], msg)

    def _report(self, lanes: Sequence[Lane], msg: str) -> None:
        """Count the error, and drop and report it on each of these streams."""
        self.stats.errors += 1
        self.stats.last_error = msg
        for lane in lanes:
            lane.slot.drops.add(DropCause.ERROR)
            if self._on_error is not None and self._current(lane):
                self._on_error(lane.stream_id, msg)

    # -- temporal refinement: per-stream state, decided before the model runs ---------
    def _ctx(self, stream_id: str) -> _StreamCtx | None:
        with self._streams_lock:
            return self._streams.get(stream_id)

    def _plan(
        self, seg: SegmenterLike, x: Any, frames: Sequence[Frame]
    ) -> tuple[list[Plan | None], list[tuple[_StreamCtx, TemporalRefiner, TemporalState] | None]]:
        """Each frame's temporal plan, and the refiner and state it was made with: the batch
        finishes with those even when the stream's settings change (or it is removed) meanwhile."""
        plans: list[Plan | None] = []
        steps: list[tuple[_StreamCtx, TemporalRefiner, TemporalState] | None] = []
        for i, frame in enumerate(frames):
            ctx = self._ctx(frame.stream_id)
            if ctx is None or ctx.temporal.mode == "off":
                plans.append(None)
                steps.append(None)
                continue
            if ctx.refiner is None:
                params = TemporalParams(**ctx.temporal.model_dump())
                ctx.refiner = TemporalRefiner(params, mean=seg.spec.mean, std=seg.spec.std)
                ctx.temporal_state = TemporalRefiner.initial_state()
            refiner, state = ctx.refiner, ctx.temporal_state or TemporalRefiner.initial_state()
            plans.append(
                refiner.plan(x[i : i + 1], state, index=frame.index, discontinuity=frame.discontinuity)
            )
            steps.append((ctx, refiner, state))
        return plans, steps

    def _refine(
        self,
        plans: list[Plan | None],
        steps: list[tuple[_StreamCtx, TemporalRefiner, TemporalState] | None],
        run: list[int],
        probs: Any,
    ) -> Any:
        if all(p is None for p in plans):
            return probs
        row = {i: j for j, i in enumerate(run)}
        out: list[torch.Tensor] = []
        in_place = len(run) == len(plans)  # every row of probs is its frame's, in order
        for i, (plan, step) in enumerate(zip(plans, steps, strict=True)):
            p = probs[row[i]] if i in row else None
            if plan is None or step is None:
                assert p is not None  # frames without a plan always run the model
                out.append(p)
                continue
            ctx, refiner, state = step
            # The batch's probabilities are the engine's own: refine may write into them.
            refined, new_state = refiner.refine(plan, p, state, overwrite=True)
            if ctx.refiner is refiner:  # not reset by a settings change while the batch ran
                ctx.temporal_state = new_state
            out.append(refined)
            in_place = in_place and p is not None and refined.data_ptr() == p.data_ptr()
        # Nothing carried forward and every result already in its row: no copy of the batch.
        return probs if in_place else torch.stack(out)

    # -- ROI mode: crops around the people of the previous mask (pipeline.roi) -----------
    def _roi_begin(
        self, seg: SegmenterLike, batch: Batch, failed: set[int]
    ) -> dict[int, tuple[RoiTracker, RoiPlan, list[np.ndarray]]]:
        """Plans for the ROI streams' frames, by batch position (a frame whose planning fails
        goes to ``failed``). ROI takes precedence over temporal refinement: a stream with both
        set runs ROI only."""
        jobs: dict[int, tuple[RoiTracker, RoiPlan, list[np.ndarray]]] = {}
        for i, frame in enumerate(batch.frames):
            ctx = self._ctx(frame.stream_id)
            if ctx is None or not ctx.roi.enabled:
                continue
            try:
                tracker = ctx.roi_state
                if not isinstance(tracker, RoiTracker) or tracker.spec is not seg.spec:
                    tracker = ctx.roi_state = RoiTracker(ctx.roi, seg.spec)
                plan, images = tracker.begin(
                    frame.image, index=frame.index, discontinuity=frame.discontinuity
                )
            except Exception as e:
                self._fail_frame(batch, i, e, failed)
                continue
            jobs[i] = (tracker, plan, images)
        return jobs

    def _roi_finish(
        self, jobs: dict[int, tuple[RoiTracker, RoiPlan, list[np.ndarray]]], probs: Any, start: int,
        batch: Batch, failed: set[int],
    ) -> dict[int, RoiOutput]:
        """Paste each ROI frame's rows of ``probs`` (they follow the plain frames' ``start`` rows);
        a frame whose pasting fails goes to ``failed``."""
        outs: dict[int, RoiOutput] = {}
        row = start
        for i, (tracker, plan, images) in jobs.items():
            n = len(images)
            try:
                outs[i] = tracker.finish(plan, probs[row : row + n] if n else None)
            except Exception as e:
                self._fail_frame(batch, i, e, failed)
                continue
            finally:
                row += n
            self.stats.roi_frames += 1
            self.stats.roi_crops += len(plan.boxes)
            self.stats.roi_full += int(plan.full)
        return outs

    def _emit(
        self,
        frame: Frame,
        labels: np.ndarray,
        fg: Any,
        classes: tuple[str, ...],
        model: str,
        timings: dict[str, float],
        done: float,
        taken_at: float,
        *,
        full_pass: bool = True,
        info: dict[str, Any] | None = None,
    ) -> None:
        latency = {
            "decode": frame.decode_ms,
            # the capture thread's share of preprocessing happened before the slot: not queueing
            "queue": max(0.0, (taken_at - frame.captured_at) * 1000.0 - frame.prepare_ms),
            **timings,
        }
        if frame.prepare_ms:  # the capture thread did (part of) the preprocessing
            latency["preprocess"] = latency.get("preprocess", 0.0) + frame.prepare_ms
        if frame.model_input is not None:
            # Results live on in encoders and client slots: they need not hold the model input.
            frame = replace(frame, model_input=None)
        result = SegmentationResult(
            frame=frame,
            labels=labels,
            classes=classes,
            model=model,
            probs=fg,
            latency_ms=latency,
            segmented_at=done,
            full_pass=full_pass,
            info=info or {},
        )
        try:
            self._on_result(result)
        except Exception:  # a broken consumer must not kill the engine
            log.exception("engine: result consumer failed for stream %s", frame.stream_id)
