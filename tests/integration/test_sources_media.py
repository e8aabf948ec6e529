"""Unusual but real media through `segstream segment`: the output keeps the source's timing,
and what cannot be read fails in one line that says why."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from server.cli import main
from tests.helpers_video import mux_frames, pattern_frame

pytestmark = pytest.mark.integration

# A phone or screen recording: bursts and pauses (seconds).
VFR_PTS = [0.0, 0.1, 0.2, 0.6, 0.7, 0.75, 0.8, 1.5, 1.6]


def _vfr_clip(path: Path) -> Path:
    tb = Fraction(1, 1000)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = tb
        stream.options = {"preset": "ultrafast", "bf": "0"}
        frames = (pattern_frame(i, width=64, height=48) for i in range(len(VFR_PTS)))
        mux_frames(out, stream, frames, times=VFR_PTS)
    return path


def _frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(video=0)]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_segment_of_a_variable_frame_rate_video_keeps_its_timing(tmp_path: Path, suffix: str) -> None:
    clip = _vfr_clip(tmp_path / "vfr.mp4")
    assert _frame_times(clip) == pytest.approx(VFR_PTS, abs=1e-3)
    out = tmp_path / f"out{suffix}"
    assert main(["segment", str(clip), "-o", str(out), "--model", "null", "-q"]) == 0
    # (written at the average rate, the pause at 0.8-1.5 s was gone and the bursts slowed down)
    assert _frame_times(out) == pytest.approx(VFR_PTS, abs=2e-3)


def _song_with_cover_art(path: Path) -> None:
    """An AAC song whose cover picture FFmpeg shows as a one-frame video stream."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("needs the ffmpeg command")
    subprocess.run(
        [ffmpeg, "-y", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
         "-f", "lavfi", "-i", "testsrc2=size=160x120:duration=1", "-frames:v", "1", "-map", "0:a",
         "-map", "1:v", "-c:a", "aac", "-c:v", "mjpeg", "-disposition:v", "attached_pic", "-f", "mp4",
         str(path)],
        check=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
        (lambda p: p.write_text("hello, this is not a video\n"), "not a video stream FFmpeg can read"),
        (None, "no video stream in the source"),  # an audio-only file
        (_song_with_cover_art, "its only picture is cover art"),
    ],
    ids=["empty", "text", "audio-only", "cover-art"],
)
def test_segment_of_unreadable_file_says_why_in_one_line(tmp_path: Path, capsys, make, needle: str) -> None:
    bad = tmp_path / "input.mp4"
    if make is not None:
        make(bad)
    else:
        with av.open(str(bad), mode="w") as out:
            stream = out.add_stream("aac", rate=8000)
            samples = np.zeros((1, 1024), dtype=np.float32)
            for i in range(4):
                af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                af.sample_rate, af.pts = 8000, i * 1024
                for packet in stream.encode(af):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    code = main(["segment", str(bad), "-o", str(tmp_path / "out.mp4"), "--model", "null", "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "input.mp4" in err and err.count("\n") == 1, err
    assert "index out of range" not in err and "Errno" not in err
    assert not (tmp_path / "out.mp4").exists()


def test_mjpeg_camera_frames_are_timed_by_arrival_not_by_a_guessed_rate() -> None:
    """Multipart MJPEG has no timestamps; FFmpeg numbers its frames at 25 fps. A 4 fps camera
    thinned to ``target_fps=10`` must keep all its frames (it kept one in three), and neither
    the made-up pts nor the made-up rate reach users."""
    from pipeline.config import ReconnectConfig
    from pipeline.slot import FrameSlot
    from pipeline.sources import parse_source
    from pipeline.stream import StreamWorker
    from pipeline.types import StreamState
    from tests.integration.fakes_net import MjpegServer

    with MjpegServer(fps=4, width=64, height=48) as server:
        slot = FrameSlot()
        spec = parse_source(f"http://127.0.0.1:{server.port}/video.mjpg?target_fps=10")
        worker = StreamWorker("mjpeg", spec, slot, reconnect=ReconnectConfig(stall_timeout_s=5.0))
        worker.start()
        try:
            assert worker.wait_state({StreamState.STREAMING}, timeout=8) is StreamState.STREAMING
            start = worker.status().frames
            # 8 more frames take 2 s at 4 fps (6 s when two in three were dropped)
            assert worker.wait_frames(start + 8, timeout=4.5), worker.status()
            frame = slot.take()
            assert frame is not None and frame.pts is None
            assert worker.status().source_fps is None
        finally:
            assert worker.stop(timeout=3)


def test_http_mp4_with_its_index_at_the_end_from_a_server_without_ranges_says_why(tmp_path: Path) -> None:
    from tests.integration.fakes_net import FileHttpServer, read_until_error

    # Noise, so the file is larger than FFmpeg's read buffer (a small one is read whole).
    clip = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(clip), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        mux_frames(out, stream, (rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(8)))
    data = clip.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat") and len(data) > 100_000, len(data)
    with FileHttpServer(tmp_path) as server:  # (Python's file server ignores Range headers)
        error = read_until_error(f"http://127.0.0.1:{server.port}/clip.mp4?open_timeout=5&read_timeout=5")
    msg = str(error)
    assert "moov" in msg and "faststart" in msg and "range" in msg, msg
    assert error.retryable  # the server may be fixed


def test_segment_of_a_recording_over_http_reads_it_once_and_finishes(tmp_path: Path) -> None:
    """A network source that ends is reconnected when served live; ``segment`` reads it once
    (it went on reading it again for ever, and the output was never finished)."""
    import threading

    from pipeline.config import build_config
    from pipeline.offline import segment_file
    from tests.helpers_video import make_test_video
    from tests.integration.fakes_net import FileHttpServer

    make_test_video(tmp_path / "clip.mp4", frames=12, width=64, height=48, fps=12)
    out = tmp_path / "out.mp4"
    with FileHttpServer(tmp_path) as server:
        url = f"http://127.0.0.1:{server.port}/clip.mp4"
        done: list[object] = []
        run = threading.Thread(
            target=lambda: done.append(segment_file(build_config({}), url, output=out, model="null")),
            daemon=True,
        )
        run.start()
        run.join(timeout=30)
        assert not run.is_alive(), "segment of an HTTP recording did not finish"
    assert done and done[0].frames == 12  # type: ignore[attr-defined]
    assert _frame_times(out) == pytest.approx([i / 12 for i in range(12)], abs=2e-3)


def test_segment_of_an_http_source_that_never_opens_gives_up_saying_why(tmp_path: Path) -> None:
    from pipeline.config import build_config
    from pipeline.offline import OfflineError, segment_file
    from tests.integration.fakes_net import FileHttpServer

    with FileHttpServer(tmp_path) as server:
        url = f"http://127.0.0.1:{server.port}/missing.mp4"
        with pytest.raises(OfflineError) as exc:
            segment_file(build_config({}), url, masks_dir=tmp_path / "m", model="null", stall_timeout_s=4)
    msg = str(exc.value)
    assert "no progress" in msg and "404" in msg, msg
