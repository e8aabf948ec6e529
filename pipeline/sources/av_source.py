"""Files and network streams (RTSP, RTMP, HTTP: MJPEG, HLS, progressive MP4) through PyAV/FFmpeg.

Every network read is bounded: FFmpeg's socket ``timeout`` option plus PyAV's
interrupt-callback timeout (``av.open(timeout=(open, read))``) make a frozen peer raise
instead of blocking the thread for ever. Closing a container from another thread is
unsafe in FFmpeg, so ``interrupt`` raises a flag that is checked between packets and that
makes the clock PyAV's timeouts read run out on the source's own thread (``_StopClock``):
an open or a read already blocked in FFmpeg then ends within about 100 ms.

A local file is opened as itself only: demuxers that read a file as a list of other files
or URLs (HLS playlists, ffconcat lists, DASH manifests, ...) are refused before they open
anything, and a file that ends well before the length its header states fails as
truncated instead of ending like a complete file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import av.error
import numpy as np
from av.sidedata.sidedata import SideDataContainer
from av.sidedata.sidedata import Type as SideDataType
from av.video.reformatter import VideoReformatter

from pipeline.sources.base import (
    RawFrame,
    Source,
    SourceAuthError,
    SourceError,
    SourceInfo,
    SourceStalled,
    reference_format,
    reference_refusal,
)

if TYPE_CHECKING:
    from pipeline.sources import SourceSpec

log = logging.getLogger("segstream.source")

# Consecutive packets that fail to decode before the stream is declared broken.
_MAX_DECODE_ERRORS = 50

# How far a local file may fall short of the length its header states before it counts as
# truncated: declared counts and durations are rounded, and edit lists trim a few frames.
_SHORT_FRAMES = 3  # frames (or frame durations), or
_SHORT_FRACTION = 0.05  # of the declared length, whichever is more
# Containers whose header states the playing time. Elsewhere FFmpeg estimates a duration
# from the data itself (timestamps, bitrate), which says nothing about missing data.
_DURATION_FORMATS = frozenset({"mov", "mp4", "matroska", "webm"})

_SNIFF_BYTES = 4096

_AVFMT_NOTIMESTAMPS = 0x0080  # libavformat: the format has no timestamps of its own

# A camera's snapshot URL (``/snapshot.jpg``, ``/cgi-bin/snapshot.cgi``, ``.../picture``) answers
# each request with one picture: it is asked again for the next one, every this many seconds
# (``1 / target_fps`` when that is set), as long as the stream runs.
_SNAPSHOT_INTERVAL_S = 0.5
# A URL ending like a picture file makes FFmpeg pick its file-sequence demuxer (``image2``) by
# the name alone, which reads the picture by the length the server announces: a snapshot sent
# chunked (ESP32-CAM) or without a Content-Length fails as invalid data. ``image2pipe`` reads
# the same pictures to their end, whatever the transfer.
_PICTURE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_PICTURE_URL_FORMAT = "image2pipe"


def _single_picture_format(name: str) -> bool:
    """A demuxer that reads still pictures (one per request, from an HTTP URL)."""
    return any(part.endswith("_pipe") or part in ("image2", _PICTURE_URL_FORMAT) for part in name.split(","))


def _picture_url(url: str) -> bool:
    """An HTTP(S) URL whose path ends like a picture file (``/snapshot.jpg``)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and Path(parts.path).suffix.lower() in _PICTURE_SUFFIXES


@functools.cache
def _local_format_whitelist() -> str:
    """Every demuxer FFmpeg has, less the ones that open other files or URLs: passed as
    ``format_whitelist``, it makes FFmpeg refuse those once probing picked one, before
    their header parser runs (and so before they open whatever the file names)."""
    names = []
    for name in sorted(av.formats_available):
        with contextlib.suppress(Exception):
            if av.ContainerFormat(name).is_input and reference_format(name) is None:
                names.append(name)
    return ",".join(names)


