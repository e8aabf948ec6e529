"""Results as plain HTTP pictures (snapshot, MJPEG) against a real uvicorn, read by real clients:
httpx, and FFmpeg's own MJPEG-over-HTTP demuxer."""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipeline.config import AppConfig
from pipeline.render import decode_jpeg, decode_png_labels
from server.pictures import BOUNDARY
from tests.helpers_video import make_test_video
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def server_with(live_server, config: AppConfig, **streams: str):
    srv = live_server(config)
    for sid, source in streams.items():
        r = httpx.post(f"{srv.url}/api/streams", json={"id": sid, "source": source}, timeout=10)
        assert r.status_code == 201, r.text
    return srv


class Parts:
    """Reads a multipart/x-mixed-replace body part by part, on one iterator over the body
    (closing an iterator closes httpx's connection, which the server sees as the client
    leaving)."""

    def __init__(self, response: httpx.Response) -> None:
        self.chunks = response.iter_bytes()
        self.buf = b""

    def read(self, count: int) -> list[tuple[dict[str, str], bytes]]:
        """The next ``count`` parts: (headers, body)."""
        parts: list[tuple[dict[str, str], bytes]] = []
        while len(parts) < count:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end >= 0:
                lines = self.buf[:head_end].decode("ascii").split("\r\n")
                assert lines[0] == f"--{BOUNDARY}", lines[0]
                headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
                end = head_end + 4 + int(headers["content-length"]) + 2
                if len(self.buf) >= end:
                    assert self.buf[end - 2 : end] == b"\r\n"
                    parts.append((headers, self.buf[head_end + 4 : end - 2]))
                    self.buf = self.buf[end:]
                    continue
            self.buf += next(self.chunks)
        return parts

    def rest(self) -> bytes:
        """Everything left, once the server ends the response."""
        return self.buf + b"".join(self.chunks)


