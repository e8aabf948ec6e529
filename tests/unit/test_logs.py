"""Structured logging: stream ids on stream lines, JSON lines, rate limiting of repeats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from pipeline.types import StreamState
from server.logs import RateLimit, setup_logging


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_plain_lines_carry_the_stream_id(restore_root: None) -> None:
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    log = logging.getLogger("segstream.source")
    log.warning("stream %s: connection refused; reconnecting in %.1f s (attempt %d)", "cam-1", 0.5, 1)
    log.info("added", extra={"stream": "cam2"})
    log.info("engine started")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert "[stream=cam-1]" in lines[0] and "WARNING" in lines[0] and "segstream.source" in lines[0]
    assert "[stream=cam2]" in lines[1]
    assert "[stream=" not in lines[2]


def test_json_lines_are_one_object_per_event_even_with_a_traceback(restore_root: None) -> None:
    buf = io.StringIO()
    setup_logging("info", json_lines=True, stream=buf)
    log = logging.getLogger("segstream.engine")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("stream %s: model failed", "s1")
    log.info("plain")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["stream"] == "s1" and first["level"] == "error" and "RuntimeError" in first["exc"]
    assert "stream" not in json.loads(lines[1])


def test_plain_traceback_stays_on_one_line(restore_root: None) -> None:
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("segstream.x").exception("stream %s: failed", "a")
    assert len(buf.getvalue().splitlines()) == 1
    assert "ValueError: bad" in buf.getvalue()


def test_a_dead_camera_does_not_flood_the_log(restore_root: None) -> None:
    clock = Clock()
    buf = io.StringIO()
    handler = setup_logging("info", stream=buf, rate_limit_s=60, burst=3)
    limiter = next(f for f in handler.filters if isinstance(f, RateLimit))
    limiter._clock = clock
    log = logging.getLogger("segstream.source")
    # a camera retrying every 2 s for 10 minutes, next to a healthy camera logging once
    for i in range(300):
        log.warning("stream %s: refused; reconnecting in %.1f s (attempt %d)", "dead", 2.0, i + 1)
        clock.t += 2.0
    log.warning("stream %s: refused; reconnecting in %.1f s (attempt %d)", "other", 2.0, 1)
    lines = buf.getvalue().splitlines()
    dead = [ln for ln in lines if "[stream=dead]" in ln]
    assert 10 * 3 <= len(dead) <= 11 * 3  # `burst` lines per minute instead of 30
    assert any("27 similar messages suppressed" in ln for ln in dead)
    assert sum("[stream=other]" in ln for ln in lines) == 1  # another stream is not held back


def test_a_camera_whose_error_changes_is_reported_at_once(restore_root: None) -> None:
    """The stream worker keys its reconnect line's rate limit by the error as well: a repeated
    error is held back, a new one (refused, then 404) is reported at once."""
    from pipeline.config import ReconnectConfig
    from pipeline.slot import FrameSlot
    from pipeline.sources.base import Source, SourceError
    from pipeline.stream import StreamWorker
    from tests.unit.test_stream import fake_spec

    errors = ["connection refused"] * 6 + ["server answered 404 Not Found (wrong path or stream name?)"] * 6

    class Failing(Source):
        def open(self):  # type: ignore[no-untyped-def]
            raise SourceError(errors.pop(0) if len(errors) > 1 else errors[0])

        def frames(self):  # type: ignore[no-untyped-def]
            return iter(())

        def close(self) -> None:
            pass

    buf = io.StringIO()
    setup_logging("info", stream=buf, rate_limit_s=60, burst=2)
    fast = ReconnectConfig(initial_backoff_s=0.001, max_backoff_s=0.002, jitter=0.0, max_attempts=11)
    worker = StreamWorker("cam", fake_spec(Failing), FrameSlot(), reconnect=fast)
    worker.start()
    assert worker.wait_state({StreamState.FAILED}, timeout=5) is StreamState.FAILED
    lines = [ln for ln in buf.getvalue().splitlines() if "reconnecting in" in ln]
    assert sum("connection refused" in ln for ln in lines) == 2, lines  # held back after 2
    assert sum("404" in ln for ln in lines) == 2, lines  # the new error is not held back


def test_rate_limit_zero_disables_it_and_bad_values_are_rejected() -> None:
    f = RateLimit(interval_s=0)
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "same", None, None)
    assert all(f.filter(rec) for _ in range(100))
    with pytest.raises(ValueError, match="burst"):
        RateLimit(burst=0)
    with pytest.raises(ValueError, match="interval_s"):
        RateLimit(interval_s=-1)


def test_rate_limit_key_table_is_bounded() -> None:
    clock = Clock()
    f = RateLimit(interval_s=60, burst=1, clock=clock, max_keys=10)
    for i in range(1000):
        rec = logging.LogRecord("x", logging.INFO, __file__, 1, f"msg {i}", None, None)
        assert f.filter(rec)
    assert len(f._seen) <= 10


@pytest.mark.parametrize("json_lines", [False, True])
def test_tokens_and_passwords_never_reach_the_log(restore_root: None, json_lines: bool) -> None:
    """uvicorn logs each websocket's path with its query (the viewer's ``?token=``); sources
    may carry passwords. Every line has them masked, and JSON lines stay valid JSON."""
    buf = io.StringIO()
    setup_logging("info", json_lines=json_lines, stream=buf)
    logging.getLogger("uvicorn.error").info(
        '%s - "WebSocket %s" [%s]', "127.0.0.1:5", "/ws/streams/cam?format=rle&token=s3cr3t", "accepted"
    )
    logging.getLogger("segstream.source").warning("stream cam: connecting to %s", "http://c/v?pwd=hunter2")
    try:
        raise OSError("cannot open rtsp://admin:letmein@10.0.0.7/live")
    except OSError:
        logging.getLogger("segstream.source").exception("stream cam: open failed")
    text = buf.getvalue()
    for secret in ("s3cr3t", "hunter2", "letmein"):
        assert secret not in text, text
    assert "token=***" in text and "pwd=***" in text and "admin:***@" in text
    if json_lines:
        assert [json.loads(line)["level"] for line in text.splitlines()] == ["info", "warning", "error"]
