"""Misbehaving and well-behaved network peers on 127.0.0.1 for source tests.

Every server runs on daemon threads, binds an ephemeral port and is closed by ``close``
(or the context manager), so a failing test never leaves a listener behind.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import simplejpeg

from pipeline.sources import SourceError, parse_source
from tests.helpers_video import pattern_frame

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SCRIPT = Path(__file__).with_name("rtsp_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _TcpServer:
    """Accepts connections and hands each to ``handle`` on its own daemon thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="fake-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentServer(_TcpServer):
    """Accepts the connection, reads what the client says, and never answers (a frozen camera)."""

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self.closed:
            try:
                if conn.recv(4096) == b"":
                    return
            except TimeoutError:
                continue


class GarbageServer(_TcpServer):
    """Answers every connection with random bytes, then hangs up."""

    def handle(self, conn: socket.socket) -> None:
        rng = np.random.default_rng(1)
        with contextlib.suppress(OSError):
            conn.settimeout(0.5)
            conn.recv(4096)
        conn.sendall(rng.integers(0, 256, size=64 * 1024, dtype=np.uint8).tobytes())
        conn.close()


class MjpegServer(_TcpServer):
    """HTTP ``multipart/x-mixed-replace`` JPEG stream at ``fps``, like most IP cameras' MJPEG URL."""

    BOUNDARY = "segstreamframe"

    def __init__(self, *, fps: float = 30.0, width: int = 160, height: int = 120) -> None:
        self.fps, self.width, self.height = fps, width, height
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(1.0)
        conn.recv(4096)
        conn.sendall(
            b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary="
            + self.BOUNDARY.encode()
            + b"\r\nCache-Control: no-cache\r\n\r\n"
        )
        i = 0
        while not self.closed:
            img = pattern_frame(i, width=self.width, height=self.height)
            jpg = simplejpeg.encode_jpeg(img, quality=80, colorspace="RGB")
            head = f"--{self.BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n"
            conn.sendall(head.encode() + jpg + b"\r\n")
            i += 1
            time.sleep(1.0 / self.fps)


def gi_available() -> str | None:
    """None when the GStreamer RTSP server can run here, else why not."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
        "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
        "assert Gst.ElementFactory.find('x264enc') and Gst.ElementFactory.find('rtph264pay')"
    )
    try:
        r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {SYSTEM_PYTHON}: {e}"
    if r.returncode != 0:
        return (
            "GStreamer RTSP server not importable from /usr/bin/python3 (apt-get install "
            "gir1.2-gst-rtsp-server-1.0 gir1.2-gstreamer-1.0 python3-gi gstreamer1.0-plugins-base "
            "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)"
        )
    return None


class RtspServer:
    """The GStreamer RTSP server (``rtsp_server.py``) as a child process that can be killed and
    restarted. ``options`` become the script's ``--name=value`` options (underscores as dashes;
    True gives a bare flag, None or False leaves it out): ``codec="h265"``, ``width=640``,
    ``fps=5``, ``audio="aac"``, ``audio_first=True``, ``auth="digest"``, ``user=``/``password=``,
    ``protocols="udp"``... Change them between ``kill`` and ``start`` for a camera that comes
    back different."""

    def __init__(
        self,
        port: int | None = None,
        path: str = "/test",
        gop: int = 15,
        *,
        interlaced: bool = False,
        **options: str | int | bool | None,
    ) -> None:
        self.port = port or free_port()
        self.path = path
        self.gop = gop
        self.interlaced = interlaced
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    def _option_args(self) -> list[str]:
        args = []
        for name, value in self.options.items():
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            args.append(flag if value is True else f"{flag}={value}")
        return args

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def start(self, timeout: float = 20.0) -> None:
        assert shutil.which(SYSTEM_PYTHON)
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(RTSP_SCRIPT), str(self.port), self.path, str(self.gop),
             *(["interlaced"] if self.interlaced else []), *self._option_args()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        # The script prints READY once bound; the port check covers a slow first registry scan.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"RTSP server exited with {self.proc.returncode}: {err.strip()}")
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"RTSP server did not listen on {self.port} within {timeout} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> RtspServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class FileHttpServer:
    """Plain HTTP file server on loopback (progressive MP4 over HTTP)."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(2)

    def __enter__(self) -> FileHttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def jpeg_picture(i: int, *, width: int = 160, height: int = 120) -> bytes:
    """Pattern frame ``i`` as a JPEG, as a camera sends it."""
    return simplejpeg.encode_jpeg(pattern_frame(i, width=width, height=height), quality=80, colorspace="RGB")


class HttpRequest:
    """What an ``HttpCamera`` was asked: method, path (with its query) and headers (lower-case names)."""

    def __init__(self, method: str, path: str, version: str, headers: dict[str, str]) -> None:
        self.method, self.path, self.version, self.headers = method, path, version, headers


class HttpCamera(_TcpServer):
    """A camera's HTTP server, byte by byte: ``respond(camera, conn, request)`` writes whatever
    the camera under test would (any status line, headers, line endings, framing) and may
    keep the connection open. ``requests`` lists what was asked, in order."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.requests: list[HttpRequest] = []
        super().__init__()

    def url(self, path: str = "/", userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}{path}"

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, path, version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        request = HttpRequest(method, path, version, headers)
        self.requests.append(request)
        try:
            self.respond(self, conn, request)
        finally:
            conn.close()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False once the server is closing (stop sending)."""
        return not self._closed.wait(seconds)


def read_until_error(uri: str) -> SourceError:
    """Open ``uri`` as a source and read it to its end: the SourceError it ends with."""
    src = parse_source(uri).create()
    try:
        src.open()
        for _ in src.frames():
            pass
    except SourceError as e:
        return e
    finally:
        src.close()
    raise AssertionError(f"{uri}: the source ended without an error")
