"""Frames are shrunk for the model on their capture thread, not on the engine thread."""

from __future__ import annotations

import threading

from models.segmenter import Segmenter
from pipeline.config import AppConfig, EngineConfig, RoiConfig, StreamConfig
from pipeline.manager import StreamManager
from pipeline.types import SegmentationResult


def _collect(manager: StreamManager, n: int, timeout: float = 20.0) -> list[SegmentationResult]:
    got: list[SegmentationResult] = []
    done = threading.Event()

    def on_result(r: SegmentationResult) -> None:
        got.append(r)
        if len(got) >= n:
            done.set()

    manager.result_listeners.append(on_result)
    try:
        assert done.wait(timeout), f"only {len(got)} of {n} results within {timeout}s"
    finally:
        manager.result_listeners.remove(on_result)
    return got[:n]


def test_capture_thread_prepares_model_input_except_for_roi_streams(monkeypatch) -> None:
    used: list[str] = []
    for name in ("from_prepared", "preprocess"):
        def spy(self, images, _orig=getattr(Segmenter, name), _name=name):
            used.append(_name)
            return _orig(self, images)

        monkeypatch.setattr(Segmenter, name, spy)
    cfg = AppConfig(default_model="null", engine=EngineConfig(device="cpu", threads=1))
    manager = StreamManager(cfg, realtime=False)
    manager.start()
    try:
        manager.add(StreamConfig(id="a", source="demo"))
        results = _collect(manager, 5)
        for r in results:
            assert r.frame.model_input is None  # used by the engine, not kept in the result
            assert r.frame.prepare_ms > 0.0  # made by the capture thread
            assert r.latency_ms["preprocess"] >= r.frame.prepare_ms  # reported as preprocessing
            assert r.labels.shape == r.frame.image.shape[:2]  # masks still come at frame size
        # the engine only stacked the prepared inputs: it never resized a full frame itself
        assert "from_prepared" in used and "preprocess" not in used

        # ROI crops full frames: switching it on stops the (wasted) preparation. Up to three
        # frames (being delivered, in the slot, in the engine) were prepared before the switch.
        manager.update("a", roi=RoiConfig(enabled=True))
        assert all(r.frame.prepare_ms == 0.0 for r in _collect(manager, 6)[3:])
        manager.update("a", roi=RoiConfig(enabled=False))
        assert all(r.frame.prepare_ms > 0.0 for r in _collect(manager, 6)[3:])
    finally:
        assert manager.shutdown()
