"""Source threads stuck in a call that ignores interrupts (a host name lookup, a driver call):
when their stream is removed and added again under the same id, what is left of the old one
must not speak for the new one; at shutdown they are waited for together and named."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from pipeline.config import AppConfig, EngineConfig, SourceOptions, StreamConfig
from pipeline.manager import StreamManager
from pipeline.sources.base import RawFrame, Source, SourceError, SourceInfo
from pipeline.stream import StreamStatus
from pipeline.types import StreamState
from tests.unit.test_stream import FakeSpec


class StuckOpen(Source):
    """A camera whose open blocks in a call that interrupts cannot cut short (a name lookup
    against a dead DNS server, a driver call) until ``release`` is set."""

    uri = "stuck://cam"

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        self.entered, self.release = entered, release

    def open(self) -> SourceInfo:
        self.entered.set()
        self.release.wait(10)
        raise SourceError("cannot open: the camera did not answer", retryable=True)

    def frames(self) -> Iterator[RawFrame | None]:
        yield from ()

    def close(self) -> None:
        pass


def test_an_old_source_ending_after_its_id_was_reused_does_not_stop_the_new_stream() -> None:
    """DELETE (waiting for the old source thread) and POST of the same id at once: the old
    stream's end, said when the wait is over, is not the new stream's."""
    entered, release = threading.Event(), threading.Event()
    spec = FakeSpec(
        uri="stuck://cam", kind="network", options=SourceOptions(), display="stuck://cam",
        factory=lambda: StuckOpen(entered, release),
    )
    mgr = StreamManager(AppConfig(default_model="null", engine=EngineConfig(device="cpu", threads=1)))
    seen: list[tuple[str, StreamStatus]] = []
    mgr.status_listeners.append(lambda sid, st: seen.append((sid, st)))
    mgr.start()
    try:
        old = mgr.add(StreamConfig(id="cam", source="stuck://cam"), spec=spec)
        assert entered.wait(10)
        removed: list[bool] = []
        remover = threading.Thread(target=lambda: removed.append(mgr.remove("cam", timeout=1.0)))
        remover.start()
        while mgr.find("cam") is not None:  # the id is free as soon as the removal starts
            threading.Event().wait(0.01)
        mark = len(seen)
        new = mgr.add(StreamConfig(id="cam", source="demo"))
        remover.join(10)
        assert removed == [False]  # the old thread was still inside the open: it is stopped anyway
        late = [st.state for sid, st in seen[mark:] if sid == "cam" and st.state.terminal]
        assert late == [], f"the new stream was told it ended: {late}"
        release.set()
        assert old.worker.join(5)
        assert new.worker.wait_state({StreamState.STREAMING}, 10) is StreamState.STREAMING
        assert mgr.get("cam").describe()["state"] == "streaming"
    finally:
        release.set()
        assert mgr.shutdown()


def test_sources_stuck_in_calls_that_ignore_interrupts_are_waited_for_together(caplog) -> None:
    """Shutdown with three sources blocked in a call nothing can interrupt: waited for together
    within the timeout (not once per stream), named in the log, and reported (False)."""
    entered = [threading.Event() for _ in range(3)]
    release = threading.Event()
    mgr = StreamManager(AppConfig(default_model="null", engine=EngineConfig(device="cpu", threads=1)))
    mgr.start()
    try:
        for name, ev in zip("abc", entered, strict=True):
            spec = FakeSpec(uri="stuck://cam", kind="network", options=SourceOptions(), display="stuck://cam",
                            factory=lambda ev=ev: StuckOpen(ev, release))
            mgr.add(StreamConfig(id=name, source="stuck://cam"), spec=spec)
        assert all(ev.wait(10) for ev in entered)
        t0 = time.monotonic()
        assert not mgr.shutdown(timeout=1.0)
        took = time.monotonic() - t0
    finally:
        release.set()
    assert took < 2.5, f"shutdown took {took:.1f} s"
    assert "did not stop within 1.0 s" in caplog.text and "a, b, c" in caplog.text, caplog.text

