"""Shared fixtures for integration tests: a real uvicorn serving the real app on 127.0.0.1.

    def test_something(live_server):
        srv = live_server(AppConfig(default_model="null"))
        httpx.get(f"{srv.url}/api/streams")

``live_server(config)`` starts uvicorn in a background thread on a free port, waits (bounded)
until it accepts connections, and stops it at teardown, failing the test if it leaves
non-daemon threads behind (a pipeline thread that does not stop is a bug).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.serve_process import ServeProcess

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    ws_url: str  # ws://127.0.0.1:PORT
    app: Any  # the FastAPI app (app.state.manager, app.state.hub, app.state.config)
    server: Any  # uvicorn.Server
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stream_ws(self, stream_id: str, **params: Any) -> str:
        from urllib.parse import urlencode

        query = urlencode({k: v for k, v in params.items() if v is not None})
        return f"{self.ws_url}/ws/streams/{stream_id}" + (f"?{query}" if query else "")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"uvicorn did not stop within {timeout:.0f} s")


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def start_server(config: Any = None, *, manager: Any = None, timeout: float = START_TIMEOUT_S) -> LiveServer:
    """Start the app from ``config`` (default: the ``null`` model, no streams) under uvicorn."""
    import uvicorn

    from pipeline.config import AppConfig
    from server.app import create_app, uvicorn_options

    if config is None:
        config = AppConfig(default_model="null")
    app = create_app(config, manager=manager)
    sock = _free_socket()
    port = sock.getsockname()[1]
    uv_config = uvicorn.Config(app, log_level="warning", **uvicorn_options(config))
    server = uvicorn.Server(uv_config)
    # Signals belong to pytest; the fixture stops the server through should_exit.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # surfaced by the fixture, never swallowed
            errors.append(e)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if errors or not thread.is_alive():
            raise RuntimeError(f"server failed to start: {errors[0] if errors else 'thread ended'}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"server did not start within {timeout:.0f} s")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    return LiveServer(
        url=url, ws_url=f"ws://127.0.0.1:{port}", app=app, server=server, thread=thread, errors=errors
    )


def _non_daemon_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()}


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``live_server(config=None, *, manager=None) -> LiveServer``; stopped at teardown."""
    before = _non_daemon_threads()
    started: list[LiveServer] = []

    def factory(config: Any = None, *, manager: Any = None, timeout: float = START_TIMEOUT_S) -> LiveServer:
        srv = start_server(config, manager=manager, timeout=timeout)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    stray = _non_daemon_threads() - before
    while stray and time.monotonic() < deadline:
        time.sleep(0.05)
        stray = {t for t in stray if t.is_alive()}
    assert not stray, f"threads left running after the server stopped: {sorted(t.name for t in stray)}"
    for srv in started:
        assert not srv.errors, f"server thread raised: {srv.errors[0]!r}"


@pytest.fixture
def null_config() -> Any:
    """A fast configuration: the zero-cost ``null`` model, one torch thread, no streams."""
    from pipeline.config import AppConfig, EngineConfig

    return AppConfig(default_model="null", engine=EngineConfig(threads=1, encode_workers=2))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``segstream serve`` processes (``serve(*args)``); each is killed at the end."""
    started: list[ServeProcess] = []

    def factory(*args: str) -> ServeProcess:
        p = ServeProcess(list(args), log_path=tmp_path / f"serve{len(started)}.log")
        started.append(p)
        return p

    yield factory
    for p in started:
        p.close()