def sniff_reference_format(path: str | Path) -> str | None:
    """The demuxer that would read ``path`` as a list of other files or URLs, from the
    signature FFmpeg probes for, or None. Unreadable files are left to FFmpeg's own error."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            if head[:3] == b"ID3" and len(head) >= 10:  # FFmpeg probes what follows an ID3v2 tag
                size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
                f.seek(size + (10 if head[5] & 0x10 else 0))
                head = f.read(_SNIFF_BYTES)
    except OSError:
        return None
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"#EXTM3U"):
        return "hls"
    if head.startswith(b"ffconcat version"):
        return "concat"
    if head.startswith(b"v=0") and b"c=IN IP" in head:
        return "sdp"
    if head.startswith(b"<"):
        if b"<MPD" in head:
            return "dash"
        if b"<CompositionPlaylist" in head:
            return "imf"
    return None


@dataclass(frozen=True, slots=True)
class _Orientation:
    """How a decoded picture is turned to show it as a player does (a display matrix: phone
    videos are stored sideways with a rotation in their metadata)."""

    transpose: bool
    flip_rows: bool  # after the transpose
    flip_cols: bool

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.transpose:
            image = image.transpose(1, 0, 2)
        if self.flip_rows:
            image = image[::-1]
        if self.flip_cols:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)


_UPRIGHT = _Orientation(False, False, False)


@functools.lru_cache(maxsize=16)
def _orientation(matrix: bytes) -> _Orientation:
    """The quarter-turns and mirrors of an FFmpeg display matrix (nine int32 values, row-major
    ``a b u / c d v / x y w``), which maps a stored pixel (p, q) to the shown (a*p + c*q,
    b*p + d*q). Angles between quarter turns (rare, and not shown rotated by most players)
    are taken as the nearest one."""
    if len(matrix) < 36:
        return _UPRIGHT
    a, b, _, c, d = np.frombuffer(matrix[:20], dtype="<i4").tolist()
    if abs(a) + abs(d) >= abs(b) + abs(c):  # shown x from stored x: no transpose
        return _Orientation(False, flip_rows=d < 0, flip_cols=a < 0)
    return _Orientation(True, flip_rows=b < 0, flip_cols=c < 0)


def _sample_aspect_ratio(stream: Any) -> Fraction | None:
    """The stream's pixel aspect ratio when it is not square (the container's, else the
    codec's, as FFmpeg guesses it), else None."""
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if sar is not None and sar.numerator > 0 and sar.denominator > 0:
            # Sanity bounds: a broken header must not make a picture hundreds of times wider.
            return Fraction(sar) if sar != 1 and Fraction(1, 8) <= sar <= 8 else None
    return None


def _shown_width(width: int, sar: Fraction) -> int:
    return max(1, round(width * sar))


def _display_orientation(frame: Any) -> _Orientation:
    # Not ``frame.side_data``: the frame caches that container, which points back at the
    # frame, and the cycle keeps every decoded picture (and its scaler's threads) alive until
    # the garbage collector runs. A container of our own points one way only.
    data = SideDataContainer(frame).get(SideDataType.DISPLAYMATRIX)  # type: ignore[call-arg]
    return _UPRIGHT if data is None else _orientation(bytes(data))


def video_stream(container: Any) -> Any:
    """The video stream a player picks (FFmpeg's "best" one): not a cover picture stored as a
    one-frame video stream ahead of the film, nor a small preview track."""
    return container.streams.best("video") or container.streams.video[0]


@dataclass(frozen=True, slots=True)
class _DeclaredLength:
    """How long a local file's header says its video is."""

    frames: int | None  # the video stream's frame (sample) count, when stated
    start_s: float = 0.0
    end_s: float | None = None  # where the video should end, seconds on the stream's timeline
    slack_s: float = 0.0  # shortfall against ``end_s`` still taken as complete

    @property
    def frames_slack(self) -> int:
        return max(_SHORT_FRAMES, math.ceil(_SHORT_FRACTION * (self.frames or 0)))


def _tag_seconds(value: object) -> float | None:
    """A Matroska ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``) in seconds, or None."""
    if not isinstance(value, str):
        return None
    h, _, rest = value.strip().partition(":")
    m, _, sec = rest.partition(":")
    try:
        total = int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return None
    return total if math.isfinite(total) and total > 0 else None


