"""``segstream serve`` as a real process: SIGTERM/SIGINT while streaming end it cleanly and quickly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.helpers_video import make_test_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
EXIT_BOUND_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``python -m server.cli serve …`` on a free port; always killed at ``close``."""

    def __init__(self, args: list[str], *, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2.0)
                last = r.json()
                if r.status_code == 200 and all(s["state"] == "streaming" for s in last["streams"].values()):
                    return last
            except httpx.HTTPError as e:
                last = e
            time.sleep(0.1)
        raise AssertionError(f"not ready within {timeout:.0f} s (last: {last}):\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_test_video(tmp_path / "clip.mp4", frames=30, width=96, height=64, fps=30)


@pytest.fixture
def serve(tmp_path: Path):
    started: list[ServeProcess] = []

    def factory(*args: str) -> ServeProcess:
        p = ServeProcess(list(args), log_path=tmp_path / f"serve{len(started)}.log")
        started.append(p)
        return p

    yield factory
    for p in started:
        p.close()


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
