"""Broken sources end in the right state with a clear message, while a healthy stream keeps flowing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.config import ReconnectConfig
from pipeline.slot import DropPolicy, FrameSlot
from pipeline.sources import SourceError, parse_source
from pipeline.stream import StreamWorker
from pipeline.types import StreamState
from tests.helpers_video import make_test_video
from tests.integration.fakes_net import (
    FileHttpServer,
    GarbageServer,
    HttpCamera,
    MjpegServer,
    SilentServer,
    free_port,
    jpeg_picture,
)

pytestmark = pytest.mark.integration

S = StreamState
FAST = ReconnectConfig(initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.1, stall_timeout_s=2.0)


@pytest.fixture
def healthy(tmp_path: Path):
    """A looping file served live; every fault test checks it never stops flowing."""
    clip = make_test_video(tmp_path / "ok.mp4", frames=30)
    worker = StreamWorker("healthy", parse_source(f"{clip}?loop=1"), FrameSlot(), reconnect=FAST)
    worker.start()
    assert worker.wait_state({S.STREAMING}, timeout=5) is S.STREAMING
    start = worker.status().frames
    yield worker
    # 30 fps for the length of the test: it must have kept going the whole time.
    assert worker.wait_frames(start + 10, timeout=3)
    st = worker.status()
    assert st.state is S.STREAMING and st.error is None and st.reconnects == 0
    assert worker.stop(timeout=3)


def _run_until(spec_uri: str, states: set[StreamState], timeout: float, **kw) -> StreamWorker:
    worker = StreamWorker("faulty", parse_source(spec_uri), FrameSlot(), reconnect=FAST, **kw)
    worker.start()
    got = worker.wait_state(states, timeout=timeout)
    assert got is not None, f"still {worker.status().state} ({worker.status().error}) after {timeout} s"
    return worker


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_silent_peer_times_out_and_retries(healthy: StreamWorker, scheme: str) -> None:
    with SilentServer() as server:
        t0 = time.monotonic()
        uri = f"{scheme}://127.0.0.1:{server.port}/cam?open_timeout=1&read_timeout=1"
        worker = _run_until(uri, {S.RECONNECTING}, timeout=8)
        took = time.monotonic() - t0
        err = worker.status().error or ""
        # (FFmpeg's RTSP client ends a silent server's open as "invalid data": the message
        # still says what happened)
        assert "timed out" in err and "invalid data" not in err, err
        assert took < 5, f"a silent peer must not hold the open for {took:.1f} s"
        t0 = time.monotonic()
        assert worker.stop(timeout=3)
        assert time.monotonic() - t0 < 2.5
    assert server.connections >= 1


@pytest.mark.parametrize(
    ("query", "limit", "which"),
    [
        ("open_timeout=1&read_timeout=10", "within 1 s", "open"),  # PyAV's open timeout runs out
        ("open_timeout=10&read_timeout=1", "for 1 s", "socket"),  # the socket timeout, while opening
    ],
)
def test_silent_peer_open_timeout_names_the_limit_that_ran_out(query: str, limit: str, which: str) -> None:
    with SilentServer() as server:
        src = parse_source(f"http://127.0.0.1:{server.port}/cam?{query}").create()
        t0 = time.monotonic()
        with pytest.raises(SourceError) as exc:
            src.open()
        took = time.monotonic() - t0
        src.close()
    err = str(exc.value)
    assert took < 5, f"{which} timeout: the open took {took:.1f} s"
    assert err.startswith("cannot open: timed out connecting:"), err
    assert limit in err and "10 s" not in err, err
    assert exc.value.retryable


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_garbage_bytes_are_invalid_data(healthy: StreamWorker, scheme: str) -> None:
    with GarbageServer() as server:
        worker = _run_until(f"{scheme}://127.0.0.1:{server.port}/cam?open_timeout=2", {S.RECONNECTING}, 8)
        err = worker.status().error or ""
        assert err.startswith("cannot open:"), err
        assert "invalid data" in err or "protocol error" in err, err
        assert worker.stop(timeout=3)


def test_refused_http_port(healthy: StreamWorker) -> None:
    worker = _run_until(f"http://127.0.0.1:{free_port()}/video.mjpg", {S.RECONNECTING}, 5)
    assert "connection refused" in (worker.status().error or "")
    assert worker.stop(timeout=3)


def test_mjpeg_over_http_streams(healthy: StreamWorker) -> None:
    with MjpegServer(fps=30) as server:
        slot = FrameSlot()
        uri = f"http://127.0.0.1:{server.port}/video.mjpg?action=stream&format=mpjpeg"
        spec = parse_source(uri)
        assert spec.target.endswith("/video.mjpg?action=stream"), "camera's own query survives"
        worker = StreamWorker("mjpeg", spec, slot, reconnect=FAST)
        worker.start()
        try:
            assert worker.wait_state({S.STREAMING}, timeout=8) is S.STREAMING
            assert worker.wait_frames(10, timeout=5)
            st = worker.status()
            assert (st.width, st.height) == (160, 120)
            frame = slot.take()
            assert frame is not None and frame.image.shape == (120, 160, 3)
        finally:
            assert worker.stop(timeout=3)


def test_mjpeg_server_going_away_reconnects(healthy: StreamWorker) -> None:
    server = MjpegServer(fps=30)
    worker = StreamWorker(
        "mjpeg", parse_source(f"http://127.0.0.1:{server.port}/v?format=mpjpeg"), FrameSlot(), reconnect=FAST
    )
    worker.start()
    try:
        assert worker.wait_state({S.STREAMING}, timeout=8) is S.STREAMING
        server.close()
        assert worker.wait_state({S.RECONNECTING}, timeout=8) is S.RECONNECTING
    finally:
        assert worker.stop(timeout=3)


def test_progressive_mp4_over_http_streams_then_reconnects_when_it_ends(
    healthy: StreamWorker, tmp_path: Path
) -> None:
    make_test_video(tmp_path / "clip.mp4", frames=15)
    with FileHttpServer(tmp_path) as server:
        seen: list[StreamState] = []
        spec = parse_source(f"http://127.0.0.1:{server.port}/clip.mp4")
        worker = StreamWorker(
            "http-mp4", spec, FrameSlot(), reconnect=FAST, on_status=lambda s: seen.append(s.state)
        )
        worker.start()
        try:
            assert worker.wait_frames(15, timeout=5)
            # A network source that ends is a lost peer, not the end: it is opened again.
            assert worker.wait_state({S.RECONNECTING}, timeout=5) is S.RECONNECTING
            assert worker.wait_frames(30, timeout=5)
        finally:
            assert worker.stop(timeout=3)
        assert seen[:2] == [S.STREAMING, S.RECONNECTING]


def test_truncated_mp4_fails(healthy: StreamWorker, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "full.mp4", frames=30)
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # moov is at the end: the header is gone
    worker = _run_until(str(cut), {S.FAILED, S.STOPPED}, 5, realtime=False)
    st = worker.status()
    assert st.state is S.FAILED and "invalid data" in (st.error or ""), st.error
    assert st.reconnects == 0, "a broken local file is not retried"


def test_garbage_file_fails(healthy: StreamWorker, tmp_path: Path) -> None:
    bad = tmp_path / "noise.mp4"
    bad.write_bytes(bytes(range(256)) * 64)
    worker = _run_until(str(bad), {S.FAILED, S.STOPPED}, 5, realtime=False)
    assert worker.status().state is S.FAILED
    assert "invalid data" in (worker.status().error or "")


def test_file_removed_after_validation_fails(healthy: StreamWorker, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "gone.mp4", frames=5)
    spec = parse_source(str(clip))
    clip.unlink()
    worker = StreamWorker("gone", spec, FrameSlot(), reconnect=FAST)
    worker.start()
    assert worker.wait_state({S.FAILED}, timeout=5) is S.FAILED
    assert "file not found" in (worker.status().error or "")


def test_missing_webcam(healthy: StreamWorker) -> None:
    worker = _run_until("/dev/video9", {S.RECONNECTING, S.FAILED}, 5)
    assert "/dev/video9 not found" in (worker.status().error or "")
    assert worker.stop(timeout=3)


def test_no_source_thread_outlives_its_test(healthy: StreamWorker) -> None:
    names = {t.name for t in threading.enumerate() if t.name.startswith("source-")}
    assert names == {"source-healthy"}, names


def _hls_recording(directory: Path, seconds: int = 4, fps: int = 10) -> Path:
    """An HLS VOD of one-second segments, as FFmpeg's muxer writes it."""
    import av
    import numpy as np

    with av.open(str(directory / "index.m3u8"), "w", format="hls",
                 options={"hls_time": "1", "hls_playlist_type": "vod"}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(fps)}
        for i in range(seconds * fps):
            grey = np.full((48, 64, 3), (i * 6) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return directory / "index.m3u8"


def _frozen_live_playlist(directory: Path) -> Path:
    """``_hls_recording`` made a live playlist that never grows (the encoder behind it hung)."""
    playlist = _hls_recording(directory)
    lines = playlist.read_text().splitlines()
    dropped = ("#EXT-X-ENDLIST", "#EXT-X-PLAYLIST-TYPE:VOD")
    playlist.write_text("\n".join(ln for ln in lines if ln not in dropped) + "\n")
    return playlist


@contextmanager
def _hls_worker(directory: Path, query: str, capacity: int) -> Iterator[tuple[StreamWorker, FrameSlot]]:
    """A stream worker on ``directory``'s ``index.m3u8`` served over HTTP, into a blocking slot;
    stopped (within 3 s) on the way out."""
    with FileHttpServer(directory) as server:
        spec = parse_source(f"http://127.0.0.1:{server.port}/index.m3u8{query}")
        slot = FrameSlot(capacity=capacity, policy=DropPolicy.BLOCK)
        worker = StreamWorker("hls", spec, slot, reconnect=FAST)
        worker.start()
        try:
            yield worker, slot
        finally:
            assert worker.stop(timeout=3)


@pytest.mark.parametrize(("query", "paced"), [("", True), ("?realtime=0", False)])
def test_hls_served_live_comes_at_its_pace_not_a_segment_at_a_time(
    tmp_path: Path, query: str, paced: bool
) -> None:
    """HLS hands over a whole segment at once; served live, its pictures are paced by their
    timestamps (10 fps here), so the one-frame slot does not drop most of every segment."""
    _hls_recording(tmp_path)
    arrivals: list[float] = []
    with _hls_worker(tmp_path, query, capacity=1) as (_, slot):
        deadline = time.monotonic() + 8
        while len(arrivals) < 25 and time.monotonic() < deadline:
            if slot.take() is not None:
                arrivals.append(time.monotonic())
            else:
                time.sleep(0.002)
    assert len(arrivals) == 25
    span = arrivals[-1] - arrivals[0]  # 24 intervals: 2.4 s at 10 fps
    assert (span > 1.8) if paced else (span < 1.0), span


def test_a_frozen_live_hls_playlist_is_not_replayed_after_a_reconnect(tmp_path: Path) -> None:
    """A live playlist that stops growing (the encoder behind it hung) stalls; each reconnect
    starts again a few segments from its end. Those pictures were shown already: they must
    not come again as new frames with timestamps going backwards."""
    _frozen_live_playlist(tmp_path)
    pts: list[float] = []
    # FFmpeg waits for new segments inside one read: the read timeout ends that wait.
    with _hls_worker(tmp_path, "?realtime=0&read_timeout_s=1", capacity=64) as (worker, slot):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and worker.status().reconnects < 2:
            frame = slot.take()
            if frame is not None and frame.pts is not None:
                pts.append(frame.pts)
            else:
                time.sleep(0.01)
        while (frame := slot.take()) is not None:
            pts.append(frame.pts)
        reconnects = worker.status().reconnects
    assert reconnects >= 2, "the frozen playlist never stalled"
    assert pts, "no picture at all"
    assert all(b > a for a, b in zip(pts, pts[1:], strict=False)), f"pictures came again: {pts}"


def _frozen_mjpeg(cam: HttpCamera, conn, request) -> None:
    """Five pictures, then nothing more on an open connection: a camera that froze."""
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=f\r\n\r\n")
    for i in range(5):
        jpg = jpeg_picture(i)
        head = b"--f\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
        conn.sendall(head + jpg + b"\r\n")
    while cam.wait(0.1):
        pass


def _stop_time(worker: StreamWorker) -> tuple[bool, float]:
    t0 = time.monotonic()
    stopped = worker.stop(timeout=3)
    return stopped, time.monotonic() - t0


def test_stopping_a_frozen_camera_does_not_wait_for_its_read_timeout() -> None:
    """Removing a stream whose camera froze mid-stream (a read blocked in FFmpeg, here with a
    20 s read timeout) ends its thread at once, not when the read times out."""
    with HttpCamera(_frozen_mjpeg) as cam:
        slot = FrameSlot(capacity=16, policy=DropPolicy.BLOCK)
        spec = parse_source(cam.url("/video?read_timeout_s=20"))
        worker = StreamWorker("frozen", spec, slot, reconnect=FAST)
        worker.start()
        assert worker.wait_frames(4, timeout=10)
        time.sleep(0.5)  # the read is now blocked, waiting for a sixth picture
        stopped, took = _stop_time(worker)
    assert stopped and took < 1.5, f"stopping took {took:.1f} s"


def test_stopping_a_frozen_live_hls_playlist_does_not_wait_for_its_read_timeout(tmp_path: Path) -> None:
    """FFmpeg waits for new segments of a live playlist inside one read; a stop ends that wait."""
    _frozen_live_playlist(tmp_path)
    with _hls_worker(tmp_path, "?realtime=0&read_timeout_s=20", capacity=64) as (worker, slot):
        taken, last = 0, time.monotonic()
        while time.monotonic() - last < 1.0:  # until a second without a new picture
            if slot.take() is not None:
                taken, last = taken + 1, time.monotonic()
            else:
                time.sleep(0.01)
        assert taken >= 10 and worker.status().state is S.STREAMING
        # FFmpeg is now waiting, inside one read, for a segment that never comes
        stopped, took = _stop_time(worker)
    assert stopped and took < 1.5, f"stopping took {took:.1f} s"
