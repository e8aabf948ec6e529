"""The metrics collector against small fakes of the manager, engine and hub."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from pipeline.engine import EngineStats
from pipeline.types import Frame, SegmentationResult
from server.metrics import Metrics, batch_histogram


@dataclass
class FakeHandle:
    id: str
    info: dict[str, Any]
    model: str = "null"

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, **self.info}


@dataclass
class FakeEngine:
    stats: EngineStats = field(default_factory=EngineStats)
    alive: bool = True


@dataclass
class FakeManager:
    handles: list[FakeHandle]
    engine: FakeEngine = field(default_factory=FakeEngine)
    device: str = "cpu"

    def list(self) -> list[FakeHandle]:
        return list(self.handles)

    def find(self, stream_id: str) -> FakeHandle | None:
        return next((h for h in self.handles if h.id == stream_id), None)


@dataclass
class FakeHub:
    counts: dict[str, int] = field(default_factory=dict)
    encoded: int = 0

    def client_count(self, stream_id: str) -> int:
        return self.counts.get(stream_id, 0)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def result(sid: str, *, infer_ms: float, total_s: float) -> SegmentationResult:
    frame = Frame(stream_id=sid, index=0, pts=None, captured_at=100.0, image=np.zeros((4, 4, 3), np.uint8))
    return SegmentationResult(
        frame=frame,
        labels=np.zeros((4, 4), np.uint8),
        classes=("background", "person"),
        model="null",
        latency_ms={"decode": 1.0, "queue": 2.0, "infer": infer_ms, "encode_extra": 5.0},
        segmented_at=100.0 + total_s,
    )


def info(**kw: Any) -> dict[str, Any]:
    base = {
        "state": "streaming",
        "frames_in": 0,
        "frames": 0,
        "fps_in": 0.0,
        "fps": 0.0,
        "drops": {},
        "reconnects": 0,
    }
    return {**base, **kw}


def test_stream_state_drops_and_reconnects_come_from_live_state() -> None:
    h = FakeHandle(
        "cam1",
        info(
            state="reconnecting",
            frames_in=120,
            frames=100,
            fps_in=29.5,
            drops={"source_overrun": 7, "stale": 2},
            reconnects=3,
        ),
    )
    mgr = FakeManager([h])
    m = Metrics(mgr, FakeHub(counts={"cam1": 2}, encoded=9), process=False)
    s = samples(m)
    assert s[("segstream_stream_frames_in_total", (("stream", "cam1"),))] == 120
    assert s[("segstream_stream_frames_out_total", (("stream", "cam1"),))] == 100
    assert s[("segstream_stream_fps", (("dir", "in"), ("stream", "cam1")))] == 29.5
    assert s[("segstream_stream_drops_total", (("cause", "source_overrun"), ("stream", "cam1")))] == 7
    assert s[("segstream_stream_drops_total", (("cause", "stale"), ("stream", "cam1")))] == 2
    assert s[("segstream_stream_drops_total", (("cause", "client_slow"), ("stream", "cam1")))] == 0
    assert s[("segstream_stream_reconnects_total", (("stream", "cam1"),))] == 3
    assert s[("segstream_stream_state", (("state", "reconnecting"), ("stream", "cam1")))] == 1
    assert s[("segstream_stream_state", (("state", "streaming"), ("stream", "cam1")))] == 0
    assert s[("segstream_stream_up", (("stream", "cam1"),))] == 0
    assert s[("segstream_stream_clients", (("stream", "cam1"),))] == 2
    assert s[("segstream_clients", ())] == 2
    assert s[("segstream_streams", ())] == 1
    assert s[("segstream_encoded_total", ())] == 9

    # The next scrape sees new values without anyone having pushed them.
    h.info["drops"] = {"source_overrun": 8}
    h.info["reconnects"] = 4
    s = samples(m)
    assert s[("segstream_stream_drops_total", (("cause", "source_overrun"), ("stream", "cam1")))] == 8
    assert s[("segstream_stream_reconnects_total", (("stream", "cam1"),))] == 4


def test_stage_latency_histograms_and_removed_streams_are_forgotten() -> None:
    h = FakeHandle("a", info())
    mgr = FakeManager([h])
    m = Metrics(mgr, FakeHub(), process=False)
    m.observe(result("a", infer_ms=3.0, total_s=0.02))
    m.observe(result("a", infer_ms=40.0, total_s=0.06))
    s = samples(m)
    infer = (("stage", "infer"), ("stream", "a"))
    assert s[("segstream_stage_latency_seconds_count", infer)] == 2
    assert abs(s[("segstream_stage_latency_seconds_sum", infer)] - 0.043) < 1e-9
    assert s[("segstream_stage_latency_seconds_bucket", (("le", "0.005"), *infer))] == 1
    assert s[("segstream_latency_seconds_count", (("stream", "a"),))] == 2
    # stages the metrics do not know (added by later code) are ignored, not exported unbounded
    assert not any(k[0].startswith("segstream_stage") and ("stage", "encode_extra") in k[1] for k in s)

    mgr.handles.clear()
    s = samples(m)
    assert not any(("stream", "a") in k[1] for k in s)


def test_a_stream_removed_and_added_again_between_scrapes_starts_its_histograms_afresh() -> None:
    h = FakeHandle("a", info())
    m = Metrics(FakeManager([h]), FakeHub(), process=False)
    for _ in range(5):
        m.observe(result("a", infer_ms=3.0, total_s=0.02))
    m.forget("a")  # removed (the manager's removal listener) and added again before any scrape
    m.observe(result("a", infer_ms=3.0, total_s=0.02))
    assert samples(m)[("segstream_latency_seconds_count", (("stream", "a"),))] == 1


def test_a_result_in_flight_when_its_stream_is_removed_never_brings_its_series_back() -> None:
    """The engine thread may deliver a result of a stream that DELETE has just removed, while
    a scrape is being collected: no scrape after the removal shows that stream."""
    a, b = FakeHandle("a", info()), FakeHandle("b", info())
    mgr = FakeManager([a, b])
    late: list[SegmentationResult] = []

    class EngineMidScrape(FakeHub):
        def client_count(self, stream_id: str) -> int:
            # called while the scrape collects live stream "b": the engine thread runs meanwhile
            while late:
                m.observe(late.pop())
            return 0

    m = Metrics(mgr, EngineMidScrape(), process=False)
    m.observe(result("a", infer_ms=3.0, total_s=0.02))
    assert ("segstream_latency_seconds_count", (("stream", "a"),)) in samples(m)
    mgr.handles.remove(a)  # DELETE /api/streams/a: out of the manager, then its listeners
    m.forget("a")
    m.observe(result("a", infer_ms=3.0, total_s=0.02))  # in flight before the removal
    late.append(result("a", infer_ms=3.0, total_s=0.02))  # delivered during the next scrape
    for _ in range(2):
        s = samples(m)
        assert [k for k in s if ("stream", "a") in k[1]] == []
        assert ("segstream_latency_seconds_count", (("stream", "b"),)) not in s  # b never had a result
    assert not late
    # a stream added again under the same id gets its histograms from its first result on
    mgr.handles.append(FakeHandle("a", info()))
    m.observe(result("a", infer_ms=3.0, total_s=0.02))
    assert samples(m)[("segstream_latency_seconds_count", (("stream", "a"),))] == 1


def test_a_streaming_stream_is_not_up_once_the_engine_thread_died() -> None:
    """The source still streams, but nothing is segmented any more: the stream is down."""
    mgr = FakeManager([FakeHandle("cam", info(state="streaming"))])
    m = Metrics(mgr, FakeHub(), process=False)
    assert samples(m)[("segstream_stream_up", (("stream", "cam"),))] == 1
    mgr.engine.alive = False
    s = samples(m)
    assert s[("segstream_stream_up", (("stream", "cam"),))] == 0
    assert s[("segstream_engine_up", ())] == 0
    assert s[("segstream_stream_state", (("state", "streaming"), ("stream", "cam")))] == 1


def test_engine_batch_histogram_and_counters() -> None:
    mgr = FakeManager([])
    mgr.engine.stats = EngineStats(
        batches=5, frames=11, errors=1, batch_sizes={1: 2, 3: 2, 3000: 1}, ready=True,
        model_inputs=14, roi_frames=4, roi_crops=6, roi_full=1,
    )
    m = Metrics(mgr, FakeHub(), process=False)
    s = samples(m)
    assert s[("segstream_engine_batches_total", ())] == 5
    assert s[("segstream_engine_errors_total", ())] == 1
    assert s[("segstream_engine_model_inputs_total", ())] == 14
    assert s[("segstream_engine_roi_frames_total", ())] == 4
    assert s[("segstream_engine_roi_crops_total", ())] == 6
    assert s[("segstream_engine_roi_full_passes_total", ())] == 1
    assert s[("segstream_engine_ready", ())] == 1
    assert s[("segstream_engine_batch_size_bucket", (("le", "1.0"),))] == 2
    assert s[("segstream_engine_batch_size_bucket", (("le", "4.0"),))] == 4
    assert s[("segstream_engine_batch_size_bucket", (("le", "256.0"),))] == 4
    assert s[("segstream_engine_batch_size_bucket", (("le", "+Inf"),))] == 5
    assert s[("segstream_engine_batch_size_sum", ())] == 1 * 2 + 3 * 2 + 3000


def test_device_memory_only_when_reported() -> None:
    mgr = FakeManager([], device="cuda")
    m = Metrics(mgr, FakeHub(), device_memory=lambda: {"allocated": 1024, "reserved": 4096}, process=False)
    s = samples(m)
    assert s[("segstream_device_memory_bytes", (("device", "cuda"), ("kind", "reserved")))] == 4096
    m2 = Metrics(FakeManager([]), FakeHub(), device_memory=lambda: {}, process=False)
    assert not any(k[0] == "segstream_device_memory_bytes" for k in samples(m2))


def test_two_apps_in_one_process_do_not_collide() -> None:
    a = Metrics(FakeManager([FakeHandle("x", info(frames=1))]), FakeHub())
    b = Metrics(FakeManager([FakeHandle("x", info(frames=2))]), FakeHub())
    assert samples(a)[("segstream_stream_frames_out_total", (("stream", "x"),))] == 1
    assert samples(b)[("segstream_stream_frames_out_total", (("stream", "x"),))] == 2


def test_a_stream_failing_to_describe_does_not_fail_the_scrape() -> None:
    class Broken(FakeHandle):
        def describe(self) -> dict[str, Any]:
            raise RuntimeError("removed meanwhile")

    m = Metrics(FakeManager([Broken("gone", {}), FakeHandle("ok", info())]), FakeHub(), process=False)
    s = samples(m)
    assert s[("segstream_streams", ())] == 1


def test_batch_histogram_empty() -> None:
    fam = batch_histogram({})
    assert [s.value for s in fam.samples if s.name.endswith("_count")] == [0]
