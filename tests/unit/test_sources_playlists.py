"""A local file source is read as itself: never as a playlist or list of other files.

The media directory confines the file a user names. A playlist inside it that names a
file outside must not make the server read that file, so the demuxers that follow
references (HLS, ffconcat, DASH, SDP, ...) are refused before they open anything.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import av
import pytest

from pipeline.config import ReconnectConfig
from pipeline.slot import DropPolicy, FrameSlot
from pipeline.sources import SourceError, av_source, parse_source
from pipeline.sources.av_source import AvSource
from pipeline.stream import StreamWorker
from pipeline.types import StreamState
from tests.helpers_video import make_test_video
from tests.integration.fakes_net import FileHttpServer

S = StreamState
FAST = ReconnectConfig(initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0, stall_timeout_s=0.3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(media dir, the file outside it that the lists below point to)."""
    root = tmp_path_factory.mktemp("lists")
    media, outside = root / "media", root / "private"
    media.mkdir()
    outside.mkdir()
    secret = make_test_video(outside / "secret.mp4", frames=10)
    make_test_video(media / "inside.mp4", frames=5)
    hls = f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n"
    (media / "list.m3u8").write_text(hls)
    (media / "tagged.m3u8").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x14" + b"\x00" * 20 + hls.encode())
    (media / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    (media / "relative.ffconcat").write_text("ffconcat version 1.0\nfile 'inside.mp4'\n")
    (media / "manifest.mpd").write_text(
        '<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" '
        'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"></MPD>\n'
    )
    (media / "cam.sdp").write_text(
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=cam\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n"
    )
    return media, secret


def test_the_playlist_is_one_ffmpeg_would_follow(dirs: tuple[Path, Path]) -> None:
    """Opened without the guard, the playlist streams the file outside the media directory."""
    media, _ = dirs
    with av.open(str(media / "list.m3u8")) as c:
        assert c.format.name == "hls"
        assert sum(1 for _ in c.decode(video=0)) == 10


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("list.m3u8", "hls"),
        ("tagged.m3u8", "hls"),
        ("list.ffconcat", "concat"),
        ("relative.ffconcat", "concat"),
        ("manifest.mpd", "dash"),
        ("cam.sdp", "sdp"),
    ],
)
def test_lists_in_the_media_dir_are_refused_with_a_clear_message(
    dirs: tuple[Path, Path], name: str, fmt: str
) -> None:
    media, _ = dirs
    spec = parse_source(name, media_dir=media)  # the list itself is inside: the URI is valid
    src = spec.create()
    with pytest.raises(SourceError) as exc:
        src.open()
    src.close()
    assert str(exc.value) == f"{name}: playlists and file lists are not served as file sources ({fmt})"
    assert not exc.value.retryable


def _run(spec_uri: str, media: Path) -> StreamWorker:
    slot = FrameSlot(capacity=4, policy=DropPolicy.DROP_OLDEST)
    worker = StreamWorker("t", parse_source(spec_uri, media_dir=media), slot, reconnect=FAST, realtime=False)
    worker.start()
    return worker


def test_stream_of_a_playlist_fails_without_a_frame_from_outside(dirs: tuple[Path, Path]) -> None:
    media, _ = dirs
    worker = _run("list.m3u8", media)
    assert worker.wait_state({S.FAILED, S.STOPPED}, 5) is S.FAILED
    time.sleep(0.1)
    st = worker.status()
    assert st.frames == 0 and st.reconnects == 0 and st.width is None
    assert st.error == "list.m3u8: playlists and file lists are not served as file sources (hls)"
    assert worker.stop(2)


def test_ffmpeg_itself_refuses_list_demuxers_for_local_files(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a list the signature check misses never reaches a demuxer that follows it."""
    media, _ = dirs
    monkeypatch.setattr(av_source, "sniff_reference_format", lambda path: None)
    for name in ("list.m3u8", "list.ffconcat"):
        worker = _run(name, media)
        assert worker.wait_state({S.FAILED, S.STOPPED}, 5) is S.FAILED
        st = worker.status()
        assert st.frames == 0 and st.reconnects == 0
        assert "playlists and file lists are not served as file sources" in (st.error or ""), st.error
        assert worker.stop(2)


def test_a_list_demuxer_cannot_be_asked_for(dirs: tuple[Path, Path]) -> None:
    media, _ = dirs
    for fmt in ("hls", "concat", "dash", "lavfi", "mp4,hls"):
        with pytest.raises(ValueError, match=f"file source cannot use format={fmt}: playlists"):
            parse_source(f"inside.mp4?format={fmt}", media_dir=media)
    spec = dataclasses.replace(parse_source("list.ffconcat", media_dir=media), format="concat")
    with pytest.raises(SourceError, match=r"^list.ffconcat: .* \(concat\)$") as exc:
        spec.create().open()
    assert not exc.value.retryable


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi", ".ts", ".mov", ".h264"])
def test_ordinary_media_files_still_open(tmp_path: Path, suffix: str) -> None:
    clip = make_test_video(tmp_path / f"c{suffix}", frames=8)
    src = parse_source(clip.name, media_dir=tmp_path).create()
    src.open()
    assert sum(1 for f in src.frames() if f is not None) == 8
    src.close()
    mjpeg = make_test_video(tmp_path / "m.avi", frames=4, codec="mjpeg")
    src = parse_source(f"{mjpeg.name}?format=avi", media_dir=tmp_path).create()
    src.open()
    assert sum(1 for f in src.frames() if f is not None) == 4
    src.close()


def test_network_sources_keep_their_demuxers(tmp_path: Path) -> None:
    """An HLS stream over HTTP (loopback here) is a network source, not a local list."""
    opts = AvSource(parse_source("http://127.0.0.1:9/live.m3u8"))._av_options()
    assert "format_whitelist" not in opts and "protocol_whitelist" not in opts
    make_test_video(tmp_path / "seg0.ts", frames=10, fps=10)
    (tmp_path / "live.m3u8").write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nseg0.ts\n#EXT-X-ENDLIST\n"
    )
    with FileHttpServer(tmp_path) as server:
        src = parse_source(f"http://127.0.0.1:{server.port}/live.m3u8?open_timeout=5&read_timeout=5").create()
        try:
            src.open()
            assert sum(1 for f in src.frames() if f is not None) == 10
        finally:
            src.close()
