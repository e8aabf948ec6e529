"""One stream's source thread: open, decode, number, pace, deliver, reconnect.

The worker owns a stream's lifecycle (``pipeline.types.StreamState``). Sources only
decode; everything that must behave the same for every kind of source lives here:
frame indexes that keep increasing across reconnects and loops, discontinuity marks,
pacing of files served live, stall detection, capped exponential backoff with jitter,
and a bounded ``stop``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.config import ReconnectConfig
from pipeline.slot import FrameSlot
from pipeline.sources import SourceSpec
from pipeline.sources.base import RawFrame, Source, SourceAuthError, SourceError, SourceStalled
from pipeline.stats import events_per_second
from pipeline.types import Frame, StreamState, now

log = logging.getLogger("segstream.source")

_PUT_POLL_S = 0.25  # how often a producer blocked on a full ``block`` slot re-checks for stop
_FPS_WINDOW_S = 2.0
_DEFAULT_FPS = 25.0  # pacing rate of a file that declares none and has no timestamps
_MAX_FRAME_GAP_S = 5.0  # a longer gap between timestamps is a jump, not a frame interval
# A live HLS playlist reopened after a reconnect starts a few segments before its end: pictures
# up to this long before the last one shown are those again. (Further back: a new timeline,
# e.g. the encoder behind the playlist restarted.)
_REPLAY_WINDOW_S = 120.0
_SLOW_FPS_WINDOW_S = 60.0


@dataclass(frozen=True)
class StreamStatus:
    stream_id: str
    state: StreamState
    error: str | None
    state_since: float
    started_at: float
    last_frame_at: float | None
    frames: int  # delivered to the slot
    fps: float  # measured over the last couple of seconds
    reconnects: int
    width: int | None
    height: int | None
    source_fps: float | None
    source: str  # display form (no credentials)


def backoff_delay(attempt: int, cfg: ReconnectConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect ``attempt`` (1-based): doubling, capped, with jitter
    so many cameras behind one switch do not all retry in the same instant."""
    return _capped(cfg.initial_backoff_s, cfg.max_backoff_s, attempt, cfg.jitter, rng)


