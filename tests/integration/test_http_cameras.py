"""HTTP cameras as real ones answer: MJPEG variants, snapshot URLs, authentication, redirects,
error pages and cameras that hang up, served byte by byte from loopback."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import time

import pytest

from pipeline.config import ReconnectConfig
from pipeline.slot import FrameSlot
from pipeline.sources import SourceError, parse_source
from pipeline.sources.base import SourceAuthError
from pipeline.stream import StreamWorker
from pipeline.types import StreamState
from tests.integration.fakes_net import HttpCamera, HttpRequest, jpeg_picture, read_until_error

pytestmark = pytest.mark.integration

S = StreamState
FAST = ReconnectConfig(initial_backoff_s=0.2, max_backoff_s=0.5, jitter=0.1, stall_timeout_s=3.0)
USER, PASSWORD = "admin", "s3cr#t!"
QUICK = "open_timeout=2&read_timeout=2"


def mjpeg(
    *,
    frames: int = 1000,
    fps: float = 20.0,
    boundary: bytes = b"frame",
    declared: bytes | None = None,
    nl: bytes = b"\r\n",
    length: bool = True,
    extra: bytes = b"",
    sizes: tuple[tuple[int, int], ...] = ((160, 120),),
    chunked: bool = False,
):
    """A ``multipart/x-mixed-replace`` camera: ``declared`` is the boundary as its Content-Type
    states it (default: ``boundary``), ``boundary`` what separates the parts."""

    def respond(cam: HttpCamera, conn: socket.socket, req: HttpRequest) -> None:
        version = b"HTTP/1.1" if chunked else b"HTTP/1.0"
        head = version + b" 200 OK" + nl
        head += b"Content-Type: multipart/x-mixed-replace; boundary=" + (declared or boundary) + nl
        if chunked:
            head += b"Transfer-Encoding: chunked" + nl
        conn.sendall(head + nl)
        for i in range(frames):
            w, h = sizes[i % len(sizes)]
            jpg = jpeg_picture(i, width=w, height=h)
            part = b"--" + boundary + nl + b"Content-Type: image/jpeg" + nl + extra
            if length:
                part += b"Content-Length: %d" % len(jpg) + nl
            part += nl + jpg + nl
            if chunked:
                part = b"%x\r\n" % len(part) + part + b"\r\n"
            conn.sendall(part)
            if not cam.wait(1.0 / fps):
                return
        if chunked:
            conn.sendall(b"0\r\n\r\n")

    return respond


def snapshot(*, framing: str = "length", kind: str = "jpeg"):
    """A snapshot URL: one picture per request, sent with a Content-Length, chunked, or
    HTTP/1.0 ended by closing the connection."""

    def respond(cam: HttpCamera, conn: socket.socket, req: HttpRequest) -> None:
        body = jpeg_picture(len(cam.requests))
        if framing == "length":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body) + body
            )
        elif framing == "chunked":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
            )
        else:
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + body)

    return respond


def basic_auth(inner):
    def respond(cam: HttpCamera, conn: socket.socket, req: HttpRequest) -> None:
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if req.headers.get("authorization") == want:
            return inner(cam, conn, req)
        conn.sendall(
            b'HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm="cam"\r\n'
            b"Content-Type: text/html\r\nContent-Length: 17\r\n\r\n<h1>401 nope</h1>"
        )

    return respond


def digest_auth(inner, nonce: str = "5e1f0c2a"):
    def respond(cam: HttpCamera, conn: socket.socket, req: HttpRequest) -> None:
        auth = req.headers.get("authorization", "")
        if auth.startswith("Digest "):
            f = dict(re.findall(r'(\w+)="?([^",]*)"?', auth[7:]))
            ha1 = hashlib.md5(f"{USER}:cam:{PASSWORD}".encode()).hexdigest()
            ha2 = hashlib.md5(f"{req.method}:{f.get('uri')}".encode()).hexdigest()
            want = hashlib.md5(
                f"{ha1}:{nonce}:{f.get('nc')}:{f.get('cnonce')}:{f.get('qop')}:{ha2}".encode()
            ).hexdigest()
            if f.get("response") == want:
                return inner(cam, conn, req)
        conn.sendall(
            f'HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Digest realm="cam", qop="auth", '
            f'nonce="{nonce}", algorithm=MD5\r\nContent-Length: 0\r\n\r\n'.encode()
        )

    return respond


def _frames(url: str, count: int, timeout: float = 5.0) -> list[tuple[float, tuple[int, ...], float | None]]:
    """Open ``url`` and read ``count`` pictures: (arrival s, shape, pts) each."""
    src = parse_source(url).create()
    t0 = time.monotonic()
    got: list[tuple[float, tuple[int, ...], float | None]] = []
    try:
        src.open()
        for raw in src.frames():
            if raw is not None:
                got.append((time.monotonic() - t0, raw.image.shape, raw.pts))
            if len(got) >= count or time.monotonic() - t0 > timeout:
                break
    finally:
        src.close()
    return got


def _worker(url: str) -> tuple[StreamWorker, FrameSlot]:
    slot = FrameSlot()
    worker = StreamWorker("cam", parse_source(url), slot, reconnect=FAST)
    worker.start()
    return worker, slot


# ---- MJPEG ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"declared": b'"frame"'},  # quoted boundary
        {"boundary": b"--myboundary"},  # boundary stated with its leading dashes (Axis-like)
        {"length": False},  # parts without Content-Length
        {"nl": b"\n"},  # LF line endings
        {"extra": b"X-Timestamp: 1712345678.123\r\n"},  # extra part headers
        {"chunked": True},  # HTTP/1.1 chunked (ESP32-CAM)
    ],
    ids=["plain", "quoted", "dashes", "no-length", "lf", "x-timestamp", "chunked"],
)
def test_mjpeg_variants_deliver_every_picture_at_the_cameras_pace(variant: dict) -> None:
    with HttpCamera(mjpeg(fps=20, **variant)) as cam:
        got = _frames(cam.url("/video.mjpg") + "?" + QUICK, 10)
    assert len(got) == 10 and {shape for _, shape, _ in got} == {(120, 160, 3)}
    assert all(pts is None for _, _, pts in got)
    # 20 fps: about 0.05 s apart (a part without a length waits for the next boundary)
    span = got[-1][0] - got[0][0]
    assert 0.3 < span < 1.2, [round(t, 2) for t, _, _ in got]


def test_mjpeg_pictures_of_changing_size_keep_their_size() -> None:
    with HttpCamera(mjpeg(sizes=((160, 120), (320, 240)))) as cam:
        got = _frames(cam.url("/video.mjpg") + "?" + QUICK, 6)
    assert [shape for _, shape, _ in got] == [(120, 160, 3), (240, 320, 3)] * 3


def test_slow_mjpeg_camera_pictures_come_as_they_arrive() -> None:
    with HttpCamera(mjpeg(fps=1.0)) as cam:
        got = _frames(cam.url("/video.mjpg") + "?" + QUICK, 3)
    times = [t for t, _, _ in got]
    assert len(got) == 3 and times[0] < 0.5 and 1.7 < times[2] < 2.6, times


def test_camera_closing_the_connection_says_so_and_is_reconnected() -> None:
    """A camera that hangs up after a few pictures (HTTP/1.0, no length): FFmpeg reports the
    end of such a body as an I/O error; the stream says the server closed the connection,
    not that its answer could not be read, and comes back."""
    with HttpCamera(mjpeg(frames=5, fps=20)) as cam:
        error = read_until_error(cam.url("/video.mjpg") + "?" + QUICK)
        assert "closed the connection" in str(error) and "protocol error" not in str(error)
        assert error.retryable
        worker, _ = _worker(cam.url("/video.mjpg"))
        try:
            assert worker.wait_frames(12, timeout=6), worker.status()
            assert worker.status().reconnects >= 2
        finally:
            assert worker.stop(timeout=3)


# ---- snapshot URLs ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("path", ["/snapshot.jpg", "/cgi-bin/snapshot.cgi"])
def test_snapshot_url_is_read_whatever_its_framing(path: str, framing: str) -> None:
    """A URL ending in .jpg made FFmpeg read the picture by its announced length: a chunked
    snapshot (ESP32-CAM) or one without a length failed as invalid data."""
    with HttpCamera(snapshot(framing=framing)) as cam:
        got = _frames(cam.url(path) + "?" + QUICK, 2)
    assert [shape for _, shape, _ in got] == [(120, 160, 3)] * 2
    assert all(pts is None for _, _, pts in got)


def test_snapshot_url_is_polled_as_a_steady_stream() -> None:
    """One picture per request: asked again every 0.5 s (or at target_fps), streaming all
    along, without a reconnect (and a warning) per picture or a made-up 25 fps."""
    with HttpCamera(snapshot()) as cam:
        worker, slot = _worker(cam.url("/snapshot.jpg"))
        try:
            assert worker.wait_state({S.STREAMING}, timeout=3) is S.STREAMING
            t0 = time.monotonic()
            assert worker.wait_frames(5, timeout=4), worker.status()
            took = time.monotonic() - t0
            st = worker.status()
            assert st.state is S.STREAMING and st.reconnects == 0 and st.error is None
            assert st.source_fps is None and 1.5 < took < 2.8, took
            frame = slot.take()
            assert frame is not None and frame.pts is None
        finally:
            assert worker.stop(timeout=3)
        asked = len(cam.requests)
        with HttpCamera(snapshot()) as fast:
            worker, _ = _worker(fast.url("/image.jpg?target_fps=5"))
            try:
                assert worker.wait_frames(9, timeout=3), worker.status()
            finally:
                assert worker.stop(timeout=3)
    assert asked <= 7


def test_snapshot_refused_later_raises_the_authentication_error() -> None:
    """A snapshot camera whose password changes while it is polled: a 401 on a later request
    is an authentication error (retried slowly), not a stream that ended."""

    def respond(cam: HttpCamera, conn: socket.socket, req: HttpRequest) -> None:
        inner = snapshot() if len(cam.requests) <= 2 else basic_auth(snapshot())
        inner(cam, conn, req)

    with HttpCamera(respond) as cam:
        src = parse_source(cam.url("/snapshot.jpg") + "?" + QUICK).create()
        got = 0
        try:
            src.open()
            with pytest.raises(SourceAuthError) as exc:
                for raw in src.frames():
                    got += raw is not None
        finally:
            src.close()
    assert got == 2 and "authentication" in str(exc.value)


# ---- authentication ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [basic_auth, digest_auth], ids=["basic", "digest"])
@pytest.mark.parametrize(
    ("userinfo", "needle"),
    [
        (f"{USER}:{PASSWORD}@", None),
        (f"{USER}:wrong-{PASSWORD}@", "authentication failed"),
        ("", "authentication required"),
    ],
    ids=["right", "wrong", "missing"],
)
def test_camera_login(scheme, userinfo: str, needle: str | None) -> None:
    with HttpCamera(scheme(mjpeg(fps=20))) as cam:
        url = cam.url("/video.mjpg", userinfo) + "?" + QUICK
        if needle is None:
            assert len(_frames(url, 3)) == 3
            return
        src = parse_source(url).create()
        with pytest.raises(SourceAuthError) as exc:
            src.open()
        src.close()
    assert needle in str(exc.value) and PASSWORD not in str(exc.value) and "s3cr" not in str(exc.value)


def test_redirect_to_a_login_is_an_authentication_error() -> None:
    def respond(cam: HttpCamera, conn: socket.socket, req: HttpRequest) -> None:
        if req.path.startswith("/video"):
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /stream\r\nContent-Length: 0\r\n\r\n")
        else:
            basic_auth(mjpeg())(cam, conn, req)

    with HttpCamera(respond) as cam:
        src = parse_source(cam.url("/video.mjpg") + "?" + QUICK).create()
        with pytest.raises(SourceAuthError, match="authentication required"):
            src.open()
        src.close()
        assert len(_frames(cam.url("/video.mjpg", f"{USER}:{PASSWORD}@") + "?" + QUICK, 2)) == 2


@pytest.mark.parametrize(
    ("code", "needle", "retryable"),
    [(404, "404 Not Found", True), (500, "HTTP error", True), (503, "HTTP error", True)],
)
def test_error_pages(code: int, needle: str, retryable: bool) -> None:
    def respond(cam: HttpCamera, conn: socket.socket, req: HttpRequest) -> None:
        body = b"<html>camera busy</html>"
        head = b"HTTP/1.1 %d Oops\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n"
        head %= (code, len(body))
        conn.sendall(head + body)

    with HttpCamera(respond) as cam:
        src = parse_source(cam.url("/video.mjpg") + "?" + QUICK).create()
        with pytest.raises(SourceError) as exc:
            src.open()
        src.close()
    assert needle in str(exc.value) and exc.value.retryable is retryable
