"""ROI mode inside the engine (crops batched with other streams' frames) and in ``segstream eval``."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from models.temporal import TemporalParams
from pipeline.config import EngineConfig, RoiConfig
from pipeline.engine import Engine
from pipeline.evaluate import EvalInputError, add_eval_parser, evaluate, run_eval
from pipeline.slot import FrameSlot
from pipeline.types import Frame, now
from tests.unit.test_engine import Collector
from tests.unit.test_roi import RedSegmenter, scene


class CountingSegmenter(RedSegmenter):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def infer(self, x):
        self.rows.append(int(x.shape[0]))
        return super().infer(x)


def frame(sid, i, img, discontinuity=False):
    return Frame(stream_id=sid, index=i, pts=None, captured_at=now(), image=img, discontinuity=discontinuity)


def roi_and_plain_streams(seg, col):
    """A started engine with stream "a" in ROI mode and stream "b" plain, on one model."""
    eng = Engine(
        config=EngineConfig(max_wait_ms=200), segmenter_factory=lambda name: seg,
        on_result=col.on_result, on_error=col.on_error,
    )
    eng.start()
    slots = {sid: FrameSlot(on_put=eng.notify) for sid in "ab"}
    eng.add_stream("a", slots["a"], model="m", roi=RoiConfig(enabled=True, full_every=100))
    eng.add_stream("b", slots["b"], model="m")
    return eng, slots


def test_roi_crops_share_the_batch_with_plain_frames():
    seg = CountingSegmenter()
    col = Collector()
    eng, slots = roi_and_plain_streams(seg, col)
    try:
        img, mask = scene([(150, 80, 7, 13)])
        for i in range(2):
            for sid in "ab":
                slots[sid].put(frame(sid, i, img))
            col.wait(lambda c, n=2 * (i + 1): len(c.results) == n)
        assert not col.errors
        by = {(r.frame.stream_id, r.frame.index): r for r in col.results}
        assert by["a", 0].info["roi"]["full"] and by["a", 0].full_pass
        tracked = by["a", 1]
        assert tracked.info["roi"] == {"crops": 1, "full": False, "reason": "track", "inputs": 1}
        assert not tracked.full_pass
        assert np.array_equal(tracked.labels == 1, mask)  # the crop resolves what 32x32 cannot
        assert "roi" not in by["b", 1].info
        assert not np.array_equal(by["b", 1].labels == 1, mask)  # the whole frame at 32x32 blurs it
        assert 2 in seg.rows  # a crop and a whole frame went through one forward pass
        snap = eng.stats.snapshot()
        assert snap["roi"] == {"frames": 2, "crops": 1, "full_passes": 1, "crops_per_frame": 0.5,
                               "compute_vs_full": 1.0}
        assert snap["model_inputs"] == 4 and snap["inputs_per_frame"] == 1.0
        # a discontinuity (reconnect) starts from a full frame again
        slots["a"].put(frame("a", 2, img, discontinuity=True))
        col.wait(lambda c: len(c.results) == 5)
        assert col.results[-1].info["roi"]["reason"] == "discontinuity"
        # changing the ROI settings restarts the stream's tracking
        eng.update_stream("a", roi=RoiConfig(enabled=False))
        slots["a"].put(frame("a", 3, img))
        col.wait(lambda c: len(c.results) == 6)
        assert "roi" not in col.results[-1].info
    finally:
        assert eng.stop(2)


def make_sequence(n=8):
    frames, masks = [], []
    for i in range(n):
        img, mask = scene([(40 + 2 * i, 60, 7, 13)] + ([(150, 20, 8, 14)] if i >= 3 else []))
        frames.append(img)
        masks.append(mask)
    return frames, masks


def test_evaluate_roi_reports_compute_and_beats_full_frame_on_small_objects():
    frames, masks = make_sequence()
    full = evaluate(frames, masks, RedSegmenter(), TemporalParams())
    cfg = RoiConfig(enabled=True, full_every=4, budget=0, hold=0)  # every crop runs, boxes follow
    roi = evaluate(frames, masks, RedSegmenter(), TemporalParams(), roi=cfg)
    assert roi["roi"] and roi["frames"] == 8
    assert roi["miou"] > full["miou"] + 0.2
    assert roi["full_frames"] == 2  # frame 0 and the periodic pass at 4, which finds the newcomer
    assert roi["inputs_per_frame"] == pytest.approx((2 + 1 + 1 + 1 + 1 + 2 + 2 + 2) / 8)
    # with the default budget (1.5 model inputs per frame on average) the two crops take turns
    default = RoiConfig(enabled=True, full_every=4)
    capped = evaluate(frames, masks, RedSegmenter(), TemporalParams(), roi=default)
    assert capped["inputs_per_frame"] <= 1.5
    assert capped["miou"] > full["miou"] + 0.15


def test_evaluate_roi_refuses_temporal():
    frames, masks = make_sequence(2)
    with pytest.raises(EvalInputError, match="cannot be combined"):
        evaluate(frames, masks, RedSegmenter(), TemporalParams(mode="smooth"), roi=RoiConfig(enabled=True))


def test_eval_cli_roi_flag(tmp_path, capsys):
    import cv2

    frames, masks = make_sequence(6)
    fdir, mdir = tmp_path / "f", tmp_path / "m"
    fdir.mkdir()
    mdir.mkdir()
    for i, (f, m) in enumerate(zip(frames, masks, strict=True)):
        cv2.imwrite(str(fdir / f"{i:05d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(mdir / f"{i:05d}.png"), m.astype(np.uint8) * 255)
    parser = argparse.ArgumentParser(prog="segstream")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", str(fdir), str(mdir), "--roi", "--roi-full-every", "3", "--json"])
    assert run_eval(args, load_segmenter=lambda a: RedSegmenter()) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["roi"] is True and out["full_frames"] == 2 and "inputs_per_frame" in out
    bad = parser.parse_args(["eval", str(fdir), str(mdir), "--roi", "--roi-full-every", "0"])
    assert run_eval(bad, load_segmenter=lambda a: RedSegmenter()) == 2
    assert "--roi-full-every 0" in capsys.readouterr().err  # the flag, as typed


def test_a_stream_whose_roi_step_fails_loses_only_its_own_frames(monkeypatch):
    """A bug or absurd setting in one stream's ROI tracking must not cost the other streams
    of the batch their frames, nor leave its error on them."""
    import pipeline.roi as roi_mod

    seg = CountingSegmenter()
    col = Collector()
    real_begin = roi_mod.RoiTracker.begin

    def begin(self, image, *, index, discontinuity=False):
        if index == 1:
            raise OverflowError("cannot convert float infinity to integer")
        return real_begin(self, image, index=index, discontinuity=discontinuity)

    monkeypatch.setattr(roi_mod.RoiTracker, "begin", begin)
    eng, slots = roi_and_plain_streams(seg, col)
    try:
        img, _ = scene([(150, 80, 7, 13)])
        for i in range(3):
            for sid in "ab":
                slots[sid].put(frame(sid, i, img))
            col.wait(lambda c, n=i: len([r for r in c.results if r.frame.stream_id == "b"]) == n + 1)
        col.wait(lambda c: len([r for r in c.results if r.frame.stream_id == "a"]) == 2)
        assert sorted(r.frame.index for r in col.results if r.frame.stream_id == "a") == [0, 2]
        assert [sid for sid, _ in col.errors] == ["a"] and "OverflowError" in col.errors[0][1]
        assert slots["a"].drops.snapshot() == {"error": 1} and slots["b"].drops.total() == 0
    finally:
        assert eng.stop(2)
