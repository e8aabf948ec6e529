"""Source URIs: parse and validate what a user typed, then build decoders from it.

``parse_source`` is the only place a user-supplied URI is interpreted. It checks the
scheme against an allow-list, confines file sources to a media directory when one is
given, turns known query parameters into :class:`SourceOptions`, and never lets any of
it near a shell: the result is handed to FFmpeg (through PyAV) or OpenCV as data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import ValidationError

from pipeline.config import SourceOptions
from pipeline.sources.base import RawFrame, Source, SourceError, SourceInfo, reference_format

__all__ = [
    "DEFAULT_SCHEMES",
    "RawFrame",
    "Source",
    "SourceError",
    "SourceInfo",
    "SourceKind",
    "SourceOptions",
    "SourceSpec",
    "parse_source",
    "redact",
]

SourceKind = Literal["demo", "file", "network", "webcam"]

DEFAULT_SCHEMES: tuple[str, ...] = ("rtsp", "rtsps", "rtmp", "http", "https", "file", "webcam", "demo")
_NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "http", "https"})

# Query parameter -> SourceOptions field. Short aliases are convenient on the command line.
_OPTION_PARAMS: dict[str, str] = {
    "rtsp_transport": "rtsp_transport",
    "transport": "rtsp_transport",
    "open_timeout_s": "open_timeout_s",
    "open_timeout": "open_timeout_s",
    "read_timeout_s": "read_timeout_s",
    "read_timeout": "read_timeout_s",
    "target_fps": "target_fps",
    "fps": "target_fps",
    "loop": "loop",
    "low_latency": "low_latency",
    "realtime": "realtime",
    "deinterlace": "deinterlace",
}
_FORMAT_PARAM = "format"  # a demuxer hint for FFmpeg, e.g. ``mpjpeg``
_FORMAT_RE = re.compile(r"^[a-z0-9_,]{1,32}$")
_WEBCAM_DEV_RE = re.compile(r"^/dev/video(\d{1,3})$")


# Query parameters that hold secrets on cameras and signed URLs (``?user=admin&pwd=…``,
# ``?token=…``, ``?X-Amz-Signature=…``): a name that is one of these or contains one, or that
# ends in ``pw`` or ``pas`` (``?user=admin&pw=…`` on Blue Iris and many snapshot CGIs,
# ``videostream.cgi?loginuse=admin&loginpas=…`` on Foscam-style cameras).
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:[\w.-]*(?:pass|pwd|psw|secret|token|signature|credential|auth|apikey|api_key|sig)"
    r"[\w.-]*|key|[\w.-]*pw|[\w.-]*pas)=)[^&;#\s\"'\\]*"
)
_USERINFO = re.compile(r"(://[^/@:\s\"'\\]*:)[^/@\s\"'\\]*@")
# A password typed as is, holding characters that end a URL's host part (``/``, ``?``, ``#``;
# ``@`` too): ``rtsp://admin:p#ss/1@cam/live``. Parsers then take ``admin`` for the host and
# ``p`` for its port, and the password for a path, query or fragment. It runs to the last
# ``@`` that is followed by a host name (and port) and the end of that host part.
_RAW_USERINFO = re.compile(
    r"(?P<head>://[^/?#@:\s\"'\\]*:)(?P<password>[^\s\"'\\]*)@"
    r"(?=(?P<host>(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::\d*)?)(?:[/?#\s\"'\\]|$))"
)
# What follows the @ of a camera's address: an IP address, or any host with a port.
_CAMERA_HOST = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\])(?::\d+)?|[^:]+:\d+")
_AUTHORITY_END = re.compile(r"[/?#]")


def _raw_password(match: re.Match[str]) -> bool:
    """Whether ``_RAW_USERINFO`` matched a password, not ``host:port/path...@...`` (a port
    followed by a path with an ``@`` in it). Digits then ``/`` read either way
    (``admin:1234/5@10.0.0.7:554/live``, ``cam:8080/snap@2x.jpg``): a password when what
    follows the ``@`` is an IP address or has a port, as a camera's address does."""
    password = match.group("password")
    end = _AUTHORITY_END.search(password)
    if end is None:
        return "@" in password  # ``user:p@ss@host``: urlsplit reads it right, a plain regex does not
    if password[: end.start()].isdigit() and password[end.start()] == "/":
        return _CAMERA_HOST.fullmatch(match.group("host")) is not None
    return True


