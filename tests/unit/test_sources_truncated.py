"""A local file that ends well before the length its header states fails as truncated.

Every clip here is encoded at test time. MP4s are remuxed with their index (``moov``) at
the front, as cameras and web exports write them, so a truncated copy still opens and
decodes its first frames: the case that used to end as if the file were complete.
"""

from __future__ import annotations

import time
from pathlib import Path

import av
import pytest

from pipeline.config import ReconnectConfig
from pipeline.slot import DropPolicy, FrameSlot
from pipeline.sources import SourceError, parse_source
from pipeline.stream import StreamWorker
from pipeline.types import Frame, StreamState
from tests.helpers_video import make_test_video

S = StreamState
FAST = ReconnectConfig(initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0, stall_timeout_s=0.3)
FRAMES, FPS = 50, 25
TRUNCATED = r"^file ends after \d+ of 50 frames: truncated or damaged$"


def remux_mp4(src: Path, dst: Path, *, shift_s: float = 0.0) -> Path:
    """Copy ``src``'s video into an MP4 with its index first. ``shift_s`` moves every
    timestamp earlier, as a stream-copy cut does: the muxer writes an edit list that hides
    the frames before zero, which the file still holds and its frame count still includes."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "+faststart"}) as out:
        ins = inp.streams.video[0]
        outs = out.add_stream_from_template(ins)
        shift = round(shift_s / ins.time_base)
        for packet in inp.demux(ins):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = outs
            out.mux(packet)
    return dst


def cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def read_all(uri: str) -> int:
    """Open and decode to the end; the number of pictures (raises what the source raises)."""
    src = parse_source(uri).create()
    try:
        src.open()
        return sum(1 for f in src.frames() if f is not None)
    finally:
        src.close()


def read_until_error(uri: str) -> tuple[int, SourceError]:
    src = parse_source(uri).create()
    src.open()
    n = 0
    try:
        with pytest.raises(SourceError) as exc:
            for f in src.frames():
                n += f is not None
    finally:
        src.close()
    return n, exc.value


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    raw = make_test_video(d / "raw.mp4", frames=FRAMES, fps=FPS)
    remux_mp4(raw, d / "clip.mp4")
    remux_mp4(raw, d / "edited.mp4", shift_s=0.5)
    for suffix in (".mkv", ".avi", ".ts", ".h264"):
        make_test_video(d / f"clip{suffix}", frames=FRAMES, fps=FPS)
    for name in ("clip.mp4", "clip.mkv", "clip.avi", "clip.ts", "clip.h264"):
        cut(d / name, d / f"cut-{name}", 0.3)
    return d


def test_truncated_mp4_fails_with_how_far_it_got(media: Path) -> None:
    n, err = read_until_error(str(media / "cut-clip.mp4"))
    assert 0 < n < FRAMES
    assert str(err) == f"file ends after {n} of 50 frames: truncated or damaged"
    assert not err.retryable


def test_truncated_avi_fails_by_its_declared_frame_count(media: Path) -> None:
    n, err = read_until_error(str(media / "cut-clip.avi"))
    assert n < FRAMES
    assert not err.retryable
    assert str(err) == f"file ends after {n} of 50 frames: truncated or damaged"


def test_truncated_matroska_fails_by_its_declared_duration(media: Path) -> None:
    n, err = read_until_error(str(media / "cut-clip.mkv"))
    assert 0 < n < FRAMES
    assert not err.retryable
    assert str(err).endswith(" of 2.0 s: truncated or damaged"), err
    assert str(err).startswith("file ends after 0.")


@pytest.mark.parametrize("name", ["clip.mp4", "raw.mp4", "clip.mkv", "clip.avi", "clip.ts", "clip.h264"])
def test_complete_files_end_without_error(media: Path, name: str) -> None:
    assert read_all(str(media / name)) == FRAMES


def test_an_edit_list_hiding_frames_is_not_truncation(media: Path) -> None:
    """A stream-copy cut holds (and counts) 50 frames but presents only those after 0.5 s."""
    with av.open(str(media / "edited.mp4")) as c:
        assert c.streams.video[0].frames == FRAMES
    assert FRAMES - 15 < read_all(str(media / "edited.mp4")) < FRAMES - 10
    cut(media / "edited.mp4", media / "cut-edited.mp4", 0.6)
    n, err = read_until_error(str(media / "cut-edited.mp4"))
    assert n > 0 and str(err) == f"file ends after {n} of 50 frames: truncated or damaged"



def test_a_few_missing_frames_are_tolerated(media: Path, tmp_path: Path) -> None:
    """Declared lengths are approximate: losing the last frame or two is not an error."""
    whole = (media / "clip.mp4").read_bytes()
    with av.open(str(media / "clip.mp4")) as c:
        last = max(p.pos for p in c.demux(c.streams.video[0]) if p.size and p.pos is not None)
    part = tmp_path / "part.mp4"
    part.write_bytes(whole[:last])  # the last frame's data is gone
    assert read_all(str(part)) == FRAMES - 1


@pytest.mark.parametrize("name", ["cut-clip.ts", "cut-clip.h264"])
def test_files_that_declare_no_length_still_end_quietly(media: Path, name: str) -> None:
    assert 0 < read_all(str(media / name)) < FRAMES


def _run(uri: str) -> tuple[StreamWorker, FrameSlot]:
    slot = FrameSlot(capacity=4, policy=DropPolicy.BLOCK)
    worker = StreamWorker("t", parse_source(uri), slot, reconnect=FAST, realtime=False)
    worker.start()
    return worker, slot


def _drain(worker: StreamWorker, slot: FrameSlot, until: int = 10**6, timeout: float = 10.0) -> list[Frame]:
    out: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(out) < until and time.monotonic() < deadline:
        f = slot.take()
        if f is not None:
            out.append(f)
        elif worker.status().state.terminal and len(slot) == 0:
            break
        else:
            time.sleep(0.002)
    return out


def test_stream_of_a_truncated_file_ends_failed_with_the_reason(media: Path) -> None:
    worker, slot = _run(str(media / "cut-clip.mp4"))
    frames = _drain(worker, slot)
    assert worker.wait_state({S.FAILED, S.STOPPED}, 5) is S.FAILED
    st = worker.status()
    assert st.error is not None
    assert st.error == f"file ends after {len(frames)} of 50 frames: truncated or damaged"
    assert 0 < st.frames < FRAMES and not worker.finished and st.reconnects == 0
    assert worker.stop(2)


def test_a_looping_truncated_file_fails_instead_of_looping_the_fragment(media: Path) -> None:
    worker, slot = _run(f"{media / 'cut-clip.mp4'}?loop=1")
    frames = _drain(worker, slot)
    assert worker.wait_state({S.FAILED}, 5) is S.FAILED
    assert [f.index for f in frames if f.discontinuity] == [0], "the fragment was played again"
    assert "truncated or damaged" in (worker.status().error or "")
    assert worker.stop(2)


def test_a_looping_complete_file_still_loops(media: Path) -> None:
    worker, slot = _run(f"{media / 'clip.mp4'}?loop=1")
    try:
        frames = _drain(worker, slot, until=2 * FRAMES + 5)
        assert [f.index for f in frames if f.discontinuity] == [0, FRAMES, 2 * FRAMES]
        assert worker.status().state is S.STREAMING and worker.status().error is None
    finally:
        assert worker.stop(2)
