"""Unusual but real media files: each decodes to the pictures a player shows, or fails clearly."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.sources import parse_source
from tests.helpers_video import mux_frames, pattern_frame

W, H = 48, 32


def _encode(
    path: Path,
    *,
    frames: int = 3,
    fps: int = 10,
    rotation: float = 0,
    hflip: bool = False,
    sar: Fraction | None = None,
) -> Path:
    """A lossless H.264 clip of the pattern, with a display matrix or non-square pixels when asked for."""
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv444p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        mux_frames(out, stream, (pattern_frame(i, width=W, height=H) for i in range(frames)))
    return path


def _pictures(uri: str) -> list[np.ndarray]:
    src = parse_source(uri).create()
    try:
        src.open()
        return [f.image for f in src.frames() if f is not None]
    finally:
        src.close()


def _stored(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize(
    ("rotation", "hflip", "shown"),
    [
        # what FFmpeg's own player and command line show (autorotate)
        (90, False, lambda img: np.rot90(img, 1)),
        (-90, False, lambda img: np.rot90(img, -1)),
        (180, False, lambda img: img[::-1, ::-1]),
        (0, True, lambda img: img[:, ::-1]),
        (90, True, lambda img: img.transpose(1, 0, 2)[::-1, ::-1]),  # transpose=clock_flip
    ],
)
def test_display_matrix_turns_pictures_as_a_player_shows_them(tmp_path: Path, rotation, hflip, shown) -> None:
    clip = _encode(tmp_path / "phone.mp4", rotation=rotation, hflip=hflip)
    got, stored = _pictures(str(clip)), _stored(clip)
    assert len(got) == len(stored) == 3
    for g, s in zip(got, stored, strict=True):
        want = shown(s)
        assert g.shape == want.shape
        assert g.flags.c_contiguous
        assert np.array_equal(g, want)


def test_upright_video_is_passed_through_unchanged(tmp_path: Path) -> None:
    clip = _encode(tmp_path / "plain.mp4")
    got = _pictures(str(clip))
    assert [g.shape for g in got] == [(H, W, 3)] * 3
    assert all(np.array_equal(g, s) for g, s in zip(got, _stored(clip), strict=True))


@pytest.mark.parametrize(("sar", "shown_width"), [(Fraction(2, 1), 96), (Fraction(3, 4), 36)])
def test_non_square_pixels_are_stretched_as_a_player_shows(tmp_path: Path, sar, shown_width) -> None:
    clip = _encode(tmp_path / "anamorphic.mp4", sar=sar)
    with av.open(str(clip)) as c:
        assert c.streams.video[0].sample_aspect_ratio == sar  # (what ffprobe calls SAR)
    src = parse_source(str(clip)).create()
    try:
        info = src.open()
        got = [f.image for f in src.frames() if f is not None]
    finally:
        src.close()
    assert (info.width, info.height) == (shown_width, H)
    assert [g.shape for g in got] == [(H, shown_width, 3)] * 3
    for g, s in zip(got, _stored(clip), strict=True):
        want = cv2.resize(s, (shown_width, H), interpolation=cv2.INTER_LINEAR)
        assert np.abs(g.astype(int) - want).mean() < 8


def test_non_square_pixels_are_stretched_before_the_picture_is_turned(tmp_path: Path) -> None:
    clip = _encode(tmp_path / "both.mp4", sar=Fraction(2, 1), rotation=90)
    assert [g.shape for g in _pictures(str(clip))] == [(2 * W, H, 3)] * 3


def test_file_with_a_header_and_no_picture_yet_says_so(tmp_path: Path) -> None:
    """A recording still being written (or cut short) holds its header and nothing else."""
    from pipeline.sources import SourceError

    data = _encode(tmp_path / "whole.mkv").read_bytes()
    cluster = data.index(bytes.fromhex("1F43B675"))  # Matroska's first Cluster: the pictures
    partial = tmp_path / "recording.mkv"
    partial.write_bytes(data[:cluster])
    src = parse_source(str(partial)).create()
    with pytest.raises(SourceError) as exc:
        src.open()
    src.close()
    assert "ends before its first picture" in str(exc.value), exc.value
    assert not exc.value.retryable


def test_decoded_pictures_are_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    """Reading the display matrix must not tie each frame into a reference cycle: those
    frames (and their scalers' threads) would pile up until a collection."""
    import gc

    clip = _encode(tmp_path / "phone.mp4", frames=12, rotation=90)
    gc.collect()
    gc.disable()
    try:
        src = parse_source(str(clip)).create()
        src.open()
        assert sum(1 for f in src.frames() if f is not None) == 12
        src.close()
        del src
        alive = [o for o in gc.get_objects() if isinstance(o, av.VideoFrame)]
    finally:
        gc.enable()
    assert alive == []


def test_odd_sized_pictures_are_whole_contiguous_arrays(tmp_path: Path) -> None:
    """17x9 RGB rows are 51 bytes, which FFmpeg pads: frames are still C-contiguous, as
    :class:`RawFrame` promises, and hold exactly the stored picture."""
    clip = tmp_path / "odd.mkv"
    with av.open(str(clip), mode="w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 17, 9, "bgr0"
        mux_frames(out, stream, (pattern_frame(i, width=17, height=9) for i in range(2)))
    got = _pictures(str(clip))
    assert [g.shape for g in got] == [(9, 17, 3)] * 2
    assert all(g.flags.c_contiguous for g in got)
    for i, g in enumerate(got):
        assert np.array_equal(g, pattern_frame(i, width=17, height=9))  # (ffv1 is lossless)


def test_a_cover_picture_stored_first_is_not_taken_for_the_video(tmp_path: Path) -> None:
    """Matroska files often carry their cover as a one-frame video stream ahead of the film:
    the film is what players show."""
    clip = tmp_path / "film.mkv"
    with av.open(str(clip), mode="w") as out:
        art = out.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = W, H, "yuvj420p"
        film = out.add_stream("libx264", rate=10)
        film.width, film.height, film.pix_fmt = W, H, "yuv420p"
        mux_frames(out, art, [np.zeros((H, W, 3), np.uint8)])
        mux_frames(out, film, (pattern_frame(i, width=W, height=H) for i in range(6)))
    with av.open(str(clip)) as c:
        assert [s.index for s in c.streams.video] == [0, 1]
    src = parse_source(str(clip)).create()
    try:
        info = src.open()
        got = [f for f in src.frames() if f is not None]
    finally:
        src.close()
    assert info.codec == "h264" and info.fps == 10
    assert len(got) == 6


def test_a_long_pause_in_a_recording_is_cut_and_play_resumes_at_its_pace(tmp_path: Path, monkeypatch) -> None:
    """Served live, a file is paced by its timestamps; a gap longer than _MAX_FRAME_GAP_S (a
    paused or motion-triggered recording) is cut to it, and the frames after it follow at
    their own pace (they came one per _MAX_FRAME_GAP_S until the whole gap was waited out)."""
    import time

    from pipeline import stream as stream_mod
    from pipeline.config import ReconnectConfig
    from pipeline.slot import DropPolicy, FrameSlot
    from pipeline.stream import StreamWorker

    monkeypatch.setattr(stream_mod, "_MAX_FRAME_GAP_S", 0.5)
    pts = [0.0, 0.1, 0.2, 2.5, 2.6, 2.7, 2.8, 2.9]  # a 2.3 s pause
    tb = Fraction(1, 1000)
    clip = tmp_path / "paused.mp4"
    with av.open(str(clip), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = tb
        stream.options = {"bf": "0", "preset": "ultrafast"}
        mux_frames(out, stream, (pattern_frame(i, width=W, height=H) for i in range(len(pts))), times=pts)
    slot = FrameSlot(capacity=16, policy=DropPolicy.BLOCK)
    worker = StreamWorker("paused", parse_source(str(clip)), slot, reconnect=ReconnectConfig())
    arrived: list[tuple[float, float | None]] = []
    worker.start()
    try:
        deadline = time.monotonic() + 15
        while len(arrived) < len(pts) and time.monotonic() < deadline:
            frame = slot.take()
            if frame is None:
                time.sleep(0.005)
                continue
            arrived.append((time.monotonic(), frame.pts))
    finally:
        assert worker.stop(timeout=3)
    assert [p for _, p in arrived] == pytest.approx(pts)
    gap = arrived[3][0] - arrived[2][0]
    assert 0.4 <= gap < 1.5, f"the 2.3 s pause took {gap:.2f} s"
    after = arrived[-1][0] - arrived[3][0]
    assert after < 1.5, f"4 frames at 10 fps after the pause took {after:.2f} s"