def _redact_userinfo(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        return m.group("head") + "***@" if _raw_password(m) else m.group(0)

    return _USERINFO.sub(r"\1***@", _RAW_USERINFO.sub(sub, text))


def escape_raw_password(uri: str) -> str:
    """``uri`` with a password typed as is (holding ``/``, ``?``, ``#`` or ``@``) percent-encoded,
    which is how FFmpeg reads it; other URIs are returned unchanged."""
    m = _RAW_USERINFO.match(uri, uri.find("://")) if "://" in uri else None
    if m is None or not _raw_password(m) or not _AUTHORITY_END.search(m.group("password")):
        return uri
    password = m.group("password")
    for ch in "/?#@":
        password = password.replace(ch, f"%{ord(ch):02X}")
    return uri[: m.start("password")] + password + uri[m.end("password") :]


def redact_secrets(text: str) -> str:
    """``text`` (a URI, a log line) with passwords in URIs and secret query parameters
    replaced by ``***``."""
    if "=" not in text and "@" not in text:
        return text
    return _redact_userinfo(_SECRET_PARAM.sub(r"\1***", text))


def redact(uri: str) -> str:
    """The URI with any password replaced by ``***`` (for logs, status and errors): in its
    user information and in query parameters named like one (``pwd``, ``token``, ...)."""
    uri = escape_raw_password(uri)
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact_secrets(uri)
    query = redact_secrets("?" + parts.query)[1:] if parts.query else parts.query
    if parts.password is None:
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class SourceSpec:
    """A validated source: what to open and how. ``create`` builds a fresh decoder each time."""

    uri: str  # as given
    kind: SourceKind
    options: SourceOptions
    display: str  # ``uri`` with credentials redacted: safe to log and show
    target: str = ""  # what the decoder opens: URL without our own query parameters, a path, or a device
    format: str | None = None  # FFmpeg demuxer hint
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """Frames arrive in real time. A file is live only when it is served paced."""
        if self.kind == "file":
            return bool(self.options.realtime)
        return True

    def create(self) -> Source:
        if self.kind == "demo":
            from pipeline.sources.demo import DemoSource

            return DemoSource(self)
        if self.kind == "webcam":
            from pipeline.sources.webcam import WebcamSource

            return WebcamSource(self)
        from pipeline.sources.av_source import AvSource

        return AvSource(self)


def _split_options(query: str, *, strict: bool) -> tuple[dict[str, str], str | None, list[tuple[str, str]]]:
    """Separate our options from the query; unknown ones pass through (network) or fail."""
    ours: dict[str, str] = {}
    fmt: str | None = None
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in _OPTION_PARAMS:
            ours[_OPTION_PARAMS[key]] = value
        elif key == _FORMAT_PARAM:
            if not _FORMAT_RE.match(value):
                raise ValueError(f"bad source query parameter format={value!r}: expected a demuxer name")
            fmt = value
        elif strict:
            known = ", ".join(sorted(set(_OPTION_PARAMS) | {_FORMAT_PARAM}))
            raise ValueError(f"unknown source query parameter {key!r} (known: {known})")
        else:
            rest.append((key, value))
    return ours, fmt, rest


def _merge_options(base: SourceOptions, params: dict[str, str]) -> SourceOptions:
    if not params:
        return base
    data = base.model_dump()
    for name, raw in params.items():
        if name in ("loop", "low_latency", "realtime"):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on", ""):
                data[name] = True
            elif low in ("0", "false", "no", "off"):
                data[name] = False
            else:
                raise ValueError(f"bad source query parameter {name}={raw!r}: expected 1/0/true/false")
        else:
            data[name] = raw
    try:
        return SourceOptions.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"bad source option {name}={data.get(name)!r}: {err['msg']}") from None


def _check_scheme(scheme: str, allowed: Sequence[str], uri: str) -> None:
    if scheme not in allowed:
        shown = redact(uri)
        raise ValueError(f"unsupported source scheme {scheme!r} in {shown!r} (allowed: {', '.join(allowed)})")


