"""Browser-camera upstream (/ws/ingest) driven from Python: listing, back-pressure, stale, removal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline.config import ReconnectConfig
from pipeline.render import encode_jpeg
from server.client import decode, unpack
from tests.helpers_video import pattern_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def framed(i: int, t: float) -> bytes:
    jpeg = encode_jpeg(pattern_frame(i, width=96, height=64), 85)
    header = json.dumps({"t": t}).encode()
    return struct.pack(">I", len(header)) + header + jpeg


async def recv_json(ws, timeout: float = 5.0) -> dict:
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, str):
            return json.loads(msg)


async def recv_header(ws, kind: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            header, payload = unpack(msg)
            if header["type"] == kind:
                decode(header, payload)
                return header


async def test_pushed_pictures_become_a_listed_stream_that_goes_stale_and_resumes(
    live_server, null_config
) -> None:
    config = null_config.model_copy(update={"reconnect": ReconnectConfig(stall_timeout_s=0.5)})
    srv = live_server(config)
    async with connect(f"{srv.ws_url}/ws/ingest?id=laptop&max_fps=50", open_timeout=5) as up:
        ready = await recv_json(up)
        assert ready == {"type": "ready", "stream": "laptop", "model": "null", "max_fps": 50.0}
        listed = httpx.get(f"{srv.url}/api/streams/laptop", timeout=5).json()
        assert listed["kind"] == "push" and listed["source"] == "push:laptop"
        async with connect(srv.stream_ws("laptop", format="raw"), open_timeout=5) as down:
            t_sent = {}
            for i in range(10):  # one picture per ack: the sender never queues
                t_sent[i] = time.time()
                await up.send(framed(i, t_sent[i]))
                assert (await recv_json(up))["type"] == "ack"
            header = await recv_header(down, "result")
            assert (header["width"], header["height"]) == (96, 64)
            assert header["pts"] in t_sent.values()  # the browser's capture time comes back
            # The browser stops sending: clients are told the stream is stale ...
            status = await recv_header(down, "status", timeout=10)
            while not status["stale"]:
                status = await recv_header(down, "status", timeout=10)
            assert status["state"] in ("stalled", "reconnecting", "connecting")
            # ... and results resume when pictures come again.
            deadline = time.monotonic() + 10
            got = None
            i = 100
            while got is None:
                assert time.monotonic() < deadline, "results did not resume"
                await up.send(framed(i, time.time()))
                await recv_json(up)
                i += 1
                with contextlib.suppress(TimeoutError):
                    got = await recv_header(down, "result", timeout=0.3)
            assert got["stale"] is False
    # The browser left: the stream is gone.
    deadline = time.monotonic() + 5
    while httpx.get(f"{srv.url}/api/streams/laptop", timeout=5).status_code != 404:
        assert time.monotonic() < deadline, "stream not removed after the browser left"
        await asyncio.sleep(0.05)


async def test_ingest_rejects_bad_input_and_keeps_serving(live_server, null_config) -> None:
    srv = live_server(null_config)
    for query, code, needle in [
        ("?model=nope", 4400, "unknown model"),
        ("?max_fps=0", 4400, "max_fps"),
        ("?id=bad%20id", 4400, "id"),
    ]:
        async with connect(f"{srv.ws_url}/ws/ingest{query}", open_timeout=5) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == code and needle in ws.close_reason, (query, ws.close_reason)
    async with connect(f"{srv.ws_url}/ws/ingest?id=cam", open_timeout=5) as up:
        await recv_json(up)
        async with connect(f"{srv.ws_url}/ws/ingest?id=cam", open_timeout=5) as dup:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(dup.recv(), 5)
            assert dup.close_code == 4409
        await up.send(b"not a picture")
        assert "bad picture" in (await recv_json(up))["error"]
        await up.send("hello")
        assert (await recv_json(up))["type"] == "error"
        await up.send(encode_jpeg(np.zeros((32, 48, 3), np.uint8), 80))  # a bare JPEG works too
        assert (await recv_json(up))["type"] == "ack"
        # Removing the stream through the API ends the upload with 4410.
        assert httpx.delete(f"{srv.url}/api/streams/cam", timeout=5).status_code == 204
        await up.send(framed(1, time.time()))
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(up.recv(), 5)
        assert up.close_code == 4410
