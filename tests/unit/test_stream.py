"""The stream worker: lifecycle, numbering, reconnects, stalls, pacing, bounded latency, stop."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import ReconnectConfig, SourceOptions
from pipeline.slot import DropPolicy, FrameSlot
from pipeline.sources import SourceSpec, parse_source
from pipeline.sources.base import RawFrame, Source, SourceAuthError, SourceError, SourceInfo, SourceStalled
from pipeline.stream import StreamStatus, StreamWorker, auth_backoff_delay, backoff_delay
from pipeline.types import DropCause, Frame, StreamState, now
from tests.helpers_video import make_test_video

S = StreamState
FAST = ReconnectConfig(initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0, stall_timeout_s=0.3)


@dataclass(frozen=True)
class FakeSpec(SourceSpec):
    """A spec whose decoders come from a factory (one call per (re)connect)."""

    factory: Callable[[], Source] | None = None

    def create(self) -> Source:
        assert self.factory is not None
        return self.factory()


def fake_spec(factory: Callable[[], Source], *, kind: str = "network", **opts: object) -> FakeSpec:
    return FakeSpec(
        uri="fake://x",
        kind=kind,  # type: ignore[arg-type]
        options=SourceOptions(**opts),  # type: ignore[arg-type]
        display="fake://x",
        factory=factory,
    )


class Scripted(Source):
    """One session of a scripted peer: fail to open, send ``n`` frames, stall, or hang."""

    def __init__(
        self, action: str, n: int = 0, interval: float = 0.0, ignore_interrupt: bool = False
    ) -> None:
        self.uri = "fake://x"
        self.action, self.n, self.interval = action, n, interval
        self.ignore_interrupt = ignore_interrupt
        self.stop = threading.Event()
        self.closed = False

    def open(self) -> SourceInfo:
        if self.action == "fail":
            raise SourceError("cannot open: connection refused")
        if self.action == "fatal":
            raise SourceError("cannot open: invalid data", retryable=False)
        return SourceInfo(width=8, height=6, fps=30.0)

    def frames(self) -> Iterator[RawFrame | None]:
        img = np.zeros((6, 8, 3), np.uint8)
        for i in range(self.n):
            if self.stop.is_set():
                return
            if self.interval:
                time.sleep(self.interval)
            yield RawFrame(image=img, pts=i / 30)
        if self.action == "stall":  # connected, data trickles in, no picture ever decodes
            while not self.stop.is_set():
                time.sleep(0.01)
                yield None
        if self.action == "timeout":
            raise SourceStalled("timed out: no data from the source for 1 s")
        if self.action == "hang":  # a read that ignores interrupt (like a blocked FFmpeg read)
            time.sleep(1.0)
        if self.action == "live":
            i = self.n
            while not self.stop.is_set():
                time.sleep(self.interval or 0.002)
                yield RawFrame(image=img, pts=i / 30)
                i += 1

    def interrupt(self) -> None:
        if not self.ignore_interrupt:
            self.stop.set()

    def close(self) -> None:
        self.closed = True


def script(*sessions: Scripted) -> tuple[Callable[[], Source], list[Scripted]]:
    made: list[Scripted] = []
    queue = list(sessions)

    def factory() -> Source:
        s = queue.pop(0) if len(queue) > 1 else queue[0]
        made.append(s)
        return s

    return factory, made


def drain(slot: FrameSlot, worker: StreamWorker, *, until: int, timeout: float = 5.0) -> list[Frame]:
    out: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(out) < until and time.monotonic() < deadline:
        f = slot.take()
        if f is None:
            if worker.status().state.terminal and len(slot) == 0:
                break
            time.sleep(0.001)
        else:
            out.append(f)
    return out


def run(spec: SourceSpec, **kw: object) -> tuple[StreamWorker, FrameSlot, list[StreamStatus]]:
    slot = kw.pop("slot", None)
    if slot is None:
        slot = FrameSlot(capacity=4, policy=DropPolicy.BLOCK)
    seen: list[StreamStatus] = []
    kw.setdefault("reconnect", FAST)
    assert isinstance(slot, FrameSlot)
    worker = StreamWorker("t", spec, slot, on_status=seen.append, **kw)  # type: ignore[arg-type]
    worker.start()
    return worker, slot, seen


# ---- files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_video(tmp_path_factory.mktemp("v") / "c.mp4", frames=20, fps=30)


def test_offline_file_delivers_every_frame_then_stops(clip: Path) -> None:
    worker, slot, seen = run(parse_source(str(clip)), realtime=False)
    assert any(t.name == "source-t" and t.daemon for t in threading.enumerate())
    frames = drain(slot, worker, until=100)
    assert [f.index for f in frames] == list(range(20))
    assert [f.discontinuity for f in frames] == [True] + [False] * 19
    assert all(f.stream_id == "t" and f.captured_at > 0 and f.decode_ms > 0 for f in frames)
    assert [f.pts for f in frames] == pytest.approx([i / 30 for i in range(20)])
    assert worker.wait_state({S.STOPPED}, timeout=2) is S.STOPPED
    st = worker.status()
    assert worker.finished and st.error is None and st.frames == 20 and (st.width, st.height) == (160, 120)
    assert st.source_fps == pytest.approx(30)
    assert slot.drops.total() == 0, "block policy never drops"
    assert [s.state for s in seen] == [S.STREAMING, S.STOPPED]
    assert worker.stop(1)


def test_served_file_waits_for_the_engine_then_plays_from_its_first_frame(clip: Path) -> None:
    """While the engine warms up, a file served live is not opened, so nothing is dropped."""
    warm = threading.Event()
    asked: list[float] = []

    def ready(timeout: float) -> bool:
        asked.append(timeout)
        return warm.wait(timeout)

    worker, slot, _ = run(parse_source(str(clip)), ready=ready)
    time.sleep(0.4)
    assert len(asked) >= 2 and worker.status().frames == 0 and len(slot) == 0
    assert worker.status().state is S.CONNECTING
    warm.set()
    frames = drain(slot, worker, until=100)
    assert [f.index for f in frames] == list(range(20)) and frames[0].discontinuity
    assert worker.wait_state({S.STOPPED}, timeout=3) is S.STOPPED and worker.status().frames == 20


def test_stop_while_waiting_for_the_engine_is_prompt(clip: Path) -> None:
    worker, _, _ = run(parse_source(str(clip)), ready=lambda timeout: time.sleep(timeout) or False)
    time.sleep(0.15)
    t0 = time.monotonic()
    assert worker.stop(2) and time.monotonic() - t0 < 0.5
    assert worker.status().frames == 0 and worker.status().state is S.STOPPED


def test_looping_file_keeps_numbering_and_marks_each_restart(clip: Path) -> None:
    worker, slot, _ = run(parse_source(f"{clip}?loop=1"), realtime=False)
    frames = drain(slot, worker, until=50)
    assert worker.stop(2)
    assert [f.index for f in frames] == list(range(50))
    assert [f.index for f in frames if f.discontinuity] == [0, 20, 40]
    assert not worker.finished and worker.status().state is S.STOPPED


def test_served_file_is_paced_at_its_frame_rate(clip: Path) -> None:
    worker, slot, _ = run(parse_source(str(clip)), realtime=True)
    t0 = time.monotonic()
    frames = drain(slot, worker, until=20)
    took = time.monotonic() - t0
    assert len(frames) == 20
    assert took >= 0.9 * 19 / 30, f"20 frames at 30 fps arrived in {took:.3f} s"
    assert worker.wait_state({S.STOPPED}, 2) is S.STOPPED


def test_a_looped_file_keeps_its_pace_across_the_loop(tmp_path: Path) -> None:
    """The first frame of the next pass is due one frame interval after the last one of the
    previous pass, not at once; a one-picture file loops at its rate instead of spinning."""
    short = make_test_video(tmp_path / "short.mp4", frames=4, fps=20)
    worker, slot, _ = run(parse_source(f"{short}?loop=1"), realtime=True)
    frames = drain(slot, worker, until=13, timeout=5)
    assert worker.stop(2)
    assert [f.index for f in frames if f.discontinuity] == [0, 4, 8, 12]
    gaps = [b.captured_at - a.captured_at for a, b in zip(frames, frames[1:], strict=False)]
    across = [gaps[i - 1] for i in (4, 8, 12)]
    assert min(across) >= 0.8 * 0.05, f"frame gaps across loops: {across}"

    still = tmp_path / "still.png"
    cv2.imwrite(str(still), np.zeros((16, 16, 3), np.uint8))
    worker, slot, _ = run(parse_source(f"{still}?loop=1"), realtime=True)
    n = len(drain(slot, worker, until=1000, timeout=1.0))
    assert worker.stop(2)
    assert 10 <= n <= 40, f"a looped picture delivered {n} frames in 1 s (25 fps expected)"


def test_realtime_option_paces_a_network_source() -> None:
    """``realtime=1`` paces any source by its timestamps (an HTTP recording would otherwise
    arrive as fast as it downloads); without it a network source is passed on as it comes."""
    for realtime, slow in ((True, True), (None, False)):
        factory, _ = script(Scripted("ok", 10))
        worker, slot, _ = run(fake_spec(factory, realtime=realtime), realtime=True)
        t0 = time.monotonic()
        frames = drain(slot, worker, until=10)
        took = time.monotonic() - t0
        worker.stop(2)
        assert len(frames) == 10
        assert (took >= 0.9 * 9 / 30) == slow, f"realtime={realtime}: 10 frames at 30 fps in {took:.3f} s"


def test_target_fps_thins_a_file(clip: Path) -> None:
    worker, slot, _ = run(parse_source(f"{clip}?fps=10"), realtime=False)
    frames = drain(slot, worker, until=100)
    assert [f.pts for f in frames] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert [f.index for f in frames] == list(range(7))


def test_max_pixels_fails_with_a_clear_message(clip: Path) -> None:
    worker, _, _ = run(parse_source(str(clip)), realtime=False, max_pixels=160 * 119)
    assert worker.wait_state({S.FAILED}, 3) is S.FAILED
    assert "160x120" in (worker.status().error or "")


# ---- live lifecycle ------------------------------------------------------------------------


def test_reconnects_continue_numbering_and_flag_discontinuities() -> None:
    factory, made = script(
        Scripted("ok", 5), Scripted("fail"), Scripted("fail"), Scripted("live", 5, interval=0.005)
    )
    worker, slot, seen = run(fake_spec(factory))
    frames = drain(slot, worker, until=15)
    assert worker.stop(2)
    assert [f.index for f in frames] == list(range(15))
    assert [f.index for f in frames if f.discontinuity] == [0, 5]
    states = [s.state for s in seen]
    assert states[:3] == [S.STREAMING, S.RECONNECTING, S.RECONNECTING] and S.STREAMING in states[3:]
    assert seen[1].error == "the stream ended (the server closed the connection)"
    assert seen[2].error == "cannot open: connection refused"
    st = worker.status()
    assert st.reconnects == 3 and st.state is S.STOPPED and st.error is None
    assert all(s.closed for s in made), "every decoder is closed"


def test_a_connection_that_delivered_pictures_resets_the_attempt_count() -> None:
    """A camera that works for a while and then drops the connection with an error (a read
    timeout, a broken frame) is not 'failing to reconnect': max_attempts counts only
    connections in a row that deliver nothing."""
    strict = ReconnectConfig(initial_backoff_s=0.01, max_backoff_s=0.02, jitter=0.0, max_attempts=2)
    sessions = [Scripted("timeout", 3) for _ in range(5)] + [Scripted("live", 3, interval=0.005)]
    factory, made = script(*sessions)
    worker, slot, _ = run(fake_spec(factory), reconnect=strict)
    frames = drain(slot, worker, until=20)
    st = worker.status()
    assert worker.stop(2)
    assert len(frames) == 20 and st.state is not S.FAILED, st.error
    assert len(made) >= 6  # five connections ended in an error, each after delivering pictures


def test_a_picture_of_another_size_on_the_same_connection_is_a_discontinuity() -> None:
    class Resizing(Scripted):
        def frames(self):
            for i in range(6):
                yield RawFrame(image=np.zeros((6, 8, 3) if i < 3 else (12, 16, 3), np.uint8), pts=i / 30)

    factory, _ = script(Resizing("ok", 0))
    worker, slot, _ = run(fake_spec(factory))
    frames = drain(slot, worker, until=6)
    assert worker.stop(2)
    assert [f.index for f in frames if f.discontinuity] == [0, 3]


def test_a_camera_slower_than_the_rate_window_reports_its_frame_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.stream as stream_mod

    # The window is scaled down so the test is quick: 2.5 fps against a 0.3 s window is a
    # 0.4 fps camera against the real 2 s one, which used to read 0 fps.
    monkeypatch.setattr(stream_mod, "_FPS_WINDOW_S", 0.3)
    factory, _ = script(Scripted("live", 0, interval=0.4))
    worker, _, _ = run(fake_spec(factory), slot=FrameSlot())
    assert worker.wait_frames(4, 5)
    fps = worker.status().fps
    assert worker.stop(1)
    assert 1.5 < fps < 3.0, fps


def test_live_source_without_pictures_is_a_stall_and_gets_restarted() -> None:
    factory, _ = script(Scripted("stall", 3), Scripted("live", 0))
    worker, slot, seen = run(fake_spec(factory))
    frames = drain(slot, worker, until=8)
    assert worker.stop(2)
    states = [s.state for s in seen]
    i = states.index(S.STALLED)
    assert states[i : i + 3] == [S.STALLED, S.RECONNECTING, S.STREAMING]
    assert "stalled: no picture for 0.3 s" in (seen[i].error or "")
    assert [f.index for f in frames] == list(range(8))


def test_read_timeout_while_streaming_reports_stalled() -> None:
    factory, _ = script(Scripted("timeout", 2), Scripted("live", 0))
    worker, _, seen = run(fake_spec(factory), slot=FrameSlot())
    assert worker.wait_frames(5, 3)
    assert worker.stop(2)
    assert [s.state for s in seen][:4] == [S.STREAMING, S.STALLED, S.RECONNECTING, S.STREAMING]


def test_permanent_error_fails_without_retry() -> None:
    factory, made = script(Scripted("fatal"))
    worker, _, seen = run(fake_spec(factory))
    assert worker.wait_state({S.FAILED}, 2) is S.FAILED
    assert worker.status().error == "cannot open: invalid data" and len(made) == 1
    assert [s.state for s in seen] == [S.FAILED]
    assert worker.stop(1)


def test_max_attempts_gives_up() -> None:
    factory, made = script(Scripted("fail"))
    cfg = FAST.model_copy(update={"max_attempts": 4})
    worker, _, _ = run(fake_spec(factory), reconnect=cfg)
    assert worker.wait_state({S.FAILED}, 3) is S.FAILED
    assert len(made) == 5 and "gave up after 4 reconnect attempts" in (worker.status().error or "")


def test_stop_interrupts_the_backoff_wait() -> None:
    factory, _ = script(Scripted("fail"))
    slow = ReconnectConfig(initial_backoff_s=30, max_backoff_s=30, jitter=0)
    worker, _, _ = run(fake_spec(factory), reconnect=slow)
    assert worker.wait_state({S.RECONNECTING}, 2) is S.RECONNECTING
    t0 = time.monotonic()
    assert worker.stop(2)
    assert time.monotonic() - t0 < 0.5
    assert worker.status().state is S.STOPPED


def test_stop_is_bounded_when_the_source_will_not_let_go() -> None:
    factory, _ = script(Scripted("hang", 1, ignore_interrupt=True))
    worker, _, _ = run(fake_spec(factory))
    assert worker.wait_frames(1, 2)
    t0 = time.monotonic()
    assert worker.stop(timeout=0.1) is False
    assert time.monotonic() - t0 < 0.5
    assert worker.status().state is S.STOPPED  # the API shows it stopped even before the thread ends
    assert worker.wait_state({S.STOPPED}, 0.1) is S.STOPPED
    deadline = time.monotonic() + 3
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.alive, "the thread ends once the blocked read returns"


def test_a_read_blocked_past_the_stall_timeout_shows_as_stalled_before_it_returns() -> None:
    """A camera frozen inside a read: the watchdog's check marks the stream ``stalled`` at
    ``stall_timeout_s`` (0.3 s here), long before the read gives up (1 s here)."""
    factory, _ = script(Scripted("hang", 3, ignore_interrupt=True), Scripted("live", 0))
    worker, slot, seen = run(fake_spec(factory), slot=FrameSlot(capacity=8))
    assert worker.wait_frames(3, 2)
    t0 = time.monotonic()
    while worker.status().state is S.STREAMING and time.monotonic() - t0 < 0.9:
        worker.check_stall()
        time.sleep(0.02)
    took = time.monotonic() - t0
    st = worker.status()
    assert st.state is S.STALLED and "no picture for 0.3 s" in (st.error or ""), st
    assert took < 0.8, f"marked stalled after {took:.2f} s"
    # the read ends, the source reconnects and pictures come again: streaming
    assert worker.wait_state({S.STREAMING}, 5) is S.STREAMING
    assert [x.state for x in seen].count(S.STALLED) >= 1
    assert not worker.check_stall()  # pictures flow: nothing to mark
    assert worker.stop(2)


def test_stop_racing_start_never_fails() -> None:
    """A stop that lands while the stream is being started (the REST API removing a stream
    that is being added) neither raises nor leaves a thread running."""
    factory, _ = script(Scripted("live", 0))
    for _ in range(50):
        worker = StreamWorker("t", fake_spec(factory), FrameSlot(capacity=1), reconnect=FAST)
        starter = threading.Thread(target=worker.start)
        starter.start()
        assert worker.stop(timeout=2.0)
        starter.join(2)
        assert not worker.alive
        assert worker.status().state is S.STOPPED
    stopped_first = StreamWorker("t", fake_spec(factory), FrameSlot(capacity=1), reconnect=FAST)
    stopped_first.request_stop()
    stopped_first.start()  # after a stop: nothing starts
    assert not stopped_first.alive and stopped_first.status().state is S.STOPPED


def test_fps_reads_zero_once_the_stream_ended() -> None:
    factory, _ = script(Scripted("live", 0, interval=0.01))
    worker, slot, _ = run(fake_spec(factory), slot=FrameSlot(capacity=1))
    assert worker.wait_frames(20, 3)
    assert worker.status().fps > 0
    assert worker.stop(2)
    assert worker.status().fps == 0.0


def test_a_broken_status_callback_does_not_kill_the_stream() -> None:
    factory, _ = script(Scripted("live", 0))

    def boom(_: StreamStatus) -> None:
        raise RuntimeError("observer bug")

    worker = StreamWorker("t", fake_spec(factory), FrameSlot(), reconnect=FAST, on_status=boom)
    worker.start()
    assert worker.wait_frames(10, 2)
    assert worker.status().state is S.STREAMING
    assert worker.stop(1)


def test_status_reports_fps_and_times() -> None:
    factory, _ = script(Scripted("live", 0, interval=0.01))
    worker, _, _ = run(fake_spec(factory), slot=FrameSlot())
    assert worker.wait_frames(30, 3)
    st = worker.status()
    assert 30 < st.fps < 110  # ~100 fps minus scheduling
    assert st.last_frame_at is not None and st.started_at <= st.state_since <= st.last_frame_at
    assert worker.stop(1)


# ---- bounded latency -----------------------------------------------------------------------


def test_frame_age_stays_bounded_with_a_slow_consumer() -> None:
    """A ~300 fps source feeding a 40 fps consumer: the newest frame wins, age does not grow."""
    factory, _ = script(Scripted("live", 0, interval=0.003))
    slot = FrameSlot(capacity=1, policy=DropPolicy.LATEST)
    worker, _, _ = run(fake_spec(factory), slot=slot)
    ages: list[float] = []
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        f = slot.take()
        if f is not None:
            ages.append(now() - f.captured_at)
            time.sleep(0.025)  # the slow consumer's work
        else:
            time.sleep(0.001)
    assert worker.stop(1)
    assert len(ages) >= 30
    early, late = statistics.median(ages[:10]), statistics.median(ages[-10:])
    assert late < 0.05 and late < early + 0.02, f"frame age grew from {early:.4f} to {late:.4f} s"
    assert slot.drops.snapshot().get(DropCause.SOURCE_OVERRUN.value, 0) > len(ages)


# ---- backoff -------------------------------------------------------------------------------


def test_backoff_doubles_is_capped_and_jittered() -> None:
    cfg = ReconnectConfig(initial_backoff_s=0.5, max_backoff_s=4, jitter=0)
    assert [backoff_delay(a, cfg) for a in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff_delay(10_000, cfg) == 4
    jittery = ReconnectConfig(initial_backoff_s=1, max_backoff_s=100, jitter=0.2)
    rng = random.Random(0)
    samples = [backoff_delay(3, jittery, rng) for _ in range(200)]
    assert min(samples) >= 3.2 and max(samples) <= 4.8 and len(set(samples)) > 100
    with pytest.raises(ValueError, match="attempt must be >= 1, got 0"):
        backoff_delay(0, cfg)


class Refused(Scripted):
    def open(self) -> SourceInfo:
        raise SourceAuthError("cannot open: authentication failed (401 Unauthorized): wrong password?")


def test_refused_credentials_are_retried_slowly_and_other_errors_as_usual() -> None:
    """Cameras lock an account after a few failed logins: a refused login waits
    ``auth_backoff_s`` (doubling), where a refused connection is retried at once."""
    cfg = ReconnectConfig(initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0,
                          auth_backoff_s=0.6, auth_max_backoff_s=5.0)
    factory, made = script(Refused("fail"))
    worker, _, seen = run(fake_spec(factory), reconnect=cfg)
    time.sleep(1.2)  # attempts at 0 and 0.6 s; the next waits 1.2 s more (1.8 s)
    refused_attempts = len(made)
    assert worker.stop(2)
    assert refused_attempts == 2, refused_attempts
    assert any(s.state is S.RECONNECTING and "authentication failed" in (s.error or "") for s in seen)

    factory, made = script(Scripted("fail"))
    worker, _, _ = run(fake_spec(factory), reconnect=cfg)
    time.sleep(1.2)
    assert worker.stop(2)
    assert len(made) > 6  # a refused connection: 0.01, 0.02, 0.04, then every 0.05 s


def test_auth_backoff_doubles_from_its_own_start_and_is_capped() -> None:
    cfg = ReconnectConfig(jitter=0.0)
    assert [auth_backoff_delay(n, cfg) for n in (1, 2, 3, 4, 5, 6)] == [60, 120, 240, 480, 900, 900]


class Polled(Scripted):
    """A snapshot URL polled slowly: one picture every ``interval`` s, without timestamps."""

    def frames(self) -> Iterator[RawFrame | None]:
        img = np.zeros((6, 8, 3), np.uint8)
        while not self.stop.wait(self.interval):
            yield RawFrame(image=img, pts=None)


@pytest.mark.parametrize(("target_fps", "stalls"), [(None, True), (1.5, False)])
def test_a_source_slowed_by_target_fps_is_not_stalled_between_its_pictures(target_fps, stalls) -> None:
    """``target_fps`` asks for a picture every 1/target_fps s: waiting that long is no stall
    (a snapshot URL polled every 0.7 s here, with stall_timeout_s 0.3)."""
    opts = {"target_fps": target_fps} if target_fps else {}
    factory, _ = script(Polled("ok", interval=0.7))
    worker, _, seen = run(fake_spec(factory, **opts))
    marked = False
    try:
        assert worker.wait_frames(1, 3)
        deadline = time.monotonic() + 2.2
        while time.monotonic() < deadline:
            marked = worker.check_stall() or marked  # the manager's watchdog, twice a second
            time.sleep(0.05)
        assert worker.wait_frames(3, 3)
    finally:
        assert worker.stop(2)
    assert marked is stalls
    assert any(s.state is S.STALLED for s in seen) is stalls


class Segmented(Source):
    """One HLS-like session: pictures with the given timestamps, then the server closes."""

    def __init__(self, pts: list[float]) -> None:
        self.uri = "fake://x"
        self.pts = pts

    def open(self) -> SourceInfo:
        return SourceInfo(width=8, height=6, fps=30.0, segmented=True)

    def frames(self) -> Iterator[RawFrame | None]:
        img = np.zeros((6, 8, 3), np.uint8)
        for p in self.pts:
            yield RawFrame(image=img, pts=p)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("second", "delivered"),
    [
        # reopened a few segments before the end: the repeated pictures are skipped
        ([3.0, 4.0, 5.0, 6.0, 7.0], [6.0, 7.0]),
        # the encoder behind the playlist restarted: a new timeline, all of it is new
        ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]),
    ],
)
def test_a_reopened_playlist_does_not_show_its_pictures_again(second, delivered) -> None:
    first = [1.0, 2.0, 3.0, 4.0, 5.0]
    if second[0] == 0.0:
        first = [500.0 + p for p in first]
    factory, _ = script(Segmented(first), Segmented(second), Scripted("stall"))
    worker, slot, _ = run(fake_spec(factory, realtime=False))
    frames = drain(slot, worker, until=len(first) + len(delivered), timeout=3)
    assert worker.stop(2)
    assert [f.pts for f in frames] == first + delivered
    assert [f.index for f in frames if f.discontinuity] == [0, len(first)]


def test_timestamps_going_back_within_a_playlist_are_kept() -> None:
    """A discontinuity inside the playlist (timestamps start again) is the source's own."""
    factory, _ = script(Segmented([1.0, 2.0, 3.0, 1.5, 2.5]), Scripted("stall"))
    worker, slot, _ = run(fake_spec(factory, realtime=False))
    frames = drain(slot, worker, until=5, timeout=3)
    assert worker.stop(2)
    assert [f.pts for f in frames] == [1.0, 2.0, 3.0, 1.5, 2.5]
