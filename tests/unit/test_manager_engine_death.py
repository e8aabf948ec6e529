"""The engine thread died: every stream says so, and stays saying so."""

from __future__ import annotations

import time

from pipeline.config import AppConfig, EngineConfig, StreamConfig
from pipeline.manager import StreamManager
from pipeline.types import SegmentationResult


def test_a_result_the_finisher_hands_on_after_the_engine_died_keeps_the_death_said() -> None:
    """The engine thread died while its finisher still held a batch: that batch's results come
    after the death was reported on every stream, and must not clear it (the stream would look
    healthy while nothing is segmented any more)."""
    mgr = StreamManager(AppConfig(default_model="null", engine=EngineConfig(device="cpu", threads=1)))
    got: list[SegmentationResult] = []
    mgr.result_listeners.append(got.append)
    mgr.start()
    try:
        handle = mgr.add(StreamConfig(id="cam", source="demo"))
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got, "no result"

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("batcher broke")

        mgr.engine._batcher.poll = broken  # type: ignore[method-assign]
        while mgr.engine.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not mgr.engine.alive
        assert "engine thread died" in (handle.engine_error or "")
        mgr.engine._on_result(got[-1])  # the finisher's last result, handed on after the death
        assert "engine thread died" in (handle.engine_error or ""), "the death was forgotten"
    finally:
        mgr.shutdown()
