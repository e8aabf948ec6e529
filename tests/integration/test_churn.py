"""Days of operation in seconds: streams and websocket clients come and go against a real
server, and nothing may be left behind (threads, descriptors, per-stream tables, metric
series); /healthz and /readyz tell the truth when the engine or its model is gone."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipeline.config import AppConfig, EngineConfig, ReconnectConfig, ServerConfig
from pipeline.manager import StreamManager
from tests.helpers_video import make_test_video
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

LOOP = {"loop": True}
FAST = ReconnectConfig(initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.1)


def samples(url: str) -> dict[str, float]:
    """``name{a=x,b=y}`` -> value for every sample of ``/metrics`` (parsed by prometheus_client)."""
    out = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def config(media: Path, **kw: Any) -> AppConfig:
    return AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1, encode_workers=2),
        server=ServerConfig(media_dir=str(media)),
        reconnect=FAST,
        **kw,
    )


def raw_ws(port: int, path: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A websocket opened by hand: a client that can misbehave (never read, reset, send junk)."""
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return s


def reset(s: socket.socket) -> None:
    """Close with a TCP reset, as a client that crashes does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def tables(app: Any) -> dict[str, int]:
    """Sizes of every per-stream or per-client table of the app."""
    hub, mgr, metrics = app.state.hub, app.state.manager, app.state.metrics
    return {
        "streams": len(mgr.list()),
        "engine streams": len(mgr.engine._streams),
        "batcher lanes": len(mgr.engine._batcher.lanes()),
        "hub clients": len(hub._clients),
        "hub encode gates": len(hub._gates),
        "hub ended": len(hub._ended),
        "hub closing": len(hub._closing),
        "latency histograms": len(metrics._hists),
    }


def server_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.is_alive())


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_stream_and_client_churn_leaves_nothing_behind(live_server, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=25, width=64, height=48, fps=25)
    srv = live_server(config(tmp_path))
    sources: list[dict[str, Any]] = [
        {"source": str(clip), "options": {"loop": True, "realtime": True}},
        {"source": "demo"},
        {"source": "rtsp://127.0.0.1:1/x", "options": {"open_timeout_s": 1}},
    ]
    http = httpx.Client(base_url=srv.url, timeout=10)
    # one warm-up cycle so lazily made things (pools, caches) exist before counting
    before_threads = before_fds = 0
    previous: dict[str, float] = {}
    cycles = 30
    for i in range(cycles + 1):
        sid = f"churn-{i}.x_{i % 3}"
        r = http.post("/api/streams", json={"id": sid, **sources[i % 3]})
        assert r.status_code == 201, r.text
        reader = connect(srv.stream_ws(sid, format="labels"), open_timeout=5)
        crasher = raw_ws(srv.port, f"/ws/streams/{sid}?format=raw")
        junk = connect(srv.stream_ws(sid), open_timeout=5)
        junk.send("{not json")
        junk.send(b"\x00\xff")
        if i % 3 != 2:  # a source that delivers: results reach the clients
            wait_for(lambda: reader.recv(timeout=5) and True, 10, "a message")  # noqa: B023
            wait_for(lambda: http.get(f"/api/streams/{sid}").json()["frames"] > 0, 10, "frames")  # noqa: B023
        with contextlib.suppress(OSError, ConnectionClosed):
            crasher.recv(100)
        reset(crasher)
        patches = ({"temporal": "smooth"}, {"roi": True}, {"temporal": {"mode": "keyframe"}, "roi": False})
        for patch in patches:
            assert http.patch(f"/api/streams/{sid}", json=patch).status_code == 200
        junk.close()
        assert http.delete(f"/api/streams/{sid}").status_code == 204
        with contextlib.suppress(OSError, ConnectionClosed):
            while True:
                reader.recv(timeout=5)
        reader.close()
        m = samples(srv.url)
        for key, value in m.items():
            if key.split("{")[0].endswith("_total") and key in previous:
                assert value >= previous[key], f"counter {key} went back: {previous[key]} -> {value}"
        previous = m
        if i == 0:
            wait_for(lambda: tables(srv.app)["hub clients"] == 0, 10, "no clients")
            before_threads, before_fds = server_threads(), fds()
    http.close()

    # All gone: the tables, the threads (source threads end; a source blocked in an open ends
    # by its timeout), the descriptors, and every label series of the removed streams.
    deadline = time.monotonic() + 10
    while any(tables(srv.app).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(tables(srv.app).values()), tables(srv.app)
    wait_for(lambda: server_threads() <= before_threads + 1, 10, "threads back to the start")
    wait_for(lambda: fds() <= before_fds + 2, 10, "descriptors back to the start")
    m = samples(srv.url)
    assert [k for k in m if "stream=" in k] == []
    assert m["segstream_streams"] == 0 and m["segstream_clients"] == 0
    assert m["segstream_engine_up"] == 1 and m["segstream_engine_ready"] == 1


def never_reading_clients(srv: Any, sid: str, n: int) -> list[socket.socket]:
    """``n`` clients that ask for raw label maps and never read: the server's sends to them block."""
    socks = [raw_ws(srv.port, f"/ws/streams/{sid}?format=raw", rcvbuf=4096) for _ in range(n)]
    hub = srv.app.state.hub
    wait_for(lambda: hub.client_count(sid) == n, 10, "clients subscribed")
    # client_slow drops mean their sends are blocked and results pile up behind them
    wait_for(
        lambda: srv.app.state.manager.get(sid).drops.snapshot().get("client_slow", 0) >= 10 * n,
        20,
        "the clients' buffers full",
    )
    return socks