def _declared_length(container: Any, stream: Any, fps: float | None) -> _DeclaredLength | None:
    """What the header states about the video's length, or None when it states nothing.

    MP4/MOV state each track's duration (accounting for edit lists, which can hide many of
    the samples the frame count includes); Matroska/WebM a per-track ``DURATION`` tag or
    the whole file's duration, used only when the video is the file's one stream (audio may
    outlast the picture). Other containers are judged by a stated frame count (AVI, IVF...).
    """
    frames = int(stream.frames or 0) or None
    names = set(str(container.format.name).split(","))
    if not names & _DURATION_FORMATS:
        return _DeclaredLength(frames=frames) if frames else None
    tb = stream.time_base
    if stream.start_time is not None and tb:
        start = float(stream.start_time * tb)
    else:
        start = (container.start_time or 0) / av.time_base
    end: float | None = None
    if stream.duration and stream.duration > 0 and tb:
        end = start + float(stream.duration * tb)
    elif (tagged := _tag_seconds(stream.metadata.get("DURATION"))) is not None:
        # FFmpeg writes the track's end time; a muxer that writes its length instead
        # understates the end by the start offset, which errs towards "complete".
        end = tagged
    elif len(container.streams) == 1 and container.duration and container.duration > 0:
        end = ((container.start_time or 0) + container.duration) / av.time_base
    if end is None or end <= start:
        return None
    frame_s = 1.0 / fps if fps else 0.04
    slack = max(_SHORT_FRAMES * frame_s, _SHORT_FRACTION * (end - start))
    return _DeclaredLength(frames=frames, start_s=start, end_s=end, slack_s=slack)


def _unresolvable_host(url: str) -> str | None:
    """The URL's host name when it does not resolve, else None (also for IP addresses)."""
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return host
    except OSError:
        return None
    return None


def _unauthorized(url: str) -> str:
    """What a 401 answer means for ``url``: credentials missing, or wrong (never showing them)."""
    try:
        parts = urllib.parse.urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        user = password = None
    if not user and not password:
        return (
            "authentication required (401 Unauthorized): the source asks for a user name and "
            "password; give them in the URL (scheme://user:password@host/...)"
        )
    return "authentication failed (401 Unauthorized): wrong user name or password?"


def describe_av_error(
    exc: BaseException,
    *,
    network: bool,
    read_timeout_s: float,
    open_timeout_s: float | None = None,
    waited_s: float | None = None,
) -> tuple[str, bool]:
    """A user-facing message (never containing the URL, which may hold a password) and
    whether retrying can help.

    ``open_timeout_s`` is given for errors raised while opening the source: a timeout then
    names the limit that ran out. PyAV's open timeout ends the open with ``ExitError``; the
    socket timeout (``read_timeout_s``) also applies to the connect and the first reads and
    ends it with ``TimeoutError``. FFmpeg's RTSP client ends a silent server's open as
    invalid data instead, once a timeout has run out: with ``waited_s`` (how long the open
    took) that is told apart from a server that sent garbage.
    """
    strerror = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, av.error.HTTPNotFoundError):
        return "server answered 404 Not Found (wrong path or stream name?)", network
    if isinstance(exc, av.error.HTTPUnauthorizedError | av.error.HTTPForbiddenError):
        return f"server refused access ({strerror}): check the credentials", network
    if isinstance(exc, av.error.HTTPError):
        return f"server answered with an HTTP error: {strerror}", network
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening on that host and port?)", True
    if open_timeout_s is not None and isinstance(exc, av.error.ExitError):
        return f"timed out connecting: no answer from the source within {open_timeout_s:g} s", True
    if open_timeout_s is not None and isinstance(exc, av.error.TimeoutError | TimeoutError):
        return f"timed out connecting: no data from the source for {read_timeout_s:g} s", True
    limit = min(open_timeout_s, read_timeout_s) if open_timeout_s is not None else None
    if (
        network
        and limit is not None
        and waited_s is not None
        and waited_s >= 0.9 * limit
        and isinstance(exc, av.error.InvalidDataError)
    ):
        return f"timed out connecting: no answer from the source within {limit:g} s", True
    if isinstance(exc, av.error.TimeoutError | av.error.ExitError | TimeoutError):
        return f"timed out: no data from the source for {read_timeout_s:g} s", True
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return f"connection lost: {strerror}", True
    if isinstance(exc, FileNotFoundError):
        return ("not found: " + strerror) if network else "file not found", network
    if isinstance(exc, PermissionError):
        return "permission denied", network
    if isinstance(exc, av.error.InvalidDataError):
        what = "what the server sent is" if network else "the file is"
        return f"invalid data: {what} not a video stream FFmpeg can read ({strerror})", network
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"host unreachable: {strerror}", True
    if network and isinstance(exc, OSError) and exc.errno == errno.EIO:
        return f"protocol error: the server's answer could not be read ({strerror})", True
    if network and isinstance(exc, av.error.ArgumentError):
        # e.g. an HTTP redirect to file:// or another protocol, which FFmpeg will not follow
        return f"FFmpeg refused the source ({strerror}): a redirect to another protocol?", True
    if isinstance(exc, av.error.EOFError):
        if not network:
            return "the file ends before its first picture (truncated, or still being written?)", False
        return "stream ended", network
    return f"{type(exc).__name__}: {strerror}", network


