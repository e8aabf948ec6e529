"""Interlaced video (analogue cameras through a DVR, broadcast 576i): pictures come out without
the combs of two fields taken at different moments, and nothing else changes."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.sources import parse_source
from pipeline.sources.av_source import Deinterlacer
from tests.helpers_video import mux_frames

W, H, N = 160, 96, 12


def _fields(i: int) -> np.ndarray:
    """An interlaced camera's picture of a bar moving right: the bottom field was taken half a
    frame after the top one, so the bar's odd rows sit 6 px further on."""
    img = np.full((H, W, 3), 30, np.uint8)
    x = 10 + 8 * i  # stays inside the picture
    img[0::2, x : x + 24] = 220
    img[1::2, x + 6 : x + 30] = 220
    return img


def _encode(path: Path, *, interlaced: bool) -> Path:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12",
                          **({"x264-params": "interlaced=1:tff=1"} if interlaced else {})}
        mux_frames(out, stream, (_fields(i) for i in range(N)))
    return path


def _read(uri: str) -> list:
    src = parse_source(uri).create()
    try:
        src.open()
        return [f for f in src.frames() if f is not None]
    finally:
        src.close()


def combing(img: np.ndarray) -> float:
    """Mean distance of each row from the average of its neighbours (combs: large)."""
    g = img.astype(np.float32).mean(axis=2)
    return float(np.abs(g[1:-1] - (g[:-2] + g[2:]) / 2).mean())


def _bar_centre(img: np.ndarray) -> float:
    cols = np.nonzero(img.mean(axis=2) > 125)[1]
    return float(cols.mean())


def test_flagged_interlaced_video_is_deinterlaced_and_keeps_every_frame_and_time(tmp_path: Path) -> None:
    clip = _encode(tmp_path / "i.mp4", interlaced=True)
    with av.open(str(clip)) as c:
        stored = list(c.decode(video=0))
    assert all(f.interlaced_frame for f in stored)
    raw = _read(f"{clip}?deinterlace=off")
    shown = _read(str(clip))  # auto
    assert [f.pts for f in shown] == [f.pts for f in raw] == [float(f.time) for f in stored]
    before = [combing(f.image) for f in raw]
    after = [combing(f.image) for f in shown]
    assert min(before) > 4 * max(after), (before, after)
    # the bar is still there, between where its two fields saw it (6 px apart)
    for r, s in zip(raw, shown, strict=True):
        assert abs(_bar_centre(s.image) - _bar_centre(r.image)) <= 3.5
        assert 20 <= (s.image.mean(axis=2) > 125).sum(axis=1).mean() <= 32  # its width, not smeared


def test_progressive_video_is_left_exactly_as_it_was(tmp_path: Path) -> None:
    clip = _encode(tmp_path / "p.mp4", interlaced=False)
    auto, off = _read(str(clip)), _read(f"{clip}?deinterlace=off")
    assert len(auto) == len(off) == N
    for a, b in zip(auto, off, strict=True):
        assert a.pts == b.pts and np.array_equal(a.image, b.image)


def test_on_deinterlaces_video_that_is_not_flagged(tmp_path: Path) -> None:
    """Recorders that encode an analogue camera's fields as progressive pictures."""
    clip = _encode(tmp_path / "p.mp4", interlaced=False)
    off, on = _read(f"{clip}?deinterlace=off"), _read(f"{clip}?deinterlace=on")
    assert len(on) == N
    assert min(combing(f.image) for f in off) > 4 * max(combing(f.image) for f in on)


def _frame(width: int, height: int, pts: int) -> av.VideoFrame:
    f = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24").reformat(
        format="yuv420p"
    )
    f.pts, f.time_base = pts, Fraction(1, 25)
    return f


def test_a_camera_changing_its_size_keeps_every_picture_in_order() -> None:
    d = Deinterlacer("on", Fraction(1, 25))
    sizes = [(64, 48)] * 3 + [(96, 64)] * 3
    out = []
    for i, (w, h) in enumerate(sizes):
        out += d.push(_frame(w, h, i))
    assert len(out) == len(sizes) - 1  # one picture held back for its successor
    out += d.flush()
    assert [(f.width, f.height) for f in out] == sizes
    assert [f.time for f in out] == [i / 25 for i in range(len(sizes))]
    assert d.flush() == []


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_progressive_pictures_are_not_held_back(mode: str) -> None:
    d = Deinterlacer(mode, Fraction(1, 25))
    f = _frame(64, 48, 0)
    assert d.push(f) == [f] and d.flush() == []


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores"
)
def test_the_filter_adds_no_thread_pool_per_stream() -> None:
    """FFmpeg gives a filter graph a thread per core unless told otherwise: per stream, that
    would be hundreds of idle threads for a few cameras on a large machine."""
    d = Deinterlacer("on", Fraction(1, 25))
    before = _os_threads()
    out = d.push(_frame(720, 576, 0)) + d.push(_frame(720, 576, 1))
    assert _os_threads() == before
    assert len(out + d.flush()) == 2


def test_pictures_the_filter_cannot_take_are_shown_as_they_are() -> None:
    """bwdif refuses planes under 3 columns or 4 lines (a 64x6 4:2:0 picture): such pictures
    come out untouched instead of failing the stream, and a later size is deinterlaced."""
    d = Deinterlacer("on", Fraction(1, 25))
    sizes = [(64, 6)] * 3 + [(64, 48)] * 3
    frames = [_frame(w, h, i) for i, (w, h) in enumerate(sizes)]
    out = []
    for f in frames:
        out += d.push(f)
    assert out[:3] == frames[:3]  # not held back either
    out += d.flush()
    assert [(f.width, f.height) for f in out] == sizes
    assert [f.time for f in out] == [i / 25 for i in range(len(sizes))]


class _WovenCamera:
    """OpenCV's capture of an analogue camera through a USB grabber: woven fields, not flagged."""

    def __init__(self, *args) -> None:
        self.i = 0

    def isOpened(self) -> bool:
        return True

    def set(self, *args) -> bool:
        return True

    def get(self, prop: int) -> float:
        return {3: W, 4: H, 5: 25.0}.get(prop, 0.0)  # CAP_PROP_FRAME_WIDTH, _HEIGHT, _FPS

    def read(self):
        self.i += 1
        return True, _fields(self.i % 10)[..., ::-1].copy()  # BGR

    def release(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_a_webcam_is_deinterlaced_only_when_asked(monkeypatch, tmp_path: Path, mode: str) -> None:
    import pipeline.sources.webcam as webcam

    monkeypatch.setattr(webcam.cv2, "VideoCapture", _WovenCamera)
    src = parse_source(f"webcam:0?deinterlace={mode}").create()
    src._path = tmp_path / "video0"  # the device node the source checks for
    src._path.touch()
    src.open()
    try:
        it = src.frames()
        got = [next(it) for _ in range(8)]
    finally:
        src.close()
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in got)
    combs = [combing(f.image) for f in got]
    if mode == "on":
        assert max(combs) < min(combing(_fields(i)) for i in range(10)) / 4, combs
    else:  # nothing flags a webcam's pictures: shown as they come
        assert [f.image.tolist() for f in got] == [_fields(i % 10).tolist() for i in range(1, 9)]