def auth_backoff_delay(attempt: int, cfg: ReconnectConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempt``-th refused login in a row (1-based): slow from the
    start and doubling, so that a wrong password does not get the camera's account locked."""
    return _capped(cfg.auth_backoff_s, cfg.auth_max_backoff_s, attempt, cfg.jitter, rng)


def _capped(first: float, cap: float, attempt: int, jitter: float, rng: random.Random | None) -> float:
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    base = min(cap, first * 2 ** min(attempt - 1, 30))
    r = (rng or random).uniform(-jitter, jitter)
    return max(0.0, min(cap, base * (1.0 + r)))


class _Stop(Exception):
    """Raised inside the worker when ``stop`` was asked for."""


class StreamWorker:
    def __init__(
        self,
        stream_id: str,
        spec: SourceSpec,
        slot: FrameSlot,
        *,
        reconnect: ReconnectConfig,
        realtime: bool = True,
        max_pixels: int | None = None,
        on_status: Callable[[StreamStatus], None] | None = None,
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
        ready: Callable[[float], bool] | None = None,
    ) -> None:
        """``realtime`` False is offline work, every frame as fast as it comes: files are not
        paced, and a network source that ends (rather than failing) is the end of the input,
        as a file's end is, instead of being reconnected.

        ``prepare``, when given, makes each frame's model input on this thread (see
        ``Frame.model_input``); it may be replaced or cleared at any time. ``ready(timeout)``,
        when given, is asked before the source is first opened, until it says True: a file
        served live is not played (and dropped) while the engine is still warming up."""
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.stream_id = stream_id
        self.spec = spec
        self.slot = slot
        self.reconnect = reconnect
        self.realtime = realtime
        self.max_pixels = max_pixels
        self._on_status = on_status
        self.prepare = prepare
        self._ready = ready
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._source: Source | None = None
        self._rng = random.Random()
        t = now()
        self._state = StreamState.CONNECTING
        self._error: str | None = None
        self._state_since = t
        self._started_at = t
        self._last_frame_at: float | None = None
        self._frames = 0
        self._shown_pts: float | None = None  # HLS: the latest timestamp delivered, across reconnects
        self._next_index = 0
        self._reconnects = 0
        self._size: tuple[int, int] | None = None
        self._source_fps: float | None = None
        self._recent: deque[float] = deque(maxlen=120)
        self._finished = False
        self._resume_at: float | None = None  # paced sources: when the next frame is due

    # ---- public -------------------------------------------------------------------------

    def start(self) -> None:
        # Under the lock, so that ``stop`` sees either no thread (and this does not start one)
        # or a started one it can join, never one created but not started yet.
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"stream {self.stream_id} already started")
            if self._stop.is_set():
                return  # stopped before it started
            self._started_at = now()
            thread = threading.Thread(target=self._run, name=f"source-{self.stream_id}", daemon=True)
            thread.start()
            self._thread = thread

    def request_stop(self) -> None:
        """Ask the thread to end and interrupt its source; returns at once (see ``join``)."""
        self._stop.set()
        with self._cond:
            source, thread = self._source, self._thread
        if source is not None:
            source.interrupt()
        if thread is None:
            self._set_state(StreamState.STOPPED, None)

    def join(self, timeout: float) -> bool:
        """Wait for the thread after ``request_stop``. True when it is gone.

        An open or a read blocked inside FFmpeg is interrupted within about 100 ms; a call
        FFmpeg does not interrupt (a host name lookup) can keep the thread past ``timeout``:
        it is a daemon, and the stream is ``stopped`` for everyone meanwhile.
        """
        with self._cond:
            thread = self._thread
        if thread is None:
            return True
        thread.join(max(0.0, timeout))
        if thread.is_alive():
            self._set_state(StreamState.STOPPED, None)
            return False
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """``request_stop`` then ``join``. True when the thread is gone."""
        self.request_stop()
        if self.join(timeout):
            return True
        log.warning("stream %s: source thread did not stop within %.1f s", self.stream_id, timeout)
        return False

    def status(self) -> StreamStatus:
        with self._cond:
            return self._status_locked()

    def wait_state(self, states: set[StreamState], timeout: float) -> StreamState | None:
        """Block until the state is one of ``states``; the state, or None on timeout."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._state in states, timeout=timeout)
            return self._state if ok else None

    def wait_frames(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` frames were delivered in total."""
        with self._cond:
            return self._cond.wait_for(lambda: self._frames >= count, timeout=timeout)

    def check_stall(self) -> bool:
        """Mark a live stream ``stalled`` once no picture came for ``stall_timeout_s``, even
        while its thread is still blocked in a read (FFmpeg ends that read only by its own
        timeout: for RTSP up to twice ``read_timeout_s``). Called from outside the thread
        (the manager's watchdog); the next picture makes it ``streaming`` again, the read's
        timeout a reconnect. True when it marked the stream."""
        stall_s = self._stall_s()
        with self._cond:
            if self.spec.kind == "file" or self._state is not StreamState.STREAMING or not self._recent:
                return False
            if time.monotonic() - self._recent[-1] <= stall_s:
                return False
        # (the state says "stalled"; the error says what is seen)
        self._set_state(StreamState.STALLED, f"no picture for {stall_s:g} s")
        return True

    def _stall_s(self) -> float:
        """How long without a picture counts as stalled: ``stall_timeout_s``, or two of the
        intervals ``target_fps`` asks for when those are longer (a snapshot URL polled once
        every 10 s is not stalled between its pictures)."""
        target = self.spec.options.target_fps
        return max(self.reconnect.stall_timeout_s, 2.0 / target if target else 0.0)

    @property
    def finished(self) -> bool:
        """True when a file ended (not looping): the stream stopped on its own, without error."""
        return self._finished

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- state --------------------------------------------------------------------------

    def _status_locked(self) -> StreamStatus:
        t = time.monotonic()
        # A stream that ended delivers nothing more: its rate is 0 at once, not as it ages out.
        recent = [] if self._state.terminal else [x for x in self._recent if t - x <= _FPS_WINDOW_S]
        if len(recent) < 3 and not self._state.terminal:
            # A slow camera (a frame every second or more): its last few frames, as long as
            # the next one is not overdue, rather than reading 0 between two of its frames.
            last = list(self._recent)[-3:]
            if len(last) >= 2 and last[-1] > last[0]:
                interval = (last[-1] - last[0]) / (len(last) - 1)
                if t - last[-1] <= 2.0 * interval and interval <= _SLOW_FPS_WINDOW_S:
                    recent = last
        fps = events_per_second(recent, t)
        w, h = self._size if self._size else (None, None)
        return StreamStatus(
            stream_id=self.stream_id,
            state=self._state,
            error=self._error,
            state_since=self._state_since,
            started_at=self._started_at,
            last_frame_at=self._last_frame_at,
            frames=self._frames,
            fps=round(fps, 2),
            reconnects=self._reconnects,
            width=w,
            height=h,
            source_fps=self._source_fps,
            source=self.spec.display,
        )

    def _set_state(self, state: StreamState, error: str | None) -> None:
        with self._cond:
            if self._state.terminal:
                return  # stop() may have finished the stream already; the thread is only catching up
            if state is not self._state and not self._state.can_become(state):
                log.error("stream %s: ignoring transition %s -> %s", self.stream_id, self._state, state)
                return
            changed = state is not self._state or error != self._error
            if state is not self._state:
                self._state_since = now()
            self._state, self._error = state, error
            snapshot = self._status_locked()
            self._cond.notify_all()
        if changed and self._on_status is not None:
            try:
                self._on_status(snapshot)
            except Exception:  # a broken observer must not kill the source thread
                log.exception("stream %s: status callback failed", self.stream_id)

    # ---- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._ready is not None:
                while not self._ready(0.1):
                    if self._stop.is_set():
                        return
            self._loop()
        except Exception as e:  # a bug here must surface as FAILED, never as a silently dead thread
            log.exception("stream %s: source thread crashed", self.stream_id)
            self._set_state(StreamState.FAILED, f"internal error: {type(e).__name__}: {e}")
        finally:
            if not self._state.terminal:
                self._set_state(StreamState.STOPPED, None)

    def _loop(self) -> None:
        attempt = 0
        refused = 0  # refused logins in a row
        discontinuity = True
        while not self._stop.is_set():
            delivered = 0
            frames_before = self._frames
            error: SourceError | None = None
            source = self.spec.create()
            with self._cond:
                self._source = source
            if self._stop.is_set():
                source.interrupt()
            try:
                if attempt == 0 and self._state is StreamState.CONNECTING:
                    log.info("stream %s: connecting to %s", self.stream_id, self.spec.display)
                info = source.open()
                self._source_fps = info.fps
                delivered = self._pump(source, info.fps, discontinuity, segmented=info.segmented)
                if self._stop.is_set():
                    return
                if self.spec.kind == "file":
                    if self.spec.options.loop and delivered > 0:
                        discontinuity, attempt = True, 0
                        continue
                    if delivered == 0:
                        error = SourceError("the file holds no decodable video frames", retryable=False)
                    else:
                        log.info("stream %s: end of file after %d frames", self.stream_id, self._frames)
                        self._finished = True
                        self._set_state(StreamState.STOPPED, None)
                        return
                elif not self.realtime and delivered > 0:
                    # Offline work (every frame, as fast as possible: ``segment``) reads a
                    # recording over HTTP once; reconnecting would read it again, for ever.
                    log.info("stream %s: end of stream after %d frames", self.stream_id, self._frames)
                    self._finished = True
                    self._set_state(StreamState.STOPPED, None)
                    return
                else:
                    error = SourceError("the stream ended (the server closed the connection)")
            except _Stop:
                return
            except SourceError as e:
                error = e
            except Exception as e:  # unknown decoder trouble: retry live sources, fail files
                log.exception("stream %s: unexpected source error", self.stream_id)
                error = SourceError(f"{type(e).__name__}: {e}", retryable=self.spec.kind != "file")
            finally:
                with self._cond:
                    self._source = None
                source.close()
            if self._stop.is_set():
                return
            assert error is not None
            # A connection that delivered pictures counts as working, even though it ended
            # in an error: the next reconnect starts from the first attempt and backoff again.
            delivered = max(delivered, self._frames - frames_before)
            if not error.retryable:
                log.error("stream %s: failed: %s", self.stream_id, error)
                self._set_state(StreamState.FAILED, str(error))
                return
            if isinstance(error, SourceStalled) and self._state is StreamState.STREAMING:
                self._set_state(StreamState.STALLED, str(error))
            attempt = 1 if delivered else attempt + 1
            limit = self.reconnect.max_attempts
            if limit is not None and attempt > limit:
                msg = f"gave up after {limit} reconnect attempts: {error}"
                log.error("stream %s: %s", self.stream_id, msg)
                self._set_state(StreamState.FAILED, msg)
                return
            if isinstance(error, SourceAuthError):
                refused += 1
                delay = auth_backoff_delay(refused, self.reconnect, self._rng)
            else:
                refused = 0
                delay = backoff_delay(attempt, self.reconnect, self._rng)
            # One line per attempt; the backoff grows, so a dead camera never floods the log.
            # The error is part of the log's rate-limit key: a camera whose trouble changes
            # (refused, then 401) is reported at once, a repeated one is held back.
            log.warning(
                "stream %s: %s; reconnecting in %.1f s (attempt %d)",
                self.stream_id, error, delay, attempt, extra={"rate_key": str(error)},
            )
            self._set_state(StreamState.RECONNECTING, str(error))
            if self._stop.wait(delay):
                return
            with self._cond:
                self._reconnects += 1
            discontinuity = True

    def _pump(
        self, source: Source, fps: float | None, discontinuity: bool, *, segmented: bool = False
    ) -> int:
        """Deliver frames until the source ends. Returns how many were delivered."""
        opts = self.spec.options
        # A source's own ``realtime`` option wins over the worker's default for its context.
        realtime = opts.realtime if opts.realtime is not None else self.realtime
        # Files and HLS (whose pictures come a segment at a time) are paced when served live;
        # any other source only when asked (``realtime=1`` on a progressive MP4 over HTTP,
        # which would otherwise arrive as fast as it downloads).
        pace = (realtime and (self.spec.kind == "file" or segmented)) or opts.realtime is True
        rate = fps or _DEFAULT_FPS  # for a source with no timestamps and no declared rate
        last_pts: float | None = None
        stall_s = self._stall_s()
        watch_stall = self.spec.kind != "file"
        min_gap = 1.0 / opts.target_fps if opts.target_fps else 0.0
        anchor: tuple[float, float] | None = None  # (monotonic, pts) pacing reference
        last_frame = time.monotonic()
        last_kept_pts: float | None = None
        last_kept_wall = 0.0
        delivered = 0
        replayed = 0
        for raw in source.frames():
            if self._stop.is_set():
                raise _Stop
            t = time.monotonic()
            if segmented and delivered == 0 and self._replay(raw):
                # Shown before the reconnect: not a new picture (nor a sign of life, so a
                # playlist that stopped growing still counts as stalled). Only the start of a
                # connection is checked: timestamps that go back later on (a discontinuity in
                # the playlist) are the source's own.
                replayed += 1
                if replayed == 1:
                    log.info("stream %s: skipping pictures shown before the reconnect", self.stream_id)
                if watch_stall and t - last_frame > stall_s:
                    raise SourceStalled(f"stalled: no new picture for {stall_s:g} s")
                continue
            if raw is None or (min_gap and self._skip(raw, t, min_gap, last_kept_pts, last_kept_wall)):
                if watch_stall and t - last_frame > stall_s:
                    raise SourceStalled(f"stalled: no picture for {stall_s:g} s")
                if raw is not None:
                    last_frame = t
                continue
            last_frame = t
            last_kept_pts, last_kept_wall = raw.pts, t
            if pace and raw.pts is not None:
                anchor = self._pace(raw.pts, anchor, discontinuity and delivered == 0)
            elif pace:
                anchor = self._pace(delivered / rate, anchor, delivered == 0)
            self._deliver(raw, discontinuity=discontinuity and delivered == 0)
            delivered += 1
            if segmented and raw.pts is not None:
                self._shown_pts = raw.pts if self._shown_pts is None else max(self._shown_pts, raw.pts)
            if pace:
                # When the next frame is due, also across a loop or a reopen: the first frame
                # of the next pass waits one frame interval instead of following at once.
                step = raw.pts - last_pts if raw.pts is not None and last_pts is not None else 0.0
                if not 0.0 < step <= _MAX_FRAME_GAP_S:
                    step = 1.0 / rate
                self._resume_at = time.monotonic() + step
                last_pts = raw.pts
        return delivered

    def _replay(self, raw: RawFrame | None) -> bool:
        """A picture of a segmented (HLS) source delivered already, before a reconnect."""
        if raw is None or raw.pts is None or self._shown_pts is None:
            return False
        return self._shown_pts - _REPLAY_WINDOW_S <= raw.pts <= self._shown_pts

    @staticmethod
    def _skip(raw: RawFrame, t: float, gap: float, last_pts: float | None, last_wall: float) -> bool:
        """Thin the stream to ``target_fps``: by pts when there is one, else by wall clock."""
        tolerance = 0.9 * gap  # jittery timestamps must not halve the rate
        if raw.pts is not None and last_pts is not None:
            return 0 <= raw.pts - last_pts < tolerance
        return last_wall > 0 and t - last_wall < tolerance

    def _pace(self, pts: float, anchor: tuple[float, float] | None, restart: bool) -> tuple[float, float]:
        t = time.monotonic()
        if anchor is None or restart:
            wait = (self._resume_at or 0.0) - t
            if wait > 0:
                if self._stop.wait(min(wait, _MAX_FRAME_GAP_S)):
                    raise _Stop
                t = time.monotonic()
            return (t, pts)
        due = anchor[0] + (pts - anchor[1])
        delay = due - t
        if delay > 0:
            if self._stop.wait(min(delay, _MAX_FRAME_GAP_S)):
                raise _Stop
            if delay > _MAX_FRAME_GAP_S:
                # A jump forward (a paused recording, a broken timestamp) is cut to
                # _MAX_FRAME_GAP_S, and the frames after it keep their pace from here (they
                # came one per _MAX_FRAME_GAP_S until the whole gap had been waited out).
                return (time.monotonic(), pts)
        elif delay < -1.0 or pts < anchor[1]:
            return (t, pts)  # far behind, or timestamps went backwards: re-anchor rather than burst
        return anchor

    def _deliver(self, raw: RawFrame, *, discontinuity: bool) -> None:
        image = raw.image
        h, w = int(image.shape[0]), int(image.shape[1])
        if self.max_pixels is not None and w * h > self.max_pixels:
            raise SourceError(
                f"source is {w}x{h} ({w * h} pixels), above the limit of {self.max_pixels} pixels",
                retryable=False,
            )
        captured_at = now()
        prepare, model_input, prepare_ms = self.prepare, None, 0.0
        if prepare is not None:
            t0 = time.perf_counter()
            try:
                model_input = prepare(image)
            except Exception as e:  # noqa: BLE001 - the engine resizes the frame itself instead
                log.debug("stream %s: preparing frame for the model failed: %s", self.stream_id, e)
            prepare_ms = (time.perf_counter() - t0) * 1000.0
        # A picture of another size (a camera switching resolution on the same connection)
        # starts afresh: masks and crops of the old size say nothing about the new frames.
        resized = self._size is not None and self._size != (w, h)
        frame = Frame(
            stream_id=self.stream_id,
            index=self._next_index,
            pts=raw.pts,
            captured_at=captured_at,
            image=image,
            discontinuity=discontinuity or raw.discontinuity or resized,
            decode_ms=raw.decode_ms,
            model_input=model_input,
            prepare_ms=prepare_ms,
        )
        self._next_index += 1
        while not self.slot.put(frame, timeout=_PUT_POLL_S):
            if self._stop.is_set() or self.slot.closed:
                raise _Stop
        first = False
        with self._cond:
            self._frames += 1
            self._last_frame_at = frame.captured_at
            self._recent.append(time.monotonic())
            self._size = (w, h)
            first = self._state is not StreamState.STREAMING
            self._cond.notify_all()
        if first:
            log.info("stream %s: streaming %dx%d", self.stream_id, w, h)
            self._set_state(StreamState.STREAMING, None)
