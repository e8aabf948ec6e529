"""Bad input on the websockets: every malformed message gets an answer, never a dropped connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline.render import encode_jpeg
from tests.integration.serve_process import EXIT_BOUND_S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def strict_json(text: str | bytes) -> object:
    """json.loads as a browser's JSON.parse: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@contextlib.asynccontextmanager
async def camera(srv, query: str = "") -> AsyncIterator[Any]:
    """A camera upload to stream ``cam``, past the server's ``ready``."""
    async with connect(f"{srv.ws_url}/ws/ingest?id=cam{query}", open_timeout=5) as up:
        assert (await recv_text(up))["type"] == "ready"
        yield up


def picture() -> bytes:
    return encode_jpeg(np.full((48, 64, 3), 120, np.uint8), 85)


def framed(header: bytes, jpeg: bytes) -> bytes:
    return struct.pack(">I", len(header)) + header + jpeg


async def recv_text(ws, timeout: float = 5.0) -> dict:
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, str):
            return strict_json(msg)  # type: ignore[return-value]


async def closed_with(ws, timeout: float = 5.0) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed) as e:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert e.value.rcvd is not None, "the server dropped the connection without a close frame"
    return e.value.rcvd.code, e.value.rcvd.reason


CONTROL = [
    '{"quality":1e999}',
    '{"quality":Infinity}',
    '{"max_fps":NaN}',
    '{"max_fps":-Infinity}',
    "[" * 30000 + "]" * 30000,
    '{"a":' * 10000 + "1" + "}" * 10000,
    '{"quality":' + "9" * 5000 + "}",
    '{"quality":true}',
    '{"format":"' + "é" * 20000 + '"}',
    "not json",
]


async def test_malformed_control_messages_get_an_error_and_the_connection_stays_open(
    live_server, null_config
) -> None:
    srv = live_server(null_config)
    async with (
        camera(srv),
        connect(srv.stream_ws("cam", format="rle"), open_timeout=5, max_size=None) as ws,
    ):
        for text in CONTROL:
            await ws.send(text)
            reply = await recv_text(ws)
            assert reply["type"] == "error", (text[:40], reply)
            assert "bad control message" in reply["error"], (text[:40], reply)
        await ws.send('{"max_fps": 5, "quality": 70}')
        settings = await recv_text(ws)
        assert settings == {"type": "settings", "format": "rle", "max_fps": 5.0, "quality": 70}


async def test_a_non_finite_capture_time_is_a_bad_picture_and_viewers_only_get_json(
    live_server, null_config
) -> None:
    srv = live_server(null_config)
    async with (
        camera(srv, "&max_fps=100") as up,
        connect(srv.stream_ws("cam", format="rle"), open_timeout=5) as viewer,
    ):
        for header in (b'{"t": NaN}', b'{"t": Infinity}', b'{"t": 1e999}', b'{"t": -Infinity}'):
            await up.send(framed(header, picture()))
            reply = await recv_text(up)
            assert reply["type"] == "error" and "bad picture" in reply["error"], (header, reply)
        t = time.time()
        await up.send(framed(json.dumps({"t": t}).encode(), picture()))
        assert (await recv_text(up))["type"] == "ack"
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "no result"
            msg = await asyncio.wait_for(viewer.recv(), 5)
            assert isinstance(msg, bytes)
            (n,) = struct.unpack(">I", msg[:4])
            header = strict_json(msg[4 : 4 + n])
            assert isinstance(header, dict)
            if header["type"] == "result":
                assert header["pts"] == t
                break


def claiming_size(jpeg: bytes, width: int, height: int) -> bytes:
    at = jpeg.index(b"\xff\xc0")  # SOF0: length, precision, height, width
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


async def test_an_oversized_picture_is_refused_before_it_is_decoded(
    live_server, null_config, monkeypatch
) -> None:
    import server.ingest as ingest

    decoded: list[int] = []
    real = ingest.decode_jpeg

    def spy(data: bytes) -> np.ndarray:
        decoded.append(len(data))
        return real(data)

    monkeypatch.setattr(ingest, "decode_jpeg", spy)
    srv = live_server(null_config)
    async with camera(srv) as up:
        await up.send(framed(b'{"t": 1.0}', picture()))
        assert (await recv_text(up))["type"] == "ack"
        assert decoded
        decoded.clear()
        await up.send(framed(b'{"t": 2.0}', claiming_size(picture(), 12000, 12000)))
        code, reason = await closed_with(up)
    assert code == 4400 and "12000x12000" in reason and "too large" in reason, reason
    assert decoded == []


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("id=../x", "invalid stream id '../x': use 1-64 of A-Z a-z 0-9 _ . -"),
        ("id=..", "invalid stream id '..'"),
        ("id=" + quote("é" * 100), "invalid stream id"),
        ("model=" + quote("é" * 100), "unknown model"),
        ("max_fps=" + quote("é" * 100), "max_fps"),
        ("max_fps=nan", "max_fps"),
    ],
)
async def test_bad_ingest_parameters_close_with_a_reason_that_says_what_is_wrong(
    live_server, null_config, query: str, needle: str
) -> None:
    srv = live_server(null_config)
    async with connect(f"{srv.ws_url}/ws/ingest?{query}", open_timeout=5) as ws:
        code, reason = await closed_with(ws)
    assert code == 4400 and needle in reason, reason
    assert len(reason.encode("utf-8")) <= 123


async def test_a_long_non_ascii_bad_parameter_on_the_results_websocket_still_gets_a_close_frame(
    live_server, null_config
) -> None:
    srv = live_server(null_config)
    async with connect(f"{srv.ws_url}/ws/streams/x?format={quote('é' * 100)}", open_timeout=5) as ws:
        code, reason = await closed_with(ws)
    assert code == 4400 and "unknown format" in reason, reason


async def test_a_camera_that_leaves_is_logged_at_info_not_error(live_server, null_config, caplog) -> None:
    caplog.set_level(logging.INFO)
    srv = live_server(null_config)
    for sid, pictures in (("early", 0), ("later", 3)):
        async with connect(f"{srv.ws_url}/ws/ingest?id={sid}&max_fps=100", open_timeout=5) as up:
            assert (await recv_text(up))["type"] == "ready"
            for i in range(pictures):
                await up.send(framed(json.dumps({"t": float(i)}).encode(), picture()))
                assert (await recv_text(up))["type"] == "ack"
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + 5
        while httpx.get(f"{srv.url}/api/streams/{sid}", timeout=5).status_code != 404:
            assert time.monotonic() < deadline, "stream not removed after the camera left"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything the source thread would still log
    noisy = [r for r in caplog.records if r.name.startswith("segstream") and r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    left = [
        r.getMessage() for r in caplog.records if r.name == "segstream.ingest" and r.levelno == logging.INFO
    ]
    assert any("early: browser camera left" in m for m in left), left


async def test_sigterm_closes_the_camera_ingest_with_1001(serve) -> None:
    srv = serve("--model", "null", "--device", "cpu")
    srv.wait_ready()
    async with camera(srv) as up:
        await up.send(framed(b'{"t": 1.0}', picture()))
        assert (await recv_text(up))["type"] == "ack"
        os.kill(srv.proc.pid, signal.SIGTERM)
        code, reason = await closed_with(up, timeout=EXIT_BOUND_S)
    assert code == 1001, (code, reason)
    rc = await asyncio.to_thread(srv.proc.wait, EXIT_BOUND_S)
    log = srv.log()
    assert rc == 0, log
    assert "stream cam: removed" in log and "Traceback" not in log, log
    assert " ERROR " not in log and " WARNING " not in log, log
