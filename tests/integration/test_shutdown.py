"""``segstream serve`` as a real process: SIGTERM/SIGINT while streaming end it cleanly and quickly."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.helpers_video import make_test_video
from tests.integration.serve_process import EXIT_BOUND_S

pytestmark = pytest.mark.integration

@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_test_video(tmp_path / "clip.mp4", frames=30, width=96, height=64, fps=30)


def _first_result(ws) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        msg = ws.recv(timeout=5)
        if isinstance(msg, bytes):
            n = int.from_bytes(msg[:4], "big")
            header = json.loads(msg[4 : 4 + n])
            if header["type"] == "result":
                return header
    raise AssertionError("no result message within 15 s")


def test_sigterm_while_streaming_closes_websockets_going_away_and_exits_0(serve, clip: Path) -> None:
    srv = serve("--model", "null", "--source", f"cam={clip}?loop=1", "--device", "cpu")
    srv.wait_ready()
    with connect(f"{srv.ws_url}/ws/streams/cam?format=rle", open_timeout=5, close_timeout=2) as ws:
        assert _first_result(ws)["stream"] == "cam"
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # results may still be in flight; the close frame comes after them
                ws.recv(timeout=EXIT_BOUND_S)
        assert closed.value.rcvd is not None, "the server dropped the connection without a close frame"
        assert closed.value.rcvd.code == 1001, closed.value.rcvd
    rc = srv.proc.wait(EXIT_BOUND_S)
    elapsed = time.monotonic() - t0
    log = srv.log()
    assert rc == 0, log
    assert elapsed < EXIT_BOUND_S
    assert "segstream stopped" in log and "stream cam: removed" in log, log
    assert "Traceback" not in log, log


def test_sigint_with_two_streams_exits_0(serve, clip: Path) -> None:
    srv = serve("--model", "null", "--source", f"a={clip}?loop=1", "--source", f"b={clip}?loop=1")
    srv.wait_ready()
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(EXIT_BOUND_S) == 0, srv.log()
    log = srv.log()
    assert "stream a: removed" in log and "stream b: removed" in log, log
    assert "still running" not in log, log


def test_sources_stuck_in_an_open_are_interrupted_at_shutdown_and_exit_0(serve, tmp_path: Path) -> None:
    """Three cameras that accept the connection and never answer, with a 30 s open timeout:
    the shutdown interrupts their opens instead of waiting for them, and exits 0 well within
    ``shutdown_timeout_s``. (Sources blocked in a call that cannot be interrupted are waited
    for together and named: tests/unit/test_manager_replace.py.)"""
    with socket.socket() as mute:  # listens, never answers (the kernel completes the handshake)
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        port = mute.getsockname()[1]
        config = tmp_path / "stuck.toml"
        lines = ["[server]", "shutdown_timeout_s = 5", ""]
        for name in ("a", "b", "c"):
            lines += [
                "[[streams]]",
                f'id = "{name}"',
                f'source = "http://127.0.0.1:{port}/{name}.mjpg?open_timeout=30"',
                "",
            ]
        config.write_text("\n".join(lines))
        srv = serve("--model", "null", "--config", str(config))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "segstream ready" not in srv.log():
            assert srv.proc.poll() is None, srv.log()
            time.sleep(0.1)
        time.sleep(0.5)  # the three sources are inside their open now
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        rc = srv.proc.wait(EXIT_BOUND_S)
        took = time.monotonic() - t0
    log = srv.log()
    assert rc == 0, log
    assert took < 3.0, f"shutdown took {took:.1f} s with three stuck sources\n{log}"
    assert all(f"stream {name}: removed" in log for name in "abc"), log
    assert "did not stop" not in log and "Traceback" not in log, log


def test_a_start_up_failure_stops_what_had_started(caplog) -> None:
    """A failure only start-up can see (here: the second stream cannot be added once the
    engine runs) is one clear error, and the engine thread and the stream already added are
    stopped, so the process can end (no abort on a live torch thread)."""
    from fastapi.testclient import TestClient

    from pipeline.config import AppConfig, EngineConfig, StreamConfig
    from pipeline.manager import StreamManager
    from server.app import create_app

    config = AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1, encode_workers=1),
        streams=[StreamConfig(id="a", source="demo")],
    )
    mgr = StreamManager(config)
    real_start = mgr.start

    def start() -> None:
        real_start()
        raise RuntimeError("the device went away")

    mgr.start = start  # type: ignore[method-assign]
    app = create_app(config, manager=mgr)
    with caplog.at_level("ERROR", logger="segstream.server"), pytest.raises(RuntimeError), TestClient(app):
        pass
    assert any("cannot start: the device went away" in r.getMessage() for r in caplog.records)
    assert not mgr.engine.alive
    assert mgr.list() == []


def test_an_engine_stuck_in_a_model_call_is_named_at_shutdown(caplog) -> None:
    """A library user of StreamManager.shutdown() learns why it returned False."""
    import threading

    from pipeline.config import AppConfig, EngineConfig, StreamConfig
    from pipeline.manager import StreamManager

    mgr = StreamManager(AppConfig(default_model="null", engine=EngineConfig(threads=1, encode_workers=1)))
    make = mgr.engine._factory
    entered, release = threading.Event(), threading.Event()

    def stuck_factory(name):
        seg = make(name)
        infer = seg.infer

        def stuck(x):
            entered.set()
            release.wait(10)
            return infer(x)

        seg.infer = stuck
        return seg

    mgr.engine._factory = stuck_factory
    mgr.start()
    try:
        mgr.add(StreamConfig(id="a", source="demo"))
        assert entered.wait(20), "no batch reached the model"
        with caplog.at_level("ERROR", logger="segstream.manager"):
            assert mgr.shutdown(timeout=0.5) is False
        assert any("the engine did not stop within" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        release.set()
        assert mgr.engine.stop(10)


START_FAILS = """
import sys
from pipeline.config import AppConfig, EngineConfig, ServerConfig
from pipeline.manager import StreamManager
from server.app import create_app
from server.cli import serve_app

cfg = AppConfig(default_model="null", engine=EngineConfig(threads=1), server=ServerConfig(port=0))
mgr = StreamManager(cfg, restrict_files=True)
real_start = mgr.start

def start():
    real_start()
    raise RuntimeError("the device went away")

mgr.start = start
sys.exit(serve_app(create_app(cfg, manager=mgr), cfg))
"""


def test_a_start_up_failure_under_the_server_is_said_in_lines_not_a_traceback(tmp_path: Path) -> None:
    """What failed is logged once (``cannot start: …``); the server's own report of the failed
    start-up is the error's line, not Starlette's traceback; the status is 3."""
    import subprocess
    import sys

    script = tmp_path / "start_fails.py"
    script.write_text(START_FAILS)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "cannot start: the device went away" in out
    assert "RuntimeError: the device went away" in out
    assert "Traceback" not in out, out
