"""A real RTSP server (GStreamer, loopback): stream, lose it, get it back."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from pipeline.config import ReconnectConfig
from pipeline.slot import DropPolicy, FrameSlot
from pipeline.sources import parse_source
from pipeline.stream import StreamWorker
from pipeline.types import Frame, StreamState
from tests.integration.fakes_net import RtspServer, free_port, gi_available

pytestmark = [pytest.mark.integration, pytest.mark.rtsp]

_SKIP = gi_available()
needs_gst = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

FAST = ReconnectConfig(initial_backoff_s=0.1, max_backoff_s=0.5, jitter=0.1, stall_timeout_s=3.0)
S = StreamState


class Collector:
    """A consumer thread that drains a slot into a list (what the engine would do)."""

    def __init__(self, slot: FrameSlot) -> None:
        self.slot, self.frames = slot, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            f = self.slot.take()
            if f is None:
                time.sleep(0.002)
            else:
                self.frames.append(f)

    def stop(self) -> list[Frame]:
        self._stop.set()
        self._t.join(2)
        return self.frames


@needs_gst
def test_rtsp_survives_server_restart() -> None:
    server = RtspServer()
    server.start()
    slot = FrameSlot(capacity=1, policy=DropPolicy.LATEST)
    spec = parse_source(server.url + "?open_timeout=3&read_timeout=2")
    seen: list[StreamState] = []
    worker = StreamWorker("cam", spec, slot, reconnect=FAST, on_status=lambda s: seen.append(s.state))
    collector = Collector(slot)
    try:
        worker.start()
        assert worker.wait_state({S.STREAMING}, timeout=15) is S.STREAMING
        assert worker.wait_frames(worker.status().frames + 10, timeout=10)
        before = worker.status()
        assert before.width == 320 and before.height == 240

        server.kill()
        assert worker.wait_state({S.RECONNECTING}, timeout=10) is S.RECONNECTING
        err = worker.status().error
        assert err, "a reconnecting stream says why"
        assert "rtsp://" not in err  # messages never echo the URL (it may hold a password)

        server.start()
        t0 = time.monotonic()
        assert worker.wait_state({S.STREAMING}, timeout=15) is S.STREAMING
        took = time.monotonic() - t0
        n = worker.status().frames
        assert worker.wait_frames(n + 10, timeout=10)
        after = worker.status()
        assert after.reconnects >= 1
        assert after.error is None
        assert took < 15
    finally:
        assert worker.stop(timeout=5.0)
        frames = collector.stop()
        server.kill()

    idx = [f.index for f in frames]
    assert idx == sorted(idx) and len(set(idx)) == len(idx), "indexes strictly increase across the reconnect"
    disc = [f for f in frames if f.discontinuity]
    # The first frame of each connection is marked; the consumer may miss one under ``latest``,
    # but the count of marked frames can never exceed the number of connections.
    assert 1 <= len(disc) <= 1 + after.reconnects
    assert all(f.captured_at > 0 for f in frames)
    # Only the first picture of a connection may come without a timestamp (decoded from the
    # packets the probe read, before the stream's clock is known).
    assert all(f.discontinuity for f in frames if f.pts is None)
    assert sum(f.pts is not None for f in frames) >= len(frames) - 1 - after.reconnects
    assert S.RECONNECTING in seen and seen[-1] is S.STOPPED
    assert not any(t.name == "source-cam" for t in threading.enumerate()), "no leaked thread"


@needs_gst
def test_rtsp_wrong_path_reports_404() -> None:
    with RtspServer() as server:
        spec = parse_source(f"rtsp://127.0.0.1:{server.port}/nope?open_timeout=3")
        worker = StreamWorker("bad", spec, FrameSlot(), reconnect=FAST)
        worker.start()
        try:
            assert worker.wait_state({S.RECONNECTING, S.FAILED}, timeout=10) is not None
            st = worker.status()
            assert "404" in (st.error or ""), st.error
        finally:
            assert worker.stop(timeout=5.0)


def test_rtsp_refused_port_retries_with_clear_error() -> None:
    port = free_port()  # nothing listens there
    spec = parse_source(f"rtsp://user:secret@127.0.0.1:{port}/x")
    worker = StreamWorker(
        "refused", spec, FrameSlot(), reconnect=ReconnectConfig(initial_backoff_s=0.05, max_attempts=3)
    )
    worker.start()
    try:
        assert worker.wait_state({S.FAILED}, timeout=10) is S.FAILED
        st = worker.status()
        assert "connection refused" in (st.error or "") and "gave up after 3" in (st.error or "")
        assert "secret" not in st.source and st.source == f"rtsp://user:***@127.0.0.1:{port}/x"
        assert st.reconnects == 3
    finally:
        assert worker.stop(timeout=2.0)


@needs_gst
def test_rtsp_frozen_server_is_a_stall_and_stop_is_bounded() -> None:
    """SIGSTOP freezes the server with its sockets open: reads block, nothing closes."""
    with RtspServer() as server:
        assert server.proc is not None
        slot = FrameSlot(capacity=1)
        spec = parse_source(server.url + "?open_timeout=2&read_timeout=1")
        seen: list[StreamState] = []
        worker = StreamWorker("frozen", spec, slot, reconnect=FAST, on_status=lambda s: seen.append(s.state))
        worker.start()
        try:
            assert worker.wait_state({S.STREAMING}, timeout=15) is S.STREAMING
            server.proc.send_signal(signal.SIGSTOP)
            assert worker.wait_state({S.RECONNECTING}, timeout=8) is S.RECONNECTING
            assert S.STALLED in seen, seen
            assert "no data" in (worker.status().error or "") or "timed out" in (worker.status().error or "")
            server.proc.send_signal(signal.SIGCONT)
            assert worker.wait_state({S.STREAMING}, timeout=15) is S.STREAMING

            # Freeze again and stop while the read is blocked inside FFmpeg.
            n = worker.status().frames
            assert worker.wait_frames(n + 3, timeout=5)
            server.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # let the decoder run dry so the read is really blocked
            t0 = time.monotonic()
            stopped = worker.stop(timeout=5.0)
            took = time.monotonic() - t0
            assert stopped, "the blocked read ends by its timeout"
            assert took < 1.0 + 2.5, f"stop took {took:.2f} s with read_timeout=1"
        finally:
            server.proc.send_signal(signal.SIGCONT)
            worker.stop(timeout=5.0)
    assert worker.status().state is S.STOPPED


@needs_gst
def test_rtsp_first_picture_comes_from_the_first_keyframe() -> None:
    """A camera with five seconds between keyframes: the first picture arrives at once, not
    at the second keyframe (the probe's packets, which hold the first one, are kept)."""
    with RtspServer(gop=150) as server:
        slot = FrameSlot(capacity=1)
        worker = StreamWorker("gop", parse_source(server.url), slot, reconnect=FAST)
        t0 = time.monotonic()
        worker.start()
        try:
            assert worker.wait_frames(1, timeout=15)
            took = time.monotonic() - t0
            assert took < 2.5, f"first picture after {took:.2f} s with a keyframe every 5 s"
        finally:
            assert worker.stop(timeout=5.0)


@needs_gst
def test_a_frozen_rtsp_camera_shows_as_stalled_at_the_stall_timeout() -> None:
    """The manager's watchdog marks a camera frozen inside FFmpeg's read ``stalled`` at
    ``stall_timeout_s`` (1 s), not only when the read times out (here up to 2 x 4 s)."""
    from pipeline.config import AppConfig, EngineConfig, StreamConfig
    from pipeline.manager import StreamManager

    cfg = AppConfig(
        default_model="null",
        engine=EngineConfig(device="cpu", threads=1),
        reconnect=ReconnectConfig(stall_timeout_s=1.0, initial_backoff_s=0.1, jitter=0.0),
    )
    with RtspServer() as server:
        assert server.proc is not None
        manager = StreamManager(cfg)
        manager.start()
        try:
            handle = manager.add(StreamConfig(id="cam", source=server.url + "?read_timeout=4"))
            assert handle.worker.wait_state({S.STREAMING}, timeout=15) is S.STREAMING
            server.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            state = handle.worker.wait_state({S.STALLED, S.RECONNECTING}, timeout=10)
            took = time.monotonic() - t0
            assert state is S.STALLED, (state, handle.worker.status().error)
            assert took < 1.0 + 1.5, f"stalled after {took:.1f} s"
        finally:
            server.proc.send_signal(signal.SIGCONT)
            assert manager.shutdown()


@needs_gst
def test_an_interlaced_rtsp_camera_is_deinterlaced_live() -> None:
    """Pictures flagged interlaced go through the deinterlacer (one picture behind) and keep
    coming at the camera's rate (15 pictures/s: two fields of its 30 fps make one) with their
    own timestamps."""
    import av

    with RtspServer(interlaced=True) as server:
        with av.open(server.url, options={"rtsp_transport": "tcp"}, timeout=5) as probe:
            assert next(probe.decode(video=0)).interlaced_frame  # the camera's pictures are flagged
        src = parse_source(server.url).create()
        src.open()
        try:
            t0, got = time.monotonic(), []
            for f in src.frames():
                if f is not None:
                    got.append(f)
                if len(got) == 30 or time.monotonic() - t0 > 10:
                    break
            took = time.monotonic() - t0
            assert src._deinterlacer is not None and src._deinterlacer._graph is not None  # engaged
        finally:
            src.close()
    assert len(got) == 30, f"{len(got)} pictures in {took:.1f} s"
    assert took < 3.5  # 30 pictures at 15 per second, not slowed down
    pts = [f.pts for f in got[1:]]  # (an RTSP stream's first picture has no timestamp yet)
    assert all(abs((b - a) - 1 / 15) < 0.005 for a, b in zip(pts, pts[1:], strict=False)), pts
    assert got[0].image.shape == (240, 320, 3)