def test_a_removed_streams_clients_go_even_when_they_never_read(live_server, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=25, width=320, height=240, fps=25)
    srv = live_server(config(tmp_path))
    hub = srv.app.state.hub
    r = httpx.post(f"{srv.url}/api/streams", json={"id": "cam", "source": str(clip), "options": LOOP})
    assert r.status_code == 201
    socks = never_reading_clients(srv, "cam", 2)
    try:
        assert httpx.delete(f"{srv.url}/api/streams/cam", timeout=10).status_code == 204
        # They used to stay subscribed for as long as their sockets stayed open, and counted as
        # clients of the next stream added under the same id.
        wait_for(lambda: hub.client_count("cam") == 0, 10, "the clients unsubscribed")
        r = httpx.post(f"{srv.url}/api/streams", json={"id": "cam", "source": "demo"}, timeout=10)
        assert r.status_code == 201 and r.json()["clients"] == 0
        assert tables(srv.app)["hub clients"] == 0
    finally:
        for s in socks:
            reset(s)


def test_a_client_that_stops_reading_is_closed_after_the_send_timeout(
    live_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import ws

    monkeypatch.setattr(ws, "SEND_TIMEOUT_S", 1.0)
    clip = make_test_video(tmp_path / "clip.mp4", frames=25, width=320, height=240, fps=25)
    srv = live_server(config(tmp_path))
    r = httpx.post(f"{srv.url}/api/streams", json={"id": "cam", "source": str(clip), "options": LOOP})
    assert r.status_code == 201
    socks = never_reading_clients(srv, "cam", 1)
    try:
        wait_for(lambda: srv.app.state.hub.client_count("cam") == 0, 10, "the client dropped")
        assert samples(srv.url)["segstream_stream_clients{stream=cam}"] == 0
        # while a reading client stays
        with connect(srv.stream_ws("cam", format="labels"), open_timeout=5) as reader:
            for _ in range(5):
                reader.recv(timeout=5)
            assert srv.app.state.hub.client_count("cam") == 1
    finally:
        for s in socks:
            reset(s)


def test_clients_that_close_while_results_flow_are_not_reported_as_errors(
    live_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client closing (or closed for a too-large message) while a result is on its way is an
    ordinary end: the send that loses the race is not logged as a warning. (Which side wins
    depends on timing: over 300 churn cycles against a loaded server about one client in five
    logged one; the classification below is what decides.)"""
    from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

    from server.ws import _disconnected

    late = "Unexpected ASGI message 'websocket.send', after sending 'websocket.close' "
    assert _disconnected(RuntimeError(late))
    assert _disconnected(WebSocketDisconnected('Cannot call "send" once a close message has been sent.'))
    assert _disconnected(WebSocketDisconnect(1006))
    assert _disconnected(ConnectionResetError())
    assert not _disconnected(RuntimeError("something else"))
    assert not _disconnected(ValueError("bad"))

    clip = make_test_video(tmp_path / "clip.mp4", frames=25, width=64, height=48, fps=25)
    srv = live_server(config(tmp_path))
    r = httpx.post(
        f"{srv.url}/api/streams",
        json={"id": "cam", "source": str(clip), "options": {"loop": True, "realtime": False}},
    )
    assert r.status_code == 201
    caplog.set_level(logging.INFO, logger="segstream.ws")
    for i in range(15):
        with connect(srv.stream_ws("cam", format="raw"), open_timeout=5) as client:
            client.recv(timeout=5)
            if i % 3 == 0:
                client.send("x" * 70_000)  # above the control message limit: the server closes (1009)
                with contextlib.suppress(OSError, ConnectionClosed):
                    while True:
                        client.recv(timeout=5)
    wait_for(lambda: srv.app.state.hub.client_count("cam") == 0, 10, "clients gone")
    noise = [
        r.getMessage() for r in caplog.records if r.name == "segstream.ws" and r.levelno >= logging.WARNING
    ]
    assert noise == []


def test_health_tells_when_the_engine_thread_died(live_server, tmp_path: Path) -> None:
    srv = live_server(config(tmp_path))
    r = httpx.post(f"{srv.url}/api/streams", json={"id": "cam", "source": "demo"})
    assert r.status_code == 201
    engine = srv.app.state.manager.engine

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("batcher broke")

    engine._batcher.poll = broken
    wait_for(lambda: not engine.alive, 10, "the engine thread to end")
    health = httpx.get(f"{srv.url}/healthz", timeout=5)
    assert health.status_code == 503
    assert health.json() == {"status": "failed", "reason": "engine thread died: RuntimeError: batcher broke"}
    ready = httpx.get(f"{srv.url}/readyz", timeout=5)
    assert ready.status_code == 503
    body = ready.json()
    assert body["reason"] == "engine thread died: RuntimeError: batcher broke"
    assert body["checks"]["engine_running"] is False and body["engine"]["running"] is False
    assert body["streams"]["cam"]["error"] == "engine thread died: RuntimeError: batcher broke"
    m = samples(srv.url)
    assert m["segstream_engine_up"] == 0
    # a stream added afterwards says why nothing comes
    r = httpx.post(f"{srv.url}/api/streams", json={"id": "late", "source": "demo"})
    assert r.status_code == 201 and "engine thread died" in r.json()["error"]


def test_health_tells_when_the_default_model_failed_to_load(live_server, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    mgr = StreamManager(cfg, restrict_files=True)

    def no_memory(name: str) -> Any:
        raise RuntimeError("out of memory")

    mgr.engine._factory = no_memory
    srv = live_server(cfg, manager=mgr)
    r = httpx.post(f"{srv.url}/api/streams", json={"id": "cam", "source": "demo"})
    assert r.status_code == 201
    # the stream's frames fail on the missing model, which overwrites the engine's last error
    wait_for(lambda: samples(srv.url).get("segstream_engine_errors_total", 0) >= 3, 20, "failed batches")
    ready = httpx.get(f"{srv.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["reason"] == "default model 'null' failed to load: RuntimeError: out of memory"
    assert ready.json()["engine"]["failed_models"] == {"null": "RuntimeError: out of memory"}
    m = samples(srv.url)
    assert m["segstream_engine_ready"] == 0 and m["segstream_engine_up"] == 1
    # the process itself is fine (the model is tried again): alive
    assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200


def test_health_during_shutdown(live_server, tmp_path: Path) -> None:
    srv = live_server(config(tmp_path))
    assert httpx.get(f"{srv.url}/readyz", timeout=5).status_code == 200
    srv.app.state.begin_shutdown()  # what the server does first on SIGTERM
    ready = httpx.get(f"{srv.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["reason"] == "shutting down" and ready.json()["checks"]["accepting"] is False
    assert httpx.get(f"{srv.url}/healthz", timeout=5).json() == {"status": "ok"}
