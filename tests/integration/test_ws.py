"""Websocket protocol v1 against a real uvicorn: formats, settings, slow clients, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline.types import Frame, SegmentationResult, now
from server.client import decode, unpack
from tests.helpers_video import make_test_video

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLASSES = ("background", "person", "car")


async def next_result(ws, timeout: float = 5.0):
    """The next binary result message, skipping status and text messages."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no result within the timeout")
        msg = await asyncio.wait_for(ws.recv(), left)
        if isinstance(msg, bytes):
            header, payload = unpack(msg)
            if header.get("type") == "result":
                return decode(header, payload)


async def next_text(ws, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            return json.loads(msg)


async def close_code(ws, timeout: float = 5.0) -> tuple[int | None, str]:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason or ""


def add_stream(srv, **body) -> dict:
    r = httpx.post(f"{srv.url}/api/streams", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()


def crafted_result(stream_id: str, index: int) -> SegmentationResult:
    h, w = 45, 61
    rng = np.random.default_rng(index)
    labels = rng.integers(0, len(CLASSES), size=(h, w), dtype=np.uint8)
    labels[:10] = 0
    image = np.zeros((h, w, 3), dtype=np.uint8)
    frame = Frame(stream_id=stream_id, index=index, pts=None, captured_at=now(), image=image)
    return SegmentationResult(frame=frame, labels=labels, classes=CLASSES, model="fake", segmented_at=now())


@pytest.fixture
def stopped_stream(live_server, null_config, tmp_path: Path):
    """A server with one stream whose 3-frame clip has ended: no engine results compete."""
    server = null_config.server.model_copy(update={"media_dir": str(tmp_path)})
    srv = live_server(null_config.model_copy(update={"server": server}))
    clip = make_test_video(tmp_path / "clip.mp4", frames=3)
    add_stream(srv, id="still", source=str(clip))
    deadline = time.monotonic() + 10
    while httpx.get(f"{srv.url}/api/streams/still").json()["state"] != "stopped":
        assert time.monotonic() < deadline, "clip did not finish"
        time.sleep(0.05)
    return srv


async def test_every_format_decodes_to_the_label_map_that_was_sent(stopped_stream) -> None:
    srv = stopped_stream
    fmts = ["labels", "raw", "rle", "layers", "overlay", "jpeg"]
    sockets = {f: await connect(srv.stream_ws("still", format=f), open_timeout=5) for f in fmts}
    try:
        # Wait until all clients are subscribed (each gets its initial status message).
        for ws in sockets.values():
            header, _ = unpack(await asyncio.wait_for(ws.recv(), 5))
            assert header["type"] == "status" and header["stale"] is True
        for index in (1000, 1001):
            sent = crafted_result("still", index)
            srv.app.state.hub.publish(sent, {"stale": 0})
            for fmt, ws in sockets.items():
                got = await next_result(ws)
                h = got.header
                assert (h["v"], h["stream"], h["frame"], h["format"]) == (1, "still", index, fmt)
                assert (h["width"], h["height"], h["classes"]) == (61, 45, list(CLASSES))
                for key in (
                    "pts",
                    "captured_at",
                    "sent_at",
                    "latency_ms",
                    "dropped",
                    "stale",
                    "discontinuity",
                ):
                    assert key in h, key
                assert h["sent_at"] >= h["captured_at"] and "encode" in h["latency_ms"]
                if fmt in ("labels", "raw", "rle", "layers"):
                    np.testing.assert_array_equal(got.labels, sent.labels, err_msg=fmt)
                else:
                    assert got.image.shape == (45, 61, 3)
    finally:
        for ws in sockets.values():
            await ws.close()


async def test_rle_over_the_wire_decodes_with_pycocotools(stopped_stream) -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    srv = stopped_stream
    async with connect(srv.stream_ws("still", format="rle"), open_timeout=5) as ws:
        await asyncio.wait_for(ws.recv(), 5)  # initial status
        sent = crafted_result("still", 7)
        srv.app.state.hub.publish(sent, {})
        got = await next_result(ws)
        for obj in got.header["rle"]:
            m = mask_api.decode({"size": obj["size"], "counts": obj["counts"].encode()})
            np.testing.assert_array_equal(m.astype(bool), sent.labels == obj["class"])


async def test_settings_change_on_the_fly_and_bad_messages_keep_the_connection(
    live_server, null_config
) -> None:
    srv = live_server(null_config)
    add_stream(srv, id="demo", source="demo")
    async with connect(srv.stream_ws("demo", format="raw"), open_timeout=5, max_size=None) as ws:
        assert (await next_result(ws)).header["format"] == "raw"
        await ws.send("{not json")
        err = await next_text(ws)
        assert err["type"] == "error" and "bad control message" in err["error"]
        await ws.send(json.dumps({"format": "gif"}))
        err = await next_text(ws)
        assert err["type"] == "error" and "unknown format 'gif'" in err["error"]
        await ws.send(json.dumps({"format": "rle", "max_fps": 10}))
        ack = await next_text(ws)
        assert ack == {"type": "settings", "format": "rle", "max_fps": 10.0, "quality": 80}
        deadline = time.monotonic() + 5
        while (r := await next_result(ws)).header["format"] != "rle":
            assert time.monotonic() < deadline
        assert r.labels.shape == (r.header["height"], r.header["width"])
        # An oversized message closes this connection with 1009 ...
        await ws.send("x" * 200_000)
        assert (await close_code(ws))[0] == 1009
    # ... and the server keeps serving the stream.
    async with connect(srv.stream_ws("demo", format="labels"), open_timeout=5) as ws:
        assert (await next_result(ws)).labels is not None


@pytest.mark.parametrize(
    ("path", "code", "reason"),
    [
        ("/ws/streams/nope", 4404, "unknown stream 'nope'"),
        ("/ws/streams/demo?format=gif", 4400, "unknown format 'gif'"),
        ("/ws/streams/demo?max_fps=-1", 4400, "max_fps must be in"),
        ("/ws/streams/demo?quality=abc", 4400, "quality must be an integer"),
        ("/ws/streams/demo?colour=red", 4400, "unknown parameter(s): colour"),
    ],
)
async def test_bad_requests_close_with_distinct_codes(live_server, null_config, path, code, reason) -> None:
    srv = live_server(null_config)
    add_stream(srv, id="demo", source="demo")
    async with connect(srv.ws_url + path, open_timeout=5) as ws:
        got_code, got_reason = await close_code(ws)
    assert got_code == code and reason in got_reason
    async with connect(srv.stream_ws("demo", format="raw"), open_timeout=5, max_size=None) as ws:
        assert (await next_result(ws)).header["stream"] == "demo"


async def test_removing_a_stream_closes_its_clients_with_4410(live_server, null_config) -> None:
    srv = live_server(null_config)
    add_stream(srv, id="demo", source="demo")
    async with connect(srv.stream_ws("demo", format="rle"), open_timeout=5) as ws:
        await next_result(ws)
        assert httpx.delete(f"{srv.url}/api/streams/demo", timeout=10).status_code == 204
        code, reason = await close_code(ws)
    assert code == 4410 and "removed" in reason


def stalled_websocket(port: int, path: str) -> socket.socket:
    """A websocket client that completes the handshake and then never reads.

    Client libraries read into their own buffers, so only a raw socket with a small receive
    buffer shows the server what a stalled viewer on a slow link looks like.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


async def test_a_slow_client_does_not_slow_a_fast_one(live_server, null_config) -> None:
    srv = live_server(null_config)
    add_stream(srv, id="demo", source="demo")  # 25 fps
    path = srv.stream_ws("demo", format="raw").split(str(srv.port), 1)[1]
    stalled = stalled_websocket(srv.port, path)
    try:
        async with connect(srv.stream_ws("demo", format="raw"), open_timeout=5, max_size=None) as fast:
            await next_result(fast)
            frames_before = httpx.get(f"{srv.url}/api/streams/demo").json()["frames"]
            fast_frames: list[int] = []
            t_end = time.monotonic() + 3.0
            while time.monotonic() < t_end:
                fast_frames.append((await next_result(fast)).header["frame"])
            frames_after = httpx.get(f"{srv.url}/api/streams/demo").json()["frames"]
            produced = frames_after - frames_before
            stalled_client = [c for c in srv.app.state.hub.clients("demo") if c.sent < len(fast_frames) / 2]
    finally:
        stalled.close()
    assert produced >= 30, f"the stream itself produced only {produced} results in 3 s"
    # The fast client got (nearly) every result the engine produced meanwhile ...
    assert len(fast_frames) >= 0.85 * produced, (len(fast_frames), produced)
    assert fast_frames == sorted(set(fast_frames))
    # ... while the stalled one skipped frames instead of queueing them, counted as client_slow.
    assert len(stalled_client) == 1 and stalled_client[0].dropped_slow > 0
    assert len(stalled_client[0].queue) <= 1
    drops = httpx.get(f"{srv.url}/api/streams/demo").json()["drops"]
    assert drops.get("client_slow", 0) > 0, drops


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (Linux ``tcp_info.tcpi_state``): 1 while established,
    7 (closed) after a reset from the peer, 8 (close-wait) after its FIN. Unlike a read, it does
    not take what the server sent."""
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


ESTABLISHED = 1


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="reads the TCP state through Linux's TCP_INFO")
async def test_a_client_that_does_not_read_is_disconnected_while_a_slow_reader_keeps_its_frames(
    live_server, null_config, caplog: pytest.LogCaptureFixture
) -> None:
    """A viewer whose TCP window stays full is disconnected once a message to it has waited
    limits.ws_send_timeout_s (its socket does not stay open on the server, which logs and counts
    it), while a viewer that reads slower than the stream, but reads, keeps getting frames."""
    # (3 s: on a busy 2-core machine a message to the slow reader has been seen to wait 2 s)
    timeout_s = 3.0
    limits = null_config.limits.model_copy(update={"ws_send_timeout_s": timeout_s})
    srv = live_server(null_config.model_copy(update={"limits": limits}))
    caplog.set_level(logging.INFO, logger="segstream.ws")
    add_stream(srv, id="demo", source="demo")  # 25 fps of 640x360: 5.8 MB/s as raw label maps
    path = srv.stream_ws("demo", format="raw").split(str(srv.port), 1)[1]
    stalled = stalled_websocket(srv.port, path)
    try:
        # max_queue=1: the client library stops reading the socket while a message waits, so
        # this viewer's window fills too whenever it has not taken the last one yet
        async with connect(
            srv.stream_ws("demo", format="raw"), open_timeout=5, max_size=None, max_queue=1, close_timeout=1
        ) as slow:
            frames: list[int] = []

            async def read_slowly(until: float) -> dict:
                header: dict = {}
                while time.monotonic() < until:
                    header = (await next_result(slow, timeout=10)).header
                    frames.append(header["frame"])
                    await asyncio.sleep(0.15)  # 6-7 frames a second out of 25
                return header

            deadline = time.monotonic() + 30
            while tcp_state(stalled) == ESTABLISHED:
                assert time.monotonic() < deadline, "the client that does not read is still connected"
                await read_slowly(time.monotonic() + 0.5)
            # the slow reader outlives the send timeout twice over
            last = await read_slowly(time.monotonic() + 2 * timeout_s)
            assert slow.close_code is None
            assert srv.app.state.hub.client_count("demo") == 1
    finally:
        stalled.close()
    assert frames == sorted(set(frames)) and len(frames) >= 20
    assert last["dropped"]["client_slow"] > 0  # it was slower than the stream
    logged = [r.getMessage() for r in caplog.records if r.name == "segstream.ws"]
    assert [m for m in logged if "took no message for 3 s" in m], logged
    metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
    assert "segstream_clients_not_reading_total 1.0" in metrics.splitlines()


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="reads the TCP state through Linux's TCP_INFO")
async def test_removing_a_stream_ends_the_connection_of_a_client_that_does_not_read(
    live_server, null_config
) -> None:
    """Its close frame cannot go out (the client's window is full), so its connection is reset
    instead of staying open on the server for as long as the client stays."""
    srv = live_server(null_config)
    add_stream(srv, id="demo", source="demo")
    path = srv.stream_ws("demo", format="raw").split(str(srv.port), 1)[1]
    stalled = stalled_websocket(srv.port, path)
    try:
        deadline = time.monotonic() + 10
        while not [c for c in srv.app.state.hub.clients("demo") if c.dropped_slow > 0]:
            assert time.monotonic() < deadline, "the client's window did not fill"
            await asyncio.sleep(0.1)
        assert httpx.delete(f"{srv.url}/api/streams/demo", timeout=10).status_code == 204
        deadline = time.monotonic() + 15
        while tcp_state(stalled) == ESTABLISHED:
            assert time.monotonic() < deadline, "the client of a removed stream is still connected"
            await asyncio.sleep(0.1)
    finally:
        stalled.close()