class Deinterlacer:
    """FFmpeg's ``bwdif`` on interlaced pictures, whose two fields are taken a field apart in
    time, so that anything moving shows combs (analogue cameras through a DVR or encoder,
    broadcast 576i/1080i). ``auto`` starts at the first picture flagged interlaced and leaves
    progressive ones to the fields' filter (``deint=interlaced``); ``on`` deinterlaces every
    picture, for recorders that encode interlaced video without flagging it; ``off`` never.
    bwdif finishes a picture when the next one arrives: an interlaced stream is one picture
    behind (40 ms at 25 fps), a progressive one under ``auto`` is not held at all."""

    def __init__(self, mode: str, time_base: Any) -> None:
        self.mode = mode
        self._time_base = time_base
        self._graph: Any = None
        self._key: tuple[int, int, str] | None = None

    def push(self, frame: Any) -> list[Any]:
        """The pictures ready to show after ``frame``: none, one, or (after a size change) two."""
        if self.mode == "off" or (self._graph is None and self.mode == "auto" and not frame.interlaced_frame):
            return [frame]
        key = (frame.width, frame.height, frame.format.name)
        done = []
        if key != self._key:  # the first interlaced picture, or a camera that changed its size
            done = self.flush()
            self._key = key
            try:
                self._graph = self._build(frame)
            except (av.error.FFmpegError, ValueError) as e:
                # bwdif refuses some pictures (planes under 3 columns or 4 lines: a 64x6
                # 4:2:0 picture): they are shown as they are rather than failing the stream.
                log.warning(
                    "cannot deinterlace %dx%d %s pictures (%s): shown as they are",
                    frame.width, frame.height, frame.format.name, e,
                )
        if self._graph is None:  # pictures of this size and format cannot be deinterlaced
            return done + [frame]
        self._graph.push(frame)
        return done + self._pull(self._graph)

    def flush(self) -> list[Any]:
        """The picture held back, at the end of the stream."""
        graph, self._graph, self._key = self._graph, None, None
        if graph is None:
            return []
        graph.push(None)
        return self._pull(graph)

    def _build(self, frame: Any) -> Any:
        graph = av.filter.Graph()
        # One thread, as for the scaler: each stream has a thread of its own already, and
        # FFmpeg's default is a pool of one thread per core for every graph, so per stream
        # (hundreds of threads for a few cameras on a large machine), for no gain: bwdif on a
        # 576i picture takes well under a millisecond on one core.
        graph.threads = 1
        src = graph.add_buffer(
            width=frame.width, height=frame.height, format=frame.format.name,
            time_base=frame.time_base or self._time_base,
        )
        deint = "all" if self.mode == "on" else "interlaced"
        bwdif = graph.add("bwdif", f"mode=send_frame:parity=auto:deint={deint}")
        sink = graph.add("buffersink")
        src.link_to(bwdif)
        bwdif.link_to(sink)
        graph.configure()
        return graph

    @staticmethod
    def _pull(graph: Any) -> list[Any]:
        out = []
        while True:
            try:
                out.append(graph.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return out


class _StopClock:
    """The clock PyAV's timeouts read (``av.container.core.time``): the real one, except on a
    thread whose source was told to stop. There each reading is a day past the one before, so
    whichever timeout is running has run out at the next look, and FFmpeg gives up the blocked
    call at its next check of the interrupt callback (its network reads wait in slices of
    100 ms). Closing the container from the stopping thread would be unsafe; this ends a read
    blocked on a frozen camera, a live HLS playlist that stopped growing or a silent server at
    once instead of after its read timeout. The callback runs only for containers opened with
    a timeout (network ones); each reading still only goes forwards, as PyAV checks."""

    _DAY = 86400.0

    def __init__(self, real: Any) -> None:
        self._real = real
        self._stopping: dict[int, tuple[threading.Thread, threading.Event]] = {}
        self._ahead = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def monotonic(self) -> float:
        now = float(self._real.monotonic())
        entry = self._stopping.get(threading.get_ident())
        if entry is None or not entry[1].is_set() or entry[0] is not threading.current_thread():
            return now
        self._ahead += self._DAY
        return now + self._ahead

    def watch(self, stop: threading.Event) -> None:
        """From now on, PyAV calls on the calling thread end once ``stop`` is set."""
        for ident, (thread, _) in list(self._stopping.items()):
            if not thread.is_alive():
                self._stopping.pop(ident, None)
        self._stopping[threading.get_ident()] = (threading.current_thread(), stop)

    def forget(self, stop: threading.Event) -> None:
        for ident, (_, event) in list(self._stopping.items()):
            if event is stop:
                self._stopping.pop(ident, None)


def _install_stop_clock() -> _StopClock | None:
    """Put a :class:`_StopClock` where PyAV's interrupt callback looks the time up; None (reads
    then end by their timeouts only) when this PyAV does not look it up there."""
    core = getattr(getattr(av, "container", None), "core", None)
    current = getattr(core, "time", None)
    if isinstance(current, _StopClock):
        return current
    if current is not time:
        log.debug("PyAV's interrupt callback clock not found: stopped sources wait for their read timeout")
        return None
    clock = _StopClock(time)
    core.time = clock  # type: ignore[union-attr]
    return clock


_CLOCK = _install_stop_clock()


class AvSource(Source):
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.uri = spec.display
        self._network = spec.kind == "network"
        self._stop = threading.Event()
        self._container: Any = None
        self._stream: Any = None
        self._declared: _DeclaredLength | None = None
        self._frame_s: float | None = None
        self._sar: Fraction | None = None  # non-square pixels: stored width x this = shown width
        self._scaler = VideoReformatter()
        self._deinterlacer: Deinterlacer | None = None
        self._made_up_pts = False  # the demuxer numbers frames at a guessed rate (MJPEG over HTTP)
        self._snapshot = False  # an HTTP URL that answers one still picture per request
        self._requested_at = 0.0  # when the current container was asked for (snapshot polling)

    def _av_options(self) -> dict[str, str]:
        o = self.spec.options
        opts: dict[str, str] = {}
        if not self._network:
            # A local file is read as itself: no playlist or list demuxer, no network protocol.
            opts["format_whitelist"] = _local_format_whitelist()
            opts["protocol_whitelist"] = "file"
            return opts
        scheme = self.spec.target.split(":", 1)[0].lower()
        # Socket-level timeout in microseconds (``stimeout`` is silently ignored by FFmpeg 8).
        opts["timeout"] = str(int(o.read_timeout_s * 1_000_000))
        if scheme in ("rtsp", "rtsps"):
            opts["rtsp_transport"] = o.rtsp_transport
        if scheme in ("http", "https"):
            opts["reconnect"] = "0"  # reconnection is the stream worker's job, with its own backoff
        # Only for real-time protocols: HLS and progressive files are not low-latency material.
        # No ``fflags=nobuffer``: it throws away the packets read while the stream is probed,
        # which hold its first keyframe, so the first picture would wait for the next one (a
        # whole group of pictures: seconds on many cameras, at every connect and reconnect).
        if o.low_latency and scheme in ("rtsp", "rtsps", "rtmp"):
            opts["flags"] = "low_delay"
            if self.spec.format is None:
                # Probing 5 s of a live stream before the first frame is pointless latency.
                # ``analyzeduration=0`` is FFmpeg's "default" (5 s), not "none": the probe then
                # reads 20 pictures to measure the frame rate (and 7 more for H.264's decoder
                # delay), which is 5 s on a 1-5 fps camera, and hands them over in one burst.
                # For RTSP, whose streams are all known from the SDP before the probe, one
                # microsecond ends it once a stream has its parameters and two pictures, and
                # ``fpsprobesize=0`` stops it waiting for pictures to measure the frame rate
                # (the stream states it, or timestamps give it). RTMP (FLV) creates its
                # streams as their first packets come: a probe cut that short could end
                # before the video stream exists.
                rtsp = scheme in ("rtsp", "rtsps")
                opts["analyzeduration"] = "1" if rtsp else "0"
                if rtsp:
                    opts["fpsprobesize"] = "0"
                opts["probesize"] = "32768"
        return opts

    def _format(self) -> str | None:
        """The demuxer to use: ``format=`` when given, else FFmpeg's guess (``image2pipe`` for
        an HTTP URL that names a picture file)."""
        if self.spec.format is None and self._network and _picture_url(self.spec.target):
            return _PICTURE_URL_FORMAT
        return self.spec.format

    def _refuse_reference(self, fmt: str) -> SourceError:
        return SourceError(reference_refusal(Path(self.spec.target).name, fmt), retryable=False)

    def open(self) -> SourceInfo:
        if not self._network:
            fmt = reference_format(self.spec.format) or sniff_reference_format(self.spec.target)
            if fmt is not None:
                raise self._refuse_reference(fmt)
            with contextlib.suppress(OSError):
                if Path(self.spec.target).stat().st_size == 0:
                    raise SourceError("the file is empty (0 bytes)", retryable=False)
        self._container = self._open_container()
        return self._start()

    def _open_container(self) -> Any:
        """``av.open`` the source, every failure raised as a SourceError saying why."""
        o = self.spec.options
        network = self._network
        if network and _CLOCK is not None:
            _CLOCK.watch(self._stop)  # opened and read on this thread: a stop ends its calls
        started = self._requested_at = time.monotonic()
        try:
            return av.open(
                self.spec.target,
                mode="r",
                format=self._format(),
                options=self._av_options(),
                timeout=(o.open_timeout_s, o.read_timeout_s) if network else None,
            )
        except Exception as e:  # noqa: BLE001 - every failure becomes a SourceError with a clear message
            if not network and isinstance(e, av.error.ArgumentError):
                # What ``format_whitelist`` answers for a demuxer in REFERENCE_FORMATS.
                raise SourceError(
                    "cannot open: FFmpeg refused the file (invalid argument); "
                    "playlists and file lists are not served as file sources",
                    retryable=False,
                ) from None
            msg, retry = describe_av_error(
                e,
                network=network,
                read_timeout_s=o.read_timeout_s,
                open_timeout_s=o.open_timeout_s if network else None,
                waited_s=time.monotonic() - started,
            )
            if isinstance(e, av.error.HTTPUnauthorizedError):
                msg = _unauthorized(self.spec.target)
            elif (
                isinstance(e, OSError)
                and e.errno == errno.EPROTONOSUPPORT
                and self.spec.target.lower().startswith(("rtsp:", "rtsps:"))
            ):
                # The camera's "461 Unsupported Transport": it streams over the other one.
                other = "udp" if o.rtsp_transport == "tcp" else "tcp"
                msg = (
                    f"the camera does not stream over {o.rtsp_transport.upper()} (unsupported "
                    f"transport): try ?rtsp_transport={other}"
                )
            elif network and (unresolved := _unresolvable_host(self.spec.target)) is not None:
                # FFmpeg reports a failed name lookup as a generic I/O error.
                msg = f"cannot resolve host {unresolved!r}: check the address (or the DNS)"
            if network and isinstance(e, av.error.HTTPUnauthorizedError | av.error.HTTPForbiddenError):
                raise SourceAuthError(f"cannot open: {msg}") from None
            raise SourceError(f"cannot open: {msg}", retryable=retry) from None

    def _start(self) -> SourceInfo:
        """Check the opened container and pick its video stream."""
        o = self.spec.options
        network = self._network
        if not network:
            fmt = reference_format(self._container.format.name)
            if fmt is not None:
                self.close()
                raise self._refuse_reference(fmt)
        if not self._container.streams.video:
            self.close()
            raise SourceError("no video stream in the source", retryable=network)
        stream = video_stream(self._container)
        if stream.disposition & av.stream.Disposition.attached_pic:
            # FFmpeg shows an audio file's cover picture as a one-frame video stream: segmenting
            # that one picture (for ever, looped) is not what anyone pointing at a song wants.
            self.close()
            raise SourceError(
                "no video stream in the source: its only picture is cover art (an audio file)",
                retryable=False,
            )
        # Frame threading adds a frame of latency per thread: fine for files, not for cameras.
        stream.thread_type = "SLICE" if (network and o.low_latency) else "AUTO"
        self._stream = stream
        self._deinterlacer = Deinterlacer(o.deinterlace, stream.time_base)
        cc = stream.codec_context
        self._sar = _sample_aspect_ratio(stream)
        width = int(cc.width or 0)
        if self._sar is not None and width:
            width = _shown_width(width, self._sar)
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        if fps is not None and not (0 < fps < 1000):
            fps = None
        # Formats without timestamps (multipart MJPEG, raw H.264/HEVC/JPEG streams): FFmpeg
        # numbers their frames at an assumed 25 fps. From a file that is what every player
        # does; from a live camera it is fiction (a 1 fps camera's frames would be 0.04 s
        # apart, and ``target_fps`` would thin them to nothing): no pts and no rate, so the
        # worker goes by the pictures' arrival.
        # A snapshot URL's picture gets pts 0 and FFmpeg's 25 fps: it has neither.
        self._snapshot = network and _single_picture_format(str(self._container.format.name))
        self._made_up_pts = network and (
            bool(self._container.format.flags & _AVFMT_NOTIMESTAMPS) or self._snapshot
        )
        if self._made_up_pts:
            fps = None
        if not network:
            self._declared = _declared_length(self._container, stream, fps)
            self._frame_s = 1.0 / fps if fps else None
        return SourceInfo(
            width=width,
            height=int(cc.height or 0),
            fps=fps,
            codec=str(cc.name or ""),
            live=network or bool(o.realtime),
            frames=None if network else (int(stream.frames or 0) or None),
            segmented=network and "hls" in str(self._container.format.name).split(","),
        )

    def frames(self) -> Iterator[RawFrame | None]:
        if self._container is None:
            raise SourceError("source is not open")
        yield from self._decode()
        # A snapshot URL is asked again for each picture: one request per interval (counted
        # from the previous request), instead of ending the stream after every picture (which
        # made it flap between streaming and reconnecting, with a warning per picture).
        target = self.spec.options.target_fps
        interval = 1.0 / target if target else _SNAPSHOT_INTERVAL_S
        while self._snapshot and not self._stop.is_set():
            wait = self._requested_at + interval - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            self.close()
            self._container = self._open_container()
            if not self._container.streams.video:
                raise SourceError("the snapshot URL answered without a picture")
            self._stream = video_stream(self._container)
            yield from self._decode()

    def _decode(self) -> Iterator[RawFrame | None]:
        """The pictures of the open container, until it ends."""
        o = self.spec.options
        errors = 0
        packets = frames = 0
        last_pts: float | None = None
        deint = self._deinterlacer
        assert deint is not None

        def emit(frame: Any, t0: float) -> RawFrame:
            nonlocal frames, last_pts
            image = self._picture(frame)
            pts = float(frame.time) if frame.time is not None and not self._made_up_pts else None
            frames += 1
            if pts is not None and (last_pts is None or pts > last_pts):
                last_pts = pts
            return RawFrame(image=image, pts=pts, decode_ms=(time.perf_counter() - t0) * 1000.0)

        try:
            for packet in self._container.demux(self._stream):
                if self._stop.is_set():
                    return
                if packet.size:
                    packets += 1
                t0 = time.perf_counter()
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    # A damaged packet (lost RTP data, a torn file): skip it, but not for ever.
                    errors += 1
                    if errors > _MAX_DECODE_ERRORS:
                        raise SourceError(
                            f"{errors} consecutive packets failed to decode", retryable=self._network
                        ) from None
                    yield None
                    continue
                errors = 0
                if not decoded:
                    yield None  # still alive; lets the worker check its stall deadline
                for frame in (shown for f in decoded for shown in deint.push(f)):
                    yield emit(frame, t0)
                    t0 = time.perf_counter()
            if not self._stop.is_set():
                for frame in deint.flush():  # the last picture, held back for its successor
                    yield emit(frame, time.perf_counter())
                self._check_complete(packets, frames, last_pts)
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001
            if self._stop.is_set() and isinstance(e, av.error.ExitError):
                return  # told to stop while a read was blocked: that read ended here
            closed = self._closed_by_server(e)
            if closed and self._snapshot and frames > 0:
                return  # the picture came whole; the server just did not say how long it was
            msg, retry = describe_av_error(e, network=self._network, read_timeout_s=o.read_timeout_s)
            if frames == 0 and self._index_out_of_reach(e):
                msg = (
                    "the MP4's index (moov) is at the end of the file and the server cannot send "
                    "parts of it (no HTTP range requests): re-encode it with -movflags +faststart, "
                    "or serve it from a server that supports ranges"
                )
            elif closed:
                # FFmpeg's HTTP client reports a body of no stated length (an MJPEG camera's
                # stream) that ends, as it does when a camera closes the connection, as an I/O
                # error ("stream ends prematurely"): it is not an answer that could not be read.
                msg = "the server closed the connection in the middle of the stream"
            if isinstance(e, av.error.TimeoutError | av.error.ExitError | TimeoutError):
                raise SourceStalled(msg) from None
            raise SourceError(msg, retryable=retry) from None

    def _picture(self, frame: Any) -> np.ndarray:
        """RGB uint8 H×W×3 of a decoded picture, as players show it."""
        # Stretched to square pixels, as players show it (an anamorphic 720x576 PAL picture is
        # 1047x576 on screen): masks and overlays then fit what users see, in every viewer.
        width = _shown_width(frame.width, self._sar) if self._sar is not None else None
        # One scaler for the whole stream: ``frame.to_ndarray(format=...)`` builds (and tears
        # down) a scaler and its threads for every picture, several ms each. One thread: each
        # stream has its own already, and a pool per stream would keep a thread per core idle
        # for each (1080p converts in ~1.3 ms alone). (Odd widths: FFmpeg pads the rows; a
        # contiguous array is not copied.)
        image: np.ndarray = np.ascontiguousarray(
            self._scaler.reformat(frame, format="rgb24", width=width, threads=1).to_ndarray()
        )
        turn = _display_orientation(frame)
        return turn.apply(image) if turn != _UPRIGHT else image

    def _closed_by_server(self, exc: BaseException) -> bool:
        """An HTTP source's connection that ended while its pictures were being read."""
        return (
            self._network
            and self.spec.target.lower().startswith(("http:", "https:"))
            and isinstance(exc, OSError)
            and exc.errno == errno.EIO
        )

    def _index_out_of_reach(self, exc: BaseException) -> bool:
        """An MP4 over HTTP whose index follows the pictures: FFmpeg reads the index by
        jumping to the end and must jump back for the pictures, which a server that ignores
        range requests makes impossible (the read fails with an I/O error)."""
        if not self._closed_by_server(exc):
            return False
        container = self._container
        # (a whole file, with a stated length: not a live fragmented MP4 whose connection broke)
        return (
            container is not None
            and "mp4" in str(container.format.name).split(",")
            and (container.duration or 0) > 0
        )

    def _check_complete(self, packets: int, frames: int, last_pts: float | None) -> None:
        """Raise when a local file ended clearly before the length its header states.

        A file with no decodable frame at all is left to the caller, which says so."""
        d = self._declared
        if d is None or frames == 0:
            return
        if d.end_s is not None:
            if last_pts is None:
                return
            seen_end = last_pts + (self._frame_s or 0.0)
            short = seen_end < d.end_s - d.slack_s
        else:
            assert d.frames is not None
            short = packets < d.frames - d.frames_slack
        if not short:
            return
        if d.frames:
            got = f"{frames} of {d.frames} frames"
        else:
            assert d.end_s is not None and last_pts is not None
            got = f"{max(0.0, seen_end - d.start_s):.1f} of {d.end_s - d.start_s:.1f} s"
        raise SourceError(f"file ends after {got}: truncated or damaged", retryable=False)

    def interrupt(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if _CLOCK is not None:
            _CLOCK.forget(self._stop)
        container, self._container = self._container, None
        if container is not None:
            # Closing a broken container may raise; there is nothing left to do about it.
            with contextlib.suppress(Exception):
                container.close()