def _resolve_file(raw_path: str, media_dir: str | Path | None) -> Path:
    path = Path(raw_path).expanduser()
    if media_dir is not None:
        root = Path(media_dir).expanduser().resolve()
        full = (path if path.is_absolute() else root / path).resolve()
        if not full.is_relative_to(root):
            raise ValueError(f"file source {raw_path!r} is outside the media directory {str(root)!r}")
    else:
        full = path.resolve()
    if not full.exists():
        raise ValueError(f"file source not found: {raw_path!r}")
    if not full.is_file():
        raise ValueError(f"file source is not a regular file: {raw_path!r}")
    return full


def parse_source(
    uri: str,
    *,
    options: SourceOptions | None = None,
    allowed_schemes: Sequence[str] | None = None,
    media_dir: str | Path | None = None,
) -> SourceSpec:
    """Validate ``uri`` and merge its query parameters over ``options``.

    Raises ValueError with a one-line message for anything wrong with the input.
    ``media_dir`` (set for sources added through the API) confines file sources.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("source URI is empty")
    uri = uri.strip()
    if any(ord(c) < 32 for c in uri):
        raise ValueError("source URI contains control characters")
    allowed = [s.lower() for s in (allowed_schemes if allowed_schemes is not None else DEFAULT_SCHEMES)]
    base = options if options is not None else SourceOptions()
    display = redact(uri)

    dev = _WEBCAM_DEV_RE.match(uri.split("?", 1)[0])
    if dev:
        _check_scheme("webcam", allowed, uri)
        params, _, _ = _split_options(uri.partition("?")[2], strict=True)
        return SourceSpec(uri, "webcam", _merge_options(base, params), display, target=dev.group(0))

    bare_demo = uri == "demo" or uri.startswith("demo?")
    uri_for_scheme = "demo:" + uri[4:] if bare_demo else uri
    scheme = ""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri_for_scheme)
    if m and not re.match(r"^[A-Za-z]:[\\/]", uri):  # a Windows drive letter is not a scheme
        scheme = m.group(1).lower()

    if scheme in ("", "file"):
        _check_scheme("file", allowed, uri)
        raw = uri
        if scheme == "file":
            parts = urlsplit(uri)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"file source must be local, got host {parts.netloc!r}")
            raw, query = parts.path, parts.query
        elif Path(uri).expanduser().exists() or "?" not in uri:
            query = ""
        else:
            raw, query = uri.split("?", 1)
        params, fmt, _ = _split_options(query, strict=True)
        if reference_format(fmt) is not None:
            raise ValueError(
                f"file source cannot use format={fmt}: "
                "playlists and file lists are not served as file sources"
            )
        path = _resolve_file(raw, media_dir)
        return SourceSpec(uri, "file", _merge_options(base, params), display, target=str(path), format=fmt)

    _check_scheme(scheme, allowed, uri)
    if scheme == "demo":
        rest = uri_for_scheme[len("demo:") :].lstrip("/")
        variant, _, query = rest.partition("?")
        if variant not in ("", "default"):
            raise ValueError(f"unknown demo source {variant!r} (use 'demo')")
        params, _, _ = _split_options(query, strict=True)
        return SourceSpec(uri, "demo", _merge_options(base, params), display, target="demo")
    if scheme == "webcam":
        rest, _, query = uri[len("webcam:") :].lstrip("/").partition("?")
        if not rest.isdigit() or len(rest) > 3:
            raise ValueError(f"bad webcam source {uri!r}: expected webcam:N with N a device number")
        params, _, _ = _split_options(query, strict=True)
        return SourceSpec(uri, "webcam", _merge_options(base, params), display, target=rest)
    if scheme in _NETWORK_SCHEMES:
        # A password typed with ``#``, ``?`` or ``/`` in it would otherwise be read as part of
        # the path (and shown, unredacted) and its first letters as a port.
        parts = urlsplit(escape_raw_password(uri))
        if not parts.hostname:
            raise ValueError(f"source {display!r} has no host")
        params, fmt, rest_q = _split_options(parts.query, strict=False)
        target = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest_q), parts.fragment))
        opts = _merge_options(base, params)
        if opts.loop:
            # A network stream that ends is reconnected (with backoff), never looped.
            raise ValueError(f"loop applies to files only, not to {display!r}")
        return SourceSpec(uri, "network", opts, display, target=target, format=fmt)
    raise ValueError(f"unsupported source scheme {scheme!r} in {display!r} (no decoder handles it)")