def test_a_snapshot_is_the_streams_next_frame_in_the_format_asked(live_server, null_config) -> None:
    srv = server_with(live_server, null_config, cam="demo")
    wait_for(lambda: httpx.get(f"{srv.url}/api/streams/cam").json()["state"] == "streaming", what="streaming")
    info = httpx.get(f"{srv.url}/api/streams/cam").json()
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        r = http.get("/api/streams/cam/snapshot")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg"
        assert r.headers["cache-control"] == "no-store"
        first = int(r.headers["x-frame-index"])
        assert float(r.headers["x-captured-at"]) > 0
        assert decode_jpeg(r.content).shape == (info["height"], info["width"], 3)

        r = http.get("/api/streams/cam/snapshot", params={"format": "labels"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        labels = decode_png_labels(r.content)
        assert labels.shape == (info["height"], info["width"])
        assert int(r.headers["x-frame-index"]) > first  # the next frame, not a cached one

        r = http.get("/api/streams/cam/snapshot", params={"format": "jpeg", "quality": 30})
        assert r.status_code == 200 and decode_jpeg(r.content).shape[:2] == labels.shape
    # the snapshot's subscription is gone once it has answered
    assert srv.app.state.hub.client_count("cam") == 0


def test_mjpeg_parts_are_consecutive_jpeg_frames_at_the_rate_asked(live_server, null_config) -> None:
    srv = server_with(live_server, null_config, cam="demo")
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        with http.stream("GET", "/api/streams/cam/mjpeg") as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
            reader = Parts(r)
            parts = reader.read(6)
            assert http.get("/api/streams/cam").json()["clients"] == 1
            assert len(reader.read(1)) == 1  # still streaming
        indices = [int(h["x-frame-index"]) for h, _ in parts]
        assert indices == sorted(indices) and len(set(indices)) == 6
        for headers, body in parts:
            assert headers["content-type"] == "image/jpeg"
            assert decode_jpeg(body).ndim == 3

        # max_fps as on the websocket: the demo runs at 25 fps, 5 fps gives every fifth frame or so
        with http.stream("GET", "/api/streams/cam/mjpeg", params={"max_fps": 5, "format": "jpeg"}) as r:
            parts = Parts(r).read(4)
        captured = [float(h["x-captured-at"]) for h, _ in parts]
        gaps = np.diff(captured)
        assert gaps.min() > 0.1, gaps  # at 25 fps unthrottled, frames are 0.04 s apart
    wait_for(lambda: srv.app.state.hub.client_count("cam") == 0, 5, "subscriptions released")


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_ffmpeg_reads_the_mjpeg_url_as_a_video(live_server, null_config, tmp_path: Path) -> None:
    srv = server_with(live_server, null_config, cam="demo")
    out = tmp_path / "frames.mjpeg"
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "mpjpeg", "-i", f"{srv.url}/api/streams/cam/mjpeg",
         "-frames:v", "5", "-c", "copy", "-f", "mjpeg", str(out)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    info = httpx.get(f"{srv.url}/api/streams/cam").json()  # streaming by now: its size is known
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=width,height,nb_read_frames", "-of", "csv=p=0", str(out)],
        capture_output=True, text=True, timeout=30,
    )
    assert probe.stdout.strip() == f"{info['width']},{info['height']},5"
    wait_for(lambda: srv.app.state.hub.client_count("cam") == 0, 5, "ffmpeg's subscription released")


def test_mjpeg_ends_when_its_stream_is_removed(live_server, null_config) -> None:
    srv = server_with(live_server, null_config, cam="demo")
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        with http.stream("GET", "/api/streams/cam/mjpeg") as r:
            reader = Parts(r)
            reader.read(1)
            assert http.delete("/api/streams/cam").status_code == 204
            t0 = time.monotonic()
            rest = reader.rest()  # returns once the server ends the response
            assert time.monotonic() - t0 < 5
        assert rest.endswith(f"--{BOUNDARY}--\r\n".encode())


def test_a_client_that_leaves_a_stream_without_frames_is_let_go(live_server, null_config) -> None:
    """No frame comes from a camera that is down; a reader that gives up must not stay
    subscribed (it would count against the client limit until the camera came back)."""
    srv = server_with(live_server, null_config, cam="rtsp://127.0.0.1:1/down")
    hub = srv.app.state.hub
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        with http.stream("GET", "/api/streams/cam/mjpeg") as r:
            assert r.status_code == 200
            wait_for(lambda: hub.client_count("cam") == 1, 5, "subscribed")
        wait_for(lambda: hub.client_count("cam") == 0, 5, "subscription released after the client left")

        r = http.get("/api/streams/cam/snapshot", params={"timeout": 0.5})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "no picture within 0.5 s" in r.json()["detail"]
        assert "reconnecting" in r.json()["detail"] or "connecting" in r.json()["detail"]
        assert http.get("/api/streams/cam").json()["state"] != "streaming"


def test_a_stream_that_has_ended_answers_409_at_once(live_server, null_config, tmp_path: Path) -> None:
    server = null_config.server.model_copy(update={"media_dir": str(tmp_path)})
    clip = make_test_video(tmp_path / "clip.mp4", frames=3)
    srv = server_with(live_server, null_config.model_copy(update={"server": server}), still=str(clip))
    wait_for(lambda: httpx.get(f"{srv.url}/api/streams/still").json()["state"] == "stopped", what="stopped")
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        for path in ("snapshot", "mjpeg"):
            t0 = time.monotonic()
            r = http.get(f"/api/streams/still/{path}")
            assert r.status_code == 409, (path, r.text)
            assert "stream is stopped" in r.json()["detail"]
            assert time.monotonic() - t0 < 2
    assert srv.app.state.hub.client_count("still") == 0


@pytest.mark.parametrize(
    ("path", "params", "status", "needle"),
    [
        ("nope/snapshot", {}, 404, "unknown stream 'nope'"),
        ("nope/mjpeg", {}, 404, "unknown stream 'nope'"),
        ("cam/snapshot", {"format": "rle"}, 400, "'rle' is not a picture"),
        ("cam/mjpeg", {"format": "labels"}, 400, "use overlay, jpeg"),
        ("cam/snapshot", {"format": "gif"}, 400, "unknown format"),
        ("cam/snapshot", {"quality": 0}, 400, "quality must be 1..100"),
        ("cam/snapshot", {"max_fps": 5}, 400, "max_fps applies to /mjpeg"),
        ("cam/snapshot", {"timeout": -1}, 400, "timeout must be in"),
        ("cam/snapshot", {"timeout": "nan"}, 400, "finite"),
        ("cam/mjpeg", {"max_fps": 1000}, 400, "max_fps must be in"),
        ("cam/mjpeg", {"colour": "red"}, 400, "unknown parameter(s): colour"),
        ("cam/snapshot", [("format", "jpeg"), ("format", "labels")], 400, "more than once: format"),
        ("cam/mjpeg", [("max_fps", "5"), ("quality", "5"), ("max_fps", "9")], 400, "once: max_fps"),
    ],
)
def test_bad_requests_get_a_clear_4xx(live_server, null_config, path, params, status, needle) -> None:
    srv = server_with(live_server, null_config, cam="demo")
    r = httpx.get(f"{srv.url}/api/streams/{path}", params=params, timeout=10)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert srv.app.state.hub.client_count("cam") == 0


def test_pictures_take_the_token_and_count_against_the_client_limit(live_server, null_config) -> None:
    server = null_config.server.model_copy(update={"token": "s3cret"})
    limits = null_config.limits.model_copy(update={"max_clients_per_stream": 1})
    srv = live_server(null_config.model_copy(update={"server": server, "limits": limits}))
    auth = {"Authorization": "Bearer s3cret"}
    r = httpx.post(f"{srv.url}/api/streams", json={"id": "cam", "source": "demo"}, headers=auth)
    assert r.status_code == 201
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.get("/api/streams/cam/snapshot").status_code == 401
        assert http.get("/api/streams/cam/snapshot", params={"token": "wrong"}).status_code == 401
        # an <img> tag sends no header: the token may come in the query string
        with http.stream("GET", "/api/streams/cam/mjpeg", params={"token": "s3cret"}) as r:
            assert r.status_code == 200
            reader = Parts(r)
            reader.read(1)
            r2 = http.get("/api/streams/cam/snapshot", headers=auth)
            assert r2.status_code == 429 and "client limit reached (1)" in r2.json()["detail"]
            assert len(reader.read(1)) == 1
        wait_for(lambda: srv.app.state.hub.client_count("cam") == 0, 5, "subscription released")
        assert http.get("/api/streams/cam/snapshot", headers=auth).status_code == 200


def never_reading_reader(srv, path: str) -> socket.socket:
    """An HTTP client that asks for ``path`` and never reads: the server's sends to it block
    once the socket buffers are full."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", srv.port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return s


def reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def blocked_mjpeg_reader(srv, sid: str) -> socket.socket:
    sock = never_reading_reader(srv, f"/api/streams/{sid}/mjpeg?format=jpeg&quality=100")
    drops = srv.app.state.manager.get(sid).drops
    # client_slow drops: its sends are blocked and pictures pile up behind them
    wait_for(lambda: drops.snapshot().get("client_slow", 0) >= 10, 20, "the reader's buffers full")
    return sock


def open_connections(srv) -> int:
    """The HTTP connections uvicorn holds (a request in progress, or kept alive)."""
    return len(srv.server.server_state.connections)


class Errors(logging.Handler):
    """ERROR lines of a logger (uvicorn's do not reach pytest's caplog)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> Errors:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def test_an_mjpeg_reader_that_does_not_read_goes_with_its_stream(live_server, null_config) -> None:
    srv = server_with(live_server, null_config, cam="demo")
    hub = srv.app.state.hub
    sock = blocked_mjpeg_reader(srv, "cam")
    try:
        assert httpx.delete(f"{srv.url}/api/streams/cam", timeout=10).status_code == 204
        # no client of the stream re-added under the same id right after, though its blocked
        # response is given up only CLOSE_WAIT_S later
        r = httpx.post(f"{srv.url}/api/streams", json={"id": "cam", "source": "demo"}, timeout=10)
        assert r.status_code == 201 and r.json()["clients"] == 0
        assert hub.client_count("cam") == 0
        # and its connection is closed, not left open behind the data it does not read
        wait_for(lambda: open_connections(srv) == 0, 10, "the reader's connection closed")
    finally:
        reset(sock)


def test_an_mjpeg_reader_that_stops_reading_is_let_go_after_the_send_timeout(
    live_server, null_config
) -> None:
    """limits.ws_send_timeout_s bounds MJPEG readers as it bounds websocket clients."""
    limits = null_config.limits.model_copy(update={"ws_send_timeout_s": 1.0})
    srv = server_with(live_server, null_config.model_copy(update={"limits": limits}), cam="demo")
    hub = srv.app.state.hub
    with Errors("uvicorn.error") as errors:
        sock = blocked_mjpeg_reader(srv, "cam")
        try:
            wait_for(lambda: hub.client_count("cam") == 0, 10, "the reader dropped")
            # Its connection goes too. The server cannot finish the response (the reader
            # takes no more data), and a plain close waits for the unsent data to be read:
            # the connection, its socket and buffers stayed open as long as the reader did.
            wait_for(lambda: open_connections(srv) == 0, 10, "the reader's connection closed")
            # while one that reads stays
            url = f"{srv.url}/api/streams/cam/mjpeg"
            with httpx.Client(timeout=10) as http, http.stream("GET", url) as r:
                reader = Parts(r)  # kept: dropping it closes the connection
                reader.read(3)
                assert hub.client_count("cam") == 1
        finally:
            reset(sock)
    assert errors.lines == []  # dropping a reader is no server error


def test_a_snapshot_client_that_leaves_while_waiting_is_let_go(live_server, null_config) -> None:
    """A dashboard polling a camera that is down gives up on its request long before the
    snapshot's own timeout: its subscription must not outlive it (those of a few such polls
    would fill the client limit)."""
    srv = server_with(live_server, null_config, cam="rtsp://127.0.0.1:1/down")
    hub = srv.app.state.hub
    socks = [never_reading_reader(srv, "/api/streams/cam/snapshot?timeout=30") for _ in range(3)]
    wait_for(lambda: hub.client_count("cam") == 3, 5, "the snapshots waiting")
    for sock in socks:
        sock.close()
    wait_for(lambda: hub.client_count("cam") == 0, 5, "subscriptions released after the clients left")


@pytest.mark.parametrize("path", ["snapshot", "mjpeg"])
def test_a_stream_that_ends_as_a_picture_is_asked_for_answers_its_end(
    live_server, null_config, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The stream ends (its source thread says so to the stream's subscribers) just after
    the endpoint has read its state, before it has subscribed: the endpoint must still hear
    of the end, or it waits for pictures that never come (a snapshot until its timeout, an
    MJPEG reader for ever)."""
    srv = server_with(live_server, null_config, cam="rtsp://127.0.0.1:1/down")
    handle = srv.app.state.manager.get("cam")
    hub = srv.app.state.hub
    described = handle.describe

    def describe_then_end() -> dict:
        info = described()
        hub.publish_status("cam", {**info, "state": "failed", "error": "gave up"})
        return info

    monkeypatch.setattr(handle, "describe", describe_then_end)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        t0 = time.monotonic()
        if path == "snapshot":
            r = http.get("/api/streams/cam/snapshot", params={"timeout": 5})
            assert r.status_code == 409, r.text
            assert "stream is failed: gave up" in r.json()["detail"]
        else:
            with http.stream("GET", "/api/streams/cam/mjpeg") as r:
                assert r.status_code == 200
                assert r.read() == f"--{BOUNDARY}--\r\n".encode()
        assert time.monotonic() - t0 < 4
    wait_for(lambda: hub.client_count("cam") == 0, 5, "subscription released")


def test_mjpeg_readers_that_leave_mid_part_are_no_server_error(live_server, null_config) -> None:
    srv = server_with(live_server, null_config, cam="demo")
    hub = srv.app.state.hub
    with Errors("uvicorn.error") as errors:
        for leave in (reset, socket.socket.close) * 3:
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", srv.port))
            s.sendall(b"GET /api/streams/cam/mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.recv(3000)  # the head and part of the first picture
            leave(s)
        wait_for(lambda: hub.client_count("cam") == 0 and open_connections(srv) == 0, 5, "all let go")
    assert errors.lines == []
