"""Operations against a real server: readiness, limits with clear errors, metrics after faults."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipeline.config import AppConfig, EngineConfig, LimitsConfig, ReconnectConfig, StreamConfig
from tests.helpers_video import make_test_video
from tests.integration.fakes_net import MjpegServer
from tests.integration.serve_process import ServeProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

FAST = ReconnectConfig(initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.1, stall_timeout_s=2.0)


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample of ``/metrics``."""
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_readyz_is_503_while_warming_up_then_200_with_a_stream_summary(live_server, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app

    clip = make_test_video(tmp_path / "c.mp4", frames=20, width=64, height=48)
    cfg = AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1),
        streams=[StreamConfig(id="cam", source=f"{clip}?loop=1")],
    )
    # Without the lifespan the model is not loaded and the engine not started: not ready.
    cold = TestClient(create_app(cfg)).get("/readyz")
    assert cold.status_code == 503
    assert cold.json()["ready"] is False and "warming up" in cold.json()["reason"]
    srv = live_server(cfg)
    assert httpx.get(f"{srv.url}/healthz", timeout=5).json() == {"status": "ok"}
    body = wait_for(
        lambda: (
            (r := httpx.get(f"{srv.url}/readyz", timeout=5)).status_code == 200
            and r.json()["streams"]["cam"]["frames"] > 0
            and r.json()
        ),
        20,
        "ready with frames",
    )
    assert body["checks"] == {
        "started": True,
        "model_loaded": True,
        "engine_running": True,
        "accepting": True,
    }
    assert body["streams"]["cam"]["state"] == "streaming"


def test_metrics_reflect_drops_state_and_reconnects_after_a_source_failure(live_server) -> None:
    camera = MjpegServer(fps=30, width=64, height=48)
    # A latency budget nobody can meet: every frame reaching the engine is dropped as stale.
    cfg = AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1, latency_budget_ms=0.001),
        reconnect=FAST,
        streams=[StreamConfig(id="cam", source=f"http://127.0.0.1:{camera.port}/v?format=mpjpeg")],
    )
    srv = live_server(cfg)
    try:
        m = wait_for(
            lambda: (
                (s := scrape(srv.url)).get('segstream_stream_drops_total{cause="stale",stream="cam"}', 0) >= 5
                and s
            ),
            20,
            "stale drops in /metrics",
        )
        assert m['segstream_stream_state{state="streaming",stream="cam"}'] == 1
        assert m['segstream_stream_frames_in_total{stream="cam"}'] >= 5
        assert m['segstream_stream_frames_out_total{stream="cam"}'] == 0
        assert m['segstream_stream_reconnects_total{stream="cam"}'] == 0
    finally:
        camera.close()  # the camera goes away
    m = wait_for(
        lambda: (s := scrape(srv.url)).get('segstream_stream_reconnects_total{stream="cam"}', 0) >= 1 and s,
        20,
        "a reconnect in /metrics",
    )
    assert m['segstream_stream_up{stream="cam"}'] == 0
    assert m['segstream_stream_state{state="streaming",stream="cam"}'] == 0
    assert m["segstream_streams"] == 1


def test_a_stream_is_not_up_once_the_engine_thread_died(live_server) -> None:
    """Its source still streams, but nothing is segmented any more (``/healthz`` fails and the
    stream's error names the dead engine): ``segstream_stream_up`` says 0."""
    cfg = AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1),
        streams=[StreamConfig(id="cam", source="demo")],
    )
    srv = live_server(cfg)
    wait_for(lambda: scrape(srv.url).get('segstream_stream_up{stream="cam"}') == 1, 20, "the stream up")
    engine = srv.app.state.manager.engine

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("batcher broke")

    engine._batcher.poll = broken
    wait_for(lambda: not engine.alive, 10, "the engine thread to end")
    assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 503
    assert "engine thread died" in httpx.get(f"{srv.url}/api/streams/cam", timeout=5).json()["error"]
    m = scrape(srv.url)
    assert m['segstream_stream_state{state="streaming",stream="cam"}'] == 1  # the camera is fine
    assert m['segstream_stream_up{stream="cam"}'] == 0
    assert m["segstream_engine_up"] == 0


