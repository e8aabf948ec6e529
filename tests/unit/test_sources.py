"""Source URI parsing and the decoders on local inputs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import av.error
import numpy as np
import pytest

from pipeline.config import SourceOptions
from pipeline.sources import SourceError, parse_source, redact
from pipeline.sources.av_source import AvSource, describe_av_error
from pipeline.sources.demo import DemoRenderer, DemoSource
from pipeline.sources.webcam import WebcamSource
from tests.helpers_video import make_test_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_video(tmp_path_factory.mktemp("media") / "clip.mp4", frames=12, fps=24)


def test_rtsp_options_from_query_are_stripped_from_the_target() -> None:
    spec = parse_source("rtsp://cam.local:554/live?transport=udp&read_timeout=2&fps=10&low_latency=0")
    assert spec.kind == "network" and spec.live
    assert spec.options.rtsp_transport == "udp"
    assert spec.options.read_timeout_s == 2 and spec.options.target_fps == 10
    assert spec.options.low_latency is False
    assert spec.target == "rtsp://cam.local:554/live"
    assert isinstance(spec.create(), AvSource)


def test_query_options_merge_over_given_options() -> None:
    base = SourceOptions(open_timeout_s=9, rtsp_transport="udp")
    spec = parse_source("rtsp://h/x?open_timeout_s=3", options=base)
    assert spec.options.open_timeout_s == 3 and spec.options.rtsp_transport == "udp"


def test_http_keeps_the_cameras_own_query_parameters() -> None:
    spec = parse_source("http://10.0.0.2/cgi/mjpg?action=stream&resolution=vga&format=mpjpeg&loop=0")
    assert spec.target == "http://10.0.0.2/cgi/mjpg?action=stream&resolution=vga"
    assert spec.format == "mpjpeg"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://cam/video.cgi?user=admin&pwd=hunter2", "http://cam/video.cgi?user=admin&pwd=***"),
        ("http://cam/a.mjpg?password=p&fps=5", "http://cam/a.mjpg?password=***&fps=5"),
        ("https://s3/x.mp4?X-Amz-Signature=abc&X-Amz-Credential=zz", "https://s3/x.mp4?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("http://h/live?token=t0k&key=k3y&keyframe=3", "http://h/live?token=***&key=***&keyframe=3"),
        ("rtsp://u:p@cam/live?rtsp_transport=tcp", "rtsp://u:***@cam/live?rtsp_transport=tcp"),
        # cheap P2P cameras (Foscam clones): videostream.cgi?loginuse=...&loginpas=...
        (
            "http://cam/videostream.cgi?loginuse=admin&loginpas=hunter2&resolution=32",
            "http://cam/videostream.cgi?loginuse=admin&loginpas=***&resolution=32",
        ),
        # Blue Iris and many cameras' snapshot CGIs: ?user=...&pw=...
        ("http://cam/image/front?user=admin&pw=hunter2", "http://cam/image/front?user=admin&pw=***"),
        ("http://cam/snapshot.cgi?user=admin&psw=hunter2", "http://cam/snapshot.cgi?user=admin&psw=***"),
        ("http://cam/mjpg?usr=admin&pwd=hunter2", "http://cam/mjpg?usr=admin&pwd=***"),
    ],
)
def test_secrets_in_query_parameters_are_redacted_too(uri: str, shown: str) -> None:
    assert redact(uri) == shown
    assert parse_source(uri).display == shown


def test_credentials_are_redacted_for_display() -> None:
    spec = parse_source("rtsp://admin:hunter2@192.168.1.5:554/stream1")
    assert spec.display == "rtsp://admin:***@192.168.1.5:554/stream1"
    assert "hunter2" in spec.target  # the decoder still needs them
    assert redact("rtsp://[::1]:8554/x") == "rtsp://[::1]:8554/x"
    assert redact("rtsp://u:p@[::1]:8554/x") == "rtsp://u:***@[::1]:8554/x"


@pytest.mark.parametrize(
    ("uri", "shown", "target"),
    [
        # digits, a slash, more: a password when an IP address or a port follows the @
        ("rtsp://admin:1234/5@10.0.0.7:554/live", "rtsp://admin:***@10.0.0.7:554/live",
         "rtsp://admin:1234%2F5@10.0.0.7:554/live"),
        ("rtsp://admin:1234/5@10.0.0.7/live", "rtsp://admin:***@10.0.0.7/live",
         "rtsp://admin:1234%2F5@10.0.0.7/live"),
        ("rtsp://admin:1234/5@cam.local:554/live", "rtsp://admin:***@cam.local:554/live",
         "rtsp://admin:1234%2F5@cam.local:554/live"),
        # ...and a port, then a path holding an @, otherwise
        ("http://cam:8080/snap@2x.jpg", "http://cam:8080/snap@2x.jpg", "http://cam:8080/snap@2x.jpg"),
    ],
)
def test_a_password_of_digits_and_a_slash_is_told_from_a_port_and_a_path(
    uri: str, shown: str, target: str
) -> None:
    spec = parse_source(uri)
    assert (spec.display, spec.target, redact(uri)) == (shown, target, shown)


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("gopher://example.com/x", "unsupported source scheme 'gopher'"),
        ("ftp://u:pw@example.com/x", "unsupported source scheme 'ftp'"),
        ("", "empty"),
        ("rtsp://cam/x\n", None),  # trailing whitespace is trimmed, fine
        ("rtsp://cam/x\x00y", "control characters"),
        ("rtsp:///nohost", "has no host"),
        ("rtsp://cam/x?transport=carrier-pigeon", "rtsp_transport"),
        ("rtsp://cam/x?read_timeout=-1", "read_timeout_s"),
        ("rtsp://cam/x?format=mp4;rm", "format"),
        ("webcam:abc", "expected webcam:N"),
        ("demo:other", "unknown demo source"),
        ("demo?bogus=1", "unknown source query parameter 'bogus'"),
    ],
)
def test_bad_uris_raise_one_line_value_errors(uri: str, needle: str | None) -> None:
    if needle is None:
        parse_source(uri)
        return
    with pytest.raises(ValueError) as exc:
        parse_source(uri)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
    assert "pw@" not in msg


def test_allowed_schemes_are_enforced() -> None:
    with pytest.raises(ValueError, match="unsupported source scheme 'rtmp'"):
        parse_source("rtmp://h/app/key", allowed_schemes=["rtsp"])
    with pytest.raises(ValueError, match="'file'"):
        parse_source("/tmp", allowed_schemes=["rtsp"])
    with pytest.raises(ValueError, match="'webcam'"):
        parse_source("/dev/video0", allowed_schemes=["rtsp"])


def test_file_sources(clip: Path) -> None:
    spec = parse_source(str(clip))
    assert spec.kind == "file" and spec.target == str(clip.resolve()) and not spec.live
    assert parse_source(f"file://{clip}").target == str(clip.resolve())
    looped = parse_source(f"{clip}?loop=1&realtime=true")
    assert looped.options.loop and looped.live
    with pytest.raises(ValueError, match="not found"):
        parse_source(str(clip.with_name("missing.mp4")))
    with pytest.raises(ValueError, match="not a regular file"):
        parse_source(str(clip.parent))
    with pytest.raises(ValueError, match="unknown source query parameter 'x'"):
        parse_source(f"{clip}?x=1")
    with pytest.raises(ValueError, match="loop='maybe'"):
        parse_source(f"{clip}?loop=maybe")
    with pytest.raises(ValueError, match="must be local"):
        parse_source("file://otherhost/etc/passwd")


def test_media_dir_confines_file_sources(clip: Path, tmp_path: Path) -> None:
    media = clip.parent
    assert parse_source("clip.mp4", media_dir=media).target == str(clip.resolve())
    assert parse_source(str(clip), media_dir=media).kind == "file"
    with pytest.raises(ValueError, match="outside the media directory"):
        parse_source("../../etc/passwd", media_dir=media)
    outside = make_test_video(tmp_path / "outside.mp4", frames=2)
    with pytest.raises(ValueError, match="outside the media directory"):
        parse_source(str(outside), media_dir=media)
    link = media / "escape.mp4"
    os.symlink(outside, link)
    try:
        with pytest.raises(ValueError, match="outside the media directory"):
            parse_source("escape.mp4", media_dir=media)
    finally:
        link.unlink()


def test_webcam_and_demo_forms() -> None:
    for uri, target in [("webcam:0", "0"), ("webcam://2", "2"), ("/dev/video3", "/dev/video3")]:
        spec = parse_source(uri)
        assert spec.kind == "webcam" and spec.target == target and spec.live
        assert isinstance(spec.create(), WebcamSource)
    for uri in ("demo", "demo:", "demo://", "demo?fps=10"):
        spec = parse_source(uri)
        assert spec.kind == "demo" and spec.live
        assert isinstance(spec.create(), DemoSource)
    assert parse_source("demo?fps=10").options.target_fps == 10


def test_av_source_reads_a_file(clip: Path) -> None:
    src = parse_source(str(clip)).create()
    info = src.open()
    assert (info.width, info.height) == (160, 120) and info.fps == pytest.approx(24)
    frames = [f for f in src.frames() if f is not None]
    src.close()
    assert len(frames) == 12
    assert all(f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8 for f in frames)
    pts = [f.pts for f in frames]
    assert pts[0] == pytest.approx(0) and pts == sorted(pts) and pts[-1] == pytest.approx(11 / 24)
    assert not np.array_equal(frames[0].image, frames[1].image)


def test_av_source_open_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00" * 4096)
    src = parse_source(str(bad)).create()
    with pytest.raises(SourceError) as exc:
        src.open()
    assert not exc.value.retryable and "invalid data" in str(exc.value)


@pytest.mark.parametrize(
    ("exc", "network", "needle", "retry"),
    [
        (av.error.HTTPNotFoundError(errno.ENOENT, "Server returned 404 Not Found", "u"), True, "404", True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True, "connection refused", True),
        (av.error.InvalidDataError(errno.EINVAL, "Invalid data", "secret-url"), False, "invalid data", False),
        (FileNotFoundError(errno.ENOENT, "No such file", "f"), False, "file not found", False),
        (OSError(errno.EIO, "Input/output error"), True, "protocol error", True),
        (av.error.ArgumentError(errno.EINVAL, "Invalid argument", "secret-url"), True, "redirect", True),
    ],
)
def test_describe_av_error(exc: BaseException, network: bool, needle: str, retry: bool) -> None:
    msg, retryable = describe_av_error(exc, network=network, read_timeout_s=5)
    assert needle in msg and retryable is retry
    assert "secret-url" not in msg


def test_describe_av_error_names_the_timeout_that_ran_out() -> None:
    exit_error = av.error.ExitError(-0x54495845, "Immediate exit requested", "secret-url")
    socket_timeout = av.error.TimeoutError(errno.ETIMEDOUT, "Connection timed out", "secret-url")
    # while opening: PyAV's open timeout ends the open with ExitError
    msg, retry = describe_av_error(exit_error, network=True, read_timeout_s=10, open_timeout_s=1)
    assert msg == "timed out connecting: no answer from the source within 1 s" and retry
    # while opening: the socket timeout (read_timeout_s) also covers the connect
    msg, retry = describe_av_error(socket_timeout, network=True, read_timeout_s=2, open_timeout_s=10)
    assert msg == "timed out connecting: no data from the source for 2 s" and retry
    # while reading
    for exc in (exit_error, socket_timeout):
        msg, retry = describe_av_error(exc, network=True, read_timeout_s=10)
        assert msg == "timed out: no data from the source for 10 s" and retry


def test_demo_renders_real_moving_content() -> None:
    r = DemoRenderer()
    a, b, far = r.render(0.0), r.render(0.04), r.render(7.0)
    assert a.shape == (360, 640, 3) and a.dtype == np.uint8 and a.flags["C_CONTIGUOUS"]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.1  # every frame moves
    assert np.abs(a.astype(int) - far.astype(int)).mean() > 10
    assert np.array_equal(r.render(1.5), r.render(1.5))  # a pure function of time


def test_demo_source_paces_itself_and_stops() -> None:
    src = parse_source("demo?fps=50").create()
    info = src.open()
    assert info.fps == 50 and info.live
    it = src.frames()
    frames = [next(it) for _ in range(3)]
    assert [f.pts for f in frames if f is not None] == pytest.approx([0, 0.02, 0.04])
    src.interrupt()
    assert list(it) == []
    src.close()


def test_missing_webcam_is_retryable() -> None:
    src = parse_source("/dev/video9").create()
    with pytest.raises(SourceError) as exc:
        src.open()
    assert exc.value.retryable and "/dev/video9 not found" in str(exc.value)


def test_a_host_name_that_does_not_resolve_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """FFmpeg reports a failed name lookup as a generic I/O error; the message names the host
    (never the URL, which may hold a password)."""
    import socket

    import pipeline.sources.av_source as av_source

    def lookup(host, *args, **kwargs):
        if host == "cam.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    def fail_open(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(av_source.av, "open", fail_open)
    src = AvSource(parse_source("http://user:secret@cam.invalid:8080/video.mjpg"))
    with pytest.raises(SourceError) as exc:
        src.open()
    assert "cannot resolve host 'cam.invalid'" in str(exc.value) and "secret" not in str(exc.value)
    assert exc.value.retryable  # DNS can come back
    src = AvSource(parse_source("http://127.0.0.1:9/video.mjpg"))  # an address: no lookup to blame
    with pytest.raises(SourceError) as exc:
        src.open()
    assert "protocol error" in str(exc.value)
