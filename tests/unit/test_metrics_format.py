"""/metrics as a Prometheus scraper reads it, while streams are observed, added and removed:
every family declared once with HELP and TYPE, histograms cumulative with ``_count`` equal to
the ``+Inf`` bucket, counters never going back for a stream that stays."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from pipeline.engine import EngineStats
from pipeline.types import DropCause, Frame, SegmentationResult
from server.metrics import Metrics


@dataclass
class Handle:
    id: str
    model: str = "null"
    frames: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": "streaming",
            "frames_in": self.frames,
            "frames": self.frames,
            "fps_in": 25.0,
            "fps": 25.0,
            "drops": {DropCause.STALE.value: self.frames // 3},
            "reconnects": 0,
        }


@dataclass
class Engine:
    stats: EngineStats = field(default_factory=EngineStats)
    alive: bool = True


@dataclass
class Manager:
    handles: dict[str, Handle] = field(default_factory=dict)
    engine: Engine = field(default_factory=Engine)
    device: str = "cpu"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def list(self) -> list[Handle]:
        with self.lock:
            return list(self.handles.values())

    def find(self, stream_id: str) -> Handle | None:
        with self.lock:
            return self.handles.get(stream_id)


@dataclass
class Hub:
    encoded: int = 0

    def client_count(self, stream_id: str) -> int:
        return 1


def result(sid: str, i: int) -> SegmentationResult:
    frame = Frame(stream_id=sid, index=i, pts=None, captured_at=100.0, image=np.zeros((2, 2, 3), np.uint8))
    ms = float(i % 700)  # spread over every bucket, including above the largest
    return SegmentationResult(
        frame=frame,
        labels=np.zeros((2, 2), np.uint8),
        classes=("background", "person"),
        model="null",
        latency_ms={"decode": ms, "queue": ms / 3, "preprocess": 0.0, "infer": ms * 5, "postprocess": 0.2},
        segmented_at=100.0 + ms * 4 / 1000.0,
    )


def check(text: str) -> dict[str, float]:
    """Parse and check one exposition; ``name{labels}`` -> value."""
    helps: dict[str, int] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            helps[name] = helps.get(name, 0) + 1
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types, f"TYPE of {name} twice"
            types[name] = kind
    assert all(n == 1 for n in helps.values()), helps
    assert set(helps) == set(types)
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.documentation, fam.name
        if fam.type == "histogram":
            series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
            counts: dict[tuple[tuple[str, str], ...], float] = {}
            sums: dict[tuple[tuple[str, str], ...], float] = {}
            for s in fam.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                if s.name.endswith("_bucket"):
                    series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    counts[labels] = s.value
                elif s.name.endswith("_sum"):
                    sums[labels] = s.value
            assert set(series) == set(counts) == set(sums), fam.name
            for labels, buckets in series.items():
                bounds = [b for b, _ in buckets]
                assert bounds == sorted(bounds) and bounds[-1] == float("inf"), (fam.name, bounds)
                values = [v for _, v in buckets]
                assert values == sorted(values), (fam.name, labels, values)
                assert values[-1] == counts[labels], (fam.name, labels)
                assert sums[labels] >= 0
        for s in fam.samples:
            text_labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{text_labels}}}"] = s.value
    return out


def test_scrapes_stay_well_formed_while_streams_come_and_go() -> None:
    mgr = Manager(handles={"steady": Handle("steady")})
    metrics = Metrics(mgr, Hub(), process=False)
    stop = threading.Event()

    def engine() -> None:  # observes results and adds and removes streams, as the pipeline does
        i = 0
        while not stop.is_set():
            i += 1
            mgr.handles["steady"].frames += 1
            metrics.observe(result("steady", i))
            sid = f"s-{i % 4}.x_{i % 3}"
            with mgr.lock:
                if sid in mgr.handles and i % 5 == 0:
                    del mgr.handles[sid]
                    metrics.forget(sid)
                else:
                    mgr.handles.setdefault(sid, Handle(sid)).frames += 1
            metrics.observe(result(sid, i))
            stop.wait(0.0002)  # leave the scraping thread the interpreter now and then

    worker = threading.Thread(target=engine, daemon=True)
    worker.start()
    previous: dict[str, float] = {}
    try:
        for _ in range(25):
            m = check(metrics.render().decode())
            for key, value in m.items():
                steady = "stream=steady" in key or "stream=" not in key
                monotonic = key.split("{")[0].endswith(("_total", "_bucket", "_count", "_sum"))
                if steady and monotonic and key in previous:
                    assert value >= previous[key], f"{key} went back: {previous[key]} -> {value}"
            previous = m
    finally:
        stop.set()
        worker.join(5)
    # once removed, a stream's series are gone at the next scrape
    with mgr.lock:
        mgr.handles = {"steady": mgr.handles["steady"]}
    m = check(metrics.render().decode())
    assert {k.split("stream=")[1].split(",")[0].rstrip("}") for k in m if "stream=" in k} == {"steady"}