def test_stage_latency_histograms_fill_while_streaming(live_server, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "c.mp4", frames=20, width=64, height=48)
    cfg = AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1),
        streams=[StreamConfig(id="cam", source=f"{clip}?loop=1")],
    )
    srv = live_server(cfg)
    key = 'segstream_stage_latency_seconds_count{stage="infer",stream="cam"}'
    m = wait_for(lambda: (s := scrape(srv.url)).get(key, 0) >= 10 and s, 20, "infer latency observations")
    assert m['segstream_latency_seconds_count{stream="cam"}'] >= 10
    assert m['segstream_engine_batch_size_bucket{le="+Inf"}'] >= 1
    assert m["segstream_engine_up"] == 1 and m["segstream_engine_ready"] == 1
    assert m["process_resident_memory_bytes"] > 0


def test_source_above_the_pixel_limit_fails_with_an_error_naming_it(live_server, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "big.mp4", frames=5, width=128, height=96)
    cfg = AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1),
        limits=LimitsConfig(max_source_pixels=64 * 48),
        streams=[StreamConfig(id="big", source=str(clip))],
    )
    srv = live_server(cfg)
    info = wait_for(
        lambda: (r := httpx.get(f"{srv.url}/api/streams/big", timeout=5).json())["state"] == "failed" and r,
        20,
        "the stream to fail",
    )
    assert "128x96" in info["error"] and "limit of 3072 pixels" in info["error"]
    m = scrape(srv.url)
    assert m['segstream_stream_state{state="failed",stream="big"}'] == 1


def test_request_body_limit(live_server) -> None:
    srv = live_server(AppConfig(default_model="null", limits=LimitsConfig(max_request_bytes=1024)))
    r = httpx.post(f"{srv.url}/api/streams", content=b"{" + b" " * 4000 + b"}", timeout=5)
    assert r.status_code == 413
    assert "limit 1024 bytes" in r.json()["detail"]


def _close_code(url: str, send: str | None = None) -> int:
    with connect(url, open_timeout=5, close_timeout=2, max_size=None) as ws:
        if send is not None:
            ws.send(send)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code


def test_limits_from_a_config_file_are_enforced(tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "c.mp4", frames=20, width=64, height=48)
    conf = tmp_path / "segstream.toml"
    conf.write_text(
        f"""
        default_model = "null"
        [engine]
        threads = 1
        [limits]
        max_streams = 1
        max_clients_per_stream = 1
        max_ws_message_bytes = 1024
        [[streams]]
        id = "cam"
        source = "{clip}?loop=1"
        """
    )
    srv = ServeProcess(["--config", str(conf)], log_path=tmp_path / "serve.log")
    try:
        srv.wait_ready()
        # max_streams: a second stream is refused with 429 and the limit in the message
        r = httpx.post(f"{srv.url}/api/streams", json={"id": "two", "source": "demo"}, timeout=10)
        assert r.status_code == 429, r.text
        assert re.search(r"stream limit reached \(1 streams?\)", r.json()["detail"])
        ws_url = f"{srv.ws_url}/ws/streams/cam?format=rle"
        with connect(ws_url, open_timeout=5, close_timeout=2) as first:
            first.recv(timeout=10)
            # max_clients_per_stream: the second client is closed with 4429
            assert _close_code(ws_url) == 4429
            # the first client is unaffected
            msg = first.recv(timeout=10)
            assert json.loads(msg[4 : 4 + int.from_bytes(msg[:4], "big")])["stream"] == "cam"
        # max_ws_message_bytes: an oversized control message closes with 1009 (message too big)
        assert _close_code(ws_url, send="x" * 4096) == 1009
        # ... and the server keeps serving
        assert httpx.get(f"{srv.url}/readyz", timeout=5).status_code == 200
    finally:
        srv.close()
