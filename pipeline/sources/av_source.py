"""Files and network streams (RTSP, RTMP, HTTP: MJPEG, HLS, progressive MP4) through PyAV/FFmpeg.

Every network read is bounded: FFmpeg's socket ``timeout`` option plus PyAV's
interrupt-callback timeout (``av.open(timeout=(open, read))``) make a frozen peer raise
instead of blocking the thread for ever. Closing a container from another thread is
unsafe in FFmpeg, so ``interrupt`` only raises a flag that is checked between packets;
a read already blocked ends by its timeout.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import av
import av.error

from pipeline.sources.base import RawFrame, Source, SourceError, SourceInfo, SourceStalled

if TYPE_CHECKING:
    from pipeline.sources import SourceSpec

# Consecutive packets that fail to decode before the stream is declared broken.
_MAX_DECODE_ERRORS = 50


def describe_av_error(exc: BaseException, *, network: bool, read_timeout_s: float) -> tuple[str, bool]:
    """A user-facing message (never containing the URL, which may hold a password) and
    whether retrying can help."""
    strerror = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, av.error.HTTPNotFoundError):
        return "server answered 404 Not Found (wrong path or stream name?)", network
    if isinstance(exc, av.error.HTTPUnauthorizedError | av.error.HTTPForbiddenError):
        return f"server refused access ({strerror}): check the credentials", network
    if isinstance(exc, av.error.HTTPError):
        return f"server answered with an HTTP error: {strerror}", network
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening on that host and port?)", True
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
    if isinstance(exc, av.error.EOFError):
        return "stream ended", network
    return f"{type(exc).__name__}: {strerror}", network


class AvSource(Source):
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.uri = spec.display
        self._network = spec.kind == "network"
        self._stop = threading.Event()
        self._container: Any = None
        self._stream: Any = None

    def _av_options(self) -> dict[str, str]:
        o = self.spec.options
        opts: dict[str, str] = {}
        if not self._network:
            return opts
        scheme = self.spec.target.split(":", 1)[0].lower()
        # Socket-level timeout in microseconds (``stimeout`` is silently ignored by FFmpeg 8).
        opts["timeout"] = str(int(o.read_timeout_s * 1_000_000))
        if scheme in ("rtsp", "rtsps"):
            opts["rtsp_transport"] = o.rtsp_transport
        if scheme in ("http", "https"):
            opts["reconnect"] = "0"  # reconnection is the stream worker's job, with its own backoff
        # Only for real-time protocols: ``nobuffer`` makes the MP4 demuxer return no packets
        # over HTTP, and HLS/progressive files are not low-latency material anyway.
        if o.low_latency and scheme in ("rtsp", "rtsps", "rtmp"):
            opts["fflags"] = "nobuffer"
            opts["flags"] = "low_delay"
            if self.spec.format is None:
                # Probing 5 s of a live stream before the first frame is pointless latency.
                opts["analyzeduration"] = "0"
                opts["probesize"] = "32768"
        return opts

    def open(self) -> SourceInfo:
        o = self.spec.options
        network = self._network
        try:
            self._container = av.open(
                self.spec.target,
                mode="r",
                format=self.spec.format,
                options=self._av_options(),
                timeout=(o.open_timeout_s, o.read_timeout_s) if network else None,
            )
        except Exception as e:  # noqa: BLE001 - every failure becomes a SourceError with a clear message
            msg, retry = describe_av_error(e, network=network, read_timeout_s=o.read_timeout_s)
            raise SourceError(f"cannot open: {msg}", retryable=retry) from None
        if not self._container.streams.video:
            self.close()
            raise SourceError("no video stream in the source", retryable=network)
        stream = self._container.streams.video[0]
        # Frame threading adds a frame of latency per thread: fine for files, not for cameras.
        stream.thread_type = "SLICE" if (network and o.low_latency) else "AUTO"
        self._stream = stream
        cc = stream.codec_context
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        if fps is not None and not (0 < fps < 1000):
            fps = None
        return SourceInfo(
            width=int(cc.width or 0),
            height=int(cc.height or 0),
            fps=fps,
            codec=str(cc.name or ""),
            live=network or bool(o.realtime),
        )

    def frames(self) -> Iterator[RawFrame | None]:
        if self._container is None:
            raise SourceError("source is not open")
        o = self.spec.options
        errors = 0
        try:
            for packet in self._container.demux(self._stream):
                if self._stop.is_set():
                    return
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
                for frame in decoded:
                    image = frame.to_ndarray(format="rgb24")
                    t1 = time.perf_counter()
                    pts = float(frame.time) if frame.time is not None else None
                    yield RawFrame(image=image, pts=pts, decode_ms=(t1 - t0) * 1000.0)
                    t0 = time.perf_counter()
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001
            msg, retry = describe_av_error(e, network=self._network, read_timeout_s=o.read_timeout_s)
            if isinstance(e, av.error.TimeoutError | av.error.ExitError | TimeoutError):
                raise SourceStalled(msg) from None
            raise SourceError(msg, retryable=retry) from None

    def interrupt(self) -> None:
        self._stop.set()

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            # Closing a broken container may raise; there is nothing left to do about it.
            with contextlib.suppress(Exception):
                container.close()
