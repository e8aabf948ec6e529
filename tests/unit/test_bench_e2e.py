"""Item 4's ratio divides by the network's speed measured right around each end-to-end run."""

from __future__ import annotations

from pathlib import Path

import bench.pipeline as bp


def test_end_to_end_divides_by_the_network_speed_measured_around_it(monkeypatch, tmp_path: Path) -> None:
    speeds = iter([100.0, 140.0, 80.0, 120.0])  # before/after overlay, before/after rle
    monkeypatch.setattr(bp, "_model_b1", lambda run: next(speeds))
    monkeypatch.setattr(bp, "model_only", lambda run: {1: 500.0, 2: 600.0, 4: 700.0, 8: 800.0})
    monkeypatch.setattr(bp, "model_only_beside_decode", lambda run: 90.0)

    def throughput(run, model, fmt, threads=None):
        return {"fps": 60.0, "cpu_ms_per_frame": 10.0, "stages_ms": {"infer": 5.0}, "batch": 1, "error": None}

    monkeypatch.setattr(bp, "_throughput", throughput)
    table = bp.bench_e2e(bp.Run(quick=True, workdir=tmp_path))
    assert table.data["overlay"]["model_only"] == 120.0  # mean of 100 and 140, not the 500 measured earlier
    assert table.data["overlay"]["ratio"] == 0.5
    assert table.data["rle"]["model_only"] == 100.0
    assert table.data["rle"]["ratio"] == 0.6
    assert any("before / after the run: 100.0 / 140.0" in n for n in table.notes)


def test_a_run_at_a_larger_batch_divides_by_the_model_at_that_batch(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bp, "_model_b1", lambda run: 100.0)
    monkeypatch.setattr(bp, "model_only", lambda run: {1: 500.0, 2: 600.0, 4: 700.0, 8: 800.0})
    monkeypatch.setattr(bp, "model_only_beside_decode", lambda run: 90.0)
    monkeypatch.setattr(bp, "_throughput", lambda run, model, fmt, threads=None: {
        "fps": 400.0, "cpu_ms_per_frame": 10.0, "stages_ms": {}, "batch": 8, "error": None})
    table = bp.bench_e2e(bp.Run(quick=True, workdir=tmp_path))
    assert table.data["overlay"]["model_only"] == 800.0 and table.data["overlay"]["ratio"] == 0.5
