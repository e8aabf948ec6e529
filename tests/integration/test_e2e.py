"""The first user story end to end: a real uvicorn, a real encoded clip, a websocket client."""

import asyncio
import json
import struct
import threading
import time

import httpx
import websockets

from pipeline.config import AppConfig, EngineConfig, StreamConfig
from pipeline.render import decode_jpeg
from tests.helpers_video import make_test_video


def unpack(msg: bytes):
    (n,) = struct.unpack(">I", msg[:4])
    return json.loads(msg[4 : 4 + n]), msg[4 + n :]


async def collect(url: str, count: int, timeout: float = 60.0):
    out = []
    async with websockets.connect(url, open_timeout=10) as ws:
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(out)} results within {timeout}s"
            header, payload = unpack(await asyncio.wait_for(ws.recv(), remaining))
            if header["type"] == "result":
                out.append((header, payload))
    return out


def test_file_source_to_websocket_client_and_delete(live_server, tmp_path):
    clip = make_test_video(tmp_path / "clip.mp4", frames=60, width=160, height=120, fps=30)
    cfg = AppConfig(
        default_model="selfie",
        engine=EngineConfig(threads=1),
        streams=[StreamConfig(id="cam", source=f"{clip}?loop=1")],
    )
    srv = live_server(cfg)
    results = asyncio.run(collect(srv.stream_ws("cam", format="overlay", quality=70), 30))
    indexes = [h["frame"] for h, _ in results]
    assert all(b > a for a, b in zip(indexes, indexes[1:], strict=False)), indexes
    for header, payload in results:
        assert header["v"] == 1 and header["stream"] == "cam" and header["format"] == "overlay"
        assert (header["width"], header["height"]) == (160, 120)
        assert decode_jpeg(payload).shape == (120, 160, 3)
        assert header["sent_at"] >= header["captured_at"] > 0
        assert header["classes"] == ["background", "person"]
        assert {"decode", "queue", "infer", "encode", "send"} <= set(header["latency_ms"])

    info = httpx.get(f"{srv.url}/api/streams/cam", timeout=10).json()
    assert info["state"] == "streaming" and info["frames"] >= 30 and info["model"] == "selfie"

    assert any(t.name == "source-cam" for t in threading.enumerate())
    r = httpx.delete(f"{srv.url}/api/streams/cam", timeout=15)
    assert r.status_code == 204
    assert not any(t.name == "source-cam" for t in threading.enumerate())
    assert httpx.get(f"{srv.url}/api/streams/cam", timeout=10).status_code == 404


def test_bad_requests_get_4xx_and_the_other_stream_keeps_flowing(live_server, tmp_path):
    clip = make_test_video(tmp_path / "clip.mp4", frames=30, width=96, height=64, fps=30)
    cfg = AppConfig(default_model="null", streams=[StreamConfig(id="ok", source=f"{clip}?loop=1")])
    srv = live_server(cfg)
    api = f"{srv.url}/api/streams"
    bad = [
        ({"source": "demo", "model": "no-such-model"}, 400, "no-such-model"),
        ({"source": str(tmp_path / "missing.mp4")}, 400, "not found"),
        ({"source": str(clip)}, 400, "media directory"),  # no --media-dir: no files over the API
        ({"source": "gopher://x/y"}, 400, "gopher"),
        ({"source": "demo", "id": "ok"}, 409, "already exists"),
        ({"source": ""}, 422, ""),
        ({"sauce": "demo"}, 422, ""),
    ]
    for body, status, needle in bad:
        r = httpx.post(api, json=body, timeout=10)
        assert r.status_code == status, (body, r.text)
        assert needle in r.text
    assert httpx.delete(f"{api}/nope", timeout=10).status_code == 404
    before = httpx.get(f"{api}/ok", timeout=10).json()["frames"]
    deadline = time.monotonic() + 20
    while httpx.get(f"{api}/ok", timeout=10).json()["frames"] <= before + 5:
        assert time.monotonic() < deadline, "the healthy stream stopped while bad requests came in"
        time.sleep(0.1)
