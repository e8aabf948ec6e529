"""RTSP streams shaped like real IP cameras (GStreamer server on loopback): HEVC, MJPEG,
audio tracks, authentication, UDP, low and high frame rates, a camera that comes back with
another picture size and codec."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipeline.slot import DropPolicy, FrameSlot
from pipeline.sources import RawFrame, SourceError, parse_source
from pipeline.stream import StreamWorker
from tests.integration.fakes_net import RtspServer
from tests.integration.test_sources_rtsp import FAST, Collector, S, needs_gst

pytestmark = [pytest.mark.integration, pytest.mark.rtsp]


def read(url: str, count: int, limit_s: float = 8.0) -> tuple[list[tuple[float, RawFrame]], float, float]:
    """``count`` pictures of ``url`` with their arrival times; also how long the open and the
    first picture took."""
    src = parse_source(url).create()
    t0 = time.monotonic()
    try:
        src.open()
        opened = time.monotonic() - t0
        got: list[tuple[float, RawFrame]] = []
        for f in src.frames():
            if f is not None:
                got.append((time.monotonic(), f))
            if len(got) >= count or time.monotonic() - t0 > limit_s:
                break
    finally:
        src.close()
    assert got, "no picture"
    return got, opened, got[0][0] - t0


def check_live(got: list[tuple[float, RawFrame]], fps: float, shape: tuple[int, int]) -> None:
    """Pictures of the right size, with increasing timestamps a frame apart, arriving at the
    camera's rate once the probe's pictures are out."""
    assert {f.image.shape for _, f in got} == {(*shape, 3)}
    pts = [f.pts for _, f in got[1:]]  # (an RTSP stream's first picture may have no timestamp yet)
    assert all(p is not None for p in pts), pts
    steps = [b - a for a, b in zip(pts, pts[1:], strict=False)]  # type: ignore[operator]
    assert all(abs(s - 1 / fps) < 0.25 / fps for s in steps), steps
    half = len(got) // 2
    rate = (len(got) - 1 - half) / (got[-1][0] - got[half][0])
    assert abs(rate - fps) < 0.2 * fps, f"{rate:.1f} pictures/s from a {fps} fps camera"


@needs_gst
@pytest.mark.parametrize(
    ("options", "shape"),
    [
        ({"codec": "h265"}, (240, 320)),
        ({"codec": "mjpeg", "width": 352, "height": 288}, (288, 352)),
        ({"codec": "h264", "audio": "aac", "audio_first": True}, (240, 320)),
        ({"codec": "h265", "audio": "opus"}, (240, 320)),
    ],
    ids=["hevc", "mjpeg", "aac-listed-first", "hevc-opus"],
)
def test_camera_codecs_and_audio_tracks(options: dict[str, object], shape: tuple[int, int]) -> None:
    with RtspServer(**options) as server:  # type: ignore[arg-type]
        got, _, first = read(server.url, 40)
    assert first < 3.0
    check_live(got, 30.0, shape)


@needs_gst
@pytest.mark.parametrize("fps", [5, 60])
def test_low_and_high_frame_rates(fps: int) -> None:
    """A 5 fps camera's first picture comes within a picture or so of connecting: the probe
    does not wait for 20 pictures to measure the rate (FFmpeg's ``analyzeduration=0`` is its
    5 s default, not none), and so does not hand them over in a burst either."""
    with RtspServer(fps=fps) as server:
        got, opened, first = read(server.url, 20 if fps == 5 else 90)
    assert first < 2.0, f"first picture after {first:.2f} s (open {opened:.2f} s) from a {fps} fps camera"
    check_live(got, float(fps), (240, 320))


@needs_gst
def test_udp_transport_on_loopback() -> None:
    with RtspServer(protocols="udp") as server:
        got, _, _ = read(server.url + "?rtsp_transport=udp", 40)
    check_live(got, 30.0, (240, 320))


@needs_gst
def test_a_camera_that_refuses_the_transport_says_so() -> None:
    with RtspServer(protocols="udp") as server:
        src = parse_source(server.url + "?open_timeout=3").create()
        try:
            with pytest.raises(SourceError) as err:
                src.open()
        finally:
            src.close()
    assert "does not stream over TCP" in str(err.value) and "rtsp_transport=udp" in str(err.value)


@needs_gst
@pytest.mark.parametrize("method", ["basic", "digest"])
def test_authentication(method: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cret-pw"
    with RtspServer(auth=method, user="admin", password=password) as server:
        base = f"127.0.0.1:{server.port}{server.path}"
        got, _, _ = read(f"rtsp://admin:{password}@{base}", 3)
        assert got[0][1].image.shape == (240, 320, 3)

        errors = {}
        for name, url in {
            "wrong": f"rtsp://admin:wrong-pw@{base}",
            "none": f"rtsp://{base}",
            "user only": f"rtsp://admin@{base}",
        }.items():
            src = parse_source(url + "?open_timeout=3").create()
            try:
                with pytest.raises(SourceError) as err:
                    src.open()
            finally:
                src.close()
            errors[name] = str(err.value)

        # Through a stream worker: the state, the error and the shown source keep the password out.
        spec = parse_source(f"rtsp://admin:wrong-pw@{base}?open_timeout=3")
        worker = StreamWorker("auth", spec, FrameSlot(), reconnect=FAST)
        worker.start()
        try:
            assert worker.wait_state({S.RECONNECTING}, timeout=10) is S.RECONNECTING
            st = worker.status()
        finally:
            assert worker.stop(timeout=5.0)
    assert "authentication failed" in errors["wrong"] and "401" in errors["wrong"], errors
    assert "authentication failed" in errors["user only"], errors
    assert "authentication required" in errors["none"] and "user:password@" in errors["none"], errors
    assert "authentication failed" in (st.error or "")
    assert st.source == f"rtsp://admin:***@{base}?open_timeout=3"
    shown = [*errors.values(), st.error or "", st.source, caplog.text]
    assert not any(password in s or "wrong-pw" in s for s in shown)


@needs_gst
@pytest.mark.parametrize("password", ["p#ss/w?rd@1", "1234/5"])
def test_a_password_typed_with_url_delimiters_connects_and_stays_hidden(password: str) -> None:
    """Camera passwords often hold ``#``, ``?``, ``/`` or ``@``. Typed as is, a URL parser takes
    ``#`` for the start of a fragment: the password was shown in the stream's source, and FFmpeg
    was asked to connect to the user name as a host. They are sent percent-encoded instead.
    (``admin:1234/5@`` also reads as host ``admin``, port 1234 and a path: an IP address after
    the ``@`` says it is a password.)"""
    with RtspServer(auth="digest", user="admin", password=password) as server:
        url = f"rtsp://admin:{password}@127.0.0.1:{server.port}{server.path}"
        spec = parse_source(url)
        assert spec.display == f"rtsp://admin:***@127.0.0.1:{server.port}{server.path}"
        got, _, _ = read(url, 3)
    assert got[0][1].image.shape == (240, 320, 3)


@needs_gst
def test_a_camera_that_restarts_with_another_size_and_codec() -> None:
    """Killed and restarted as 640x480 HEVC at 15 fps, then as 1280x720 MJPEG: the stream
    reconnects, takes the new size, and marks the first new picture a discontinuity."""
    server = RtspServer(width=320, height=240)
    server.start()
    slot = FrameSlot(capacity=1, policy=DropPolicy.LATEST)
    spec = parse_source(server.url + "?open_timeout=3&read_timeout=2")
    worker = StreamWorker("cam", spec, slot, reconnect=FAST)
    collector = Collector(slot)
    sizes = []
    try:
        worker.start()
        assert worker.wait_state({S.STREAMING}, timeout=10) is S.STREAMING
        for options in ({"width": 640, "height": 480, "codec": "h265", "fps": 15},
                        {"width": 1280, "height": 720, "codec": "mjpeg", "fps": 10}):
            server.kill()
            assert worker.wait_state({S.RECONNECTING}, timeout=5) is S.RECONNECTING
            server.options = options
            server.start()
            assert worker.wait_state({S.STREAMING}, timeout=8) is S.STREAMING
            assert worker.wait_frames(worker.status().frames + 10, timeout=5)
            st = worker.status()
            sizes.append((st.width, st.height, st.source_fps))
            assert st.error is None
    finally:
        assert worker.stop(timeout=5.0)
        frames = collector.stop()
        server.kill()
    assert sizes == [(640, 480, 15.0), (1280, 720, 10.0)]
    shapes = [f.image.shape[:2] for f in frames]
    firsts = [i for i in range(len(frames)) if i == 0 or shapes[i] != shapes[i - 1]]
    assert [shapes[i] for i in firsts] == [(240, 320), (480, 640), (720, 1280)]
    assert all(frames[i].discontinuity for i in firsts)
    assert not any(t.name == "source-cam" for t in threading.enumerate()), "no leaked thread"
