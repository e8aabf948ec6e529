"""Python client for protocol v1, and the ``segstream watch`` command.

    async with SegstreamClient("ws://127.0.0.1:8000/ws/streams/demo", format="labels") as client:
        async for result in client:
            print(result.frame, result.labels.shape)

Each binary websocket message is ``uint32 big-endian header length | UTF-8 JSON header |
payload``; :func:`unpack` splits one and :func:`decode` turns it into a :class:`Result`
with the label map (``labels``, ``raw``, ``rle``, ``layers``) and/or the picture
(``overlay``, ``jpeg``, ``layers``) as numpy arrays.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from pipeline.render import decode_jpeg, decode_png_labels, rle_decode, rle_from_string

FORMATS = ("overlay", "labels", "rle", "raw", "jpeg", "layers")
# Close codes after which reconnecting cannot help.
FATAL_CLOSE_CODES = {
    4400: "bad parameters",
    4401: "unauthorised",
    4404: "unknown stream",
    4410: "stream removed",
}


class ProtocolError(ValueError):
    """A message does not follow protocol v1."""


class ClientClosed(Exception):
    """The server closed the connection for good (unknown stream, bad parameters, token)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed by server: {code} {FATAL_CLOSE_CODES.get(code, '')} {reason}".strip())
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Result:
    """One decoded message. ``labels``: HxW uint8 class indices; ``image``: HxWx3 RGB uint8."""

    header: dict[str, Any]
    labels: np.ndarray | None = None
    image: np.ndarray | None = None
    received_at: float = 0.0

    @property
    def type(self) -> str:
        return str(self.header.get("type", "result"))

    @property
    def frame(self) -> int | None:
        return self.header.get("frame")

    @property
    def stale(self) -> bool:
        return bool(self.header.get("stale"))

    @property
    def classes(self) -> list[str]:
        return list(self.header.get("classes", []))

    @property
    def latency_ms(self) -> float | None:
        """Capture on the server until received here (clocks of both ends assumed in sync)."""
        captured = self.header.get("captured_at")
        if not captured or not self.received_at:
            return None
        return (self.received_at - captured) * 1000.0


def unpack(message: bytes) -> tuple[dict[str, Any], bytes]:
    """Split one protocol v1 message into (header, payload)."""
    if len(message) < 4:
        raise ProtocolError(f"message of {len(message)} bytes is shorter than the 4-byte length prefix")
    (n,) = struct.unpack(">I", message[:4])
    if 4 + n > len(message):
        raise ProtocolError(f"header length {n} exceeds the message ({len(message)} bytes)")
    try:
        header = json.loads(message[4 : 4 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return header, bytes(message[4 + n :])


def labels_from_rle(rle: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """The label map from the header's per-class COCO RLE objects (absent classes are 0)."""
    labels = np.zeros((height, width), dtype=np.uint8)
    for obj in rle:
        h, w = obj["size"]
        if (h, w) != (height, width):
            raise ProtocolError(f"RLE size {h}x{w} does not match the frame {height}x{width}")
        counts = obj["counts"]
        runs = rle_from_string(counts) if isinstance(counts, str) else list(counts)
        labels[rle_decode(runs, h, w)] = int(obj["class"])
    return labels


def decode(header: dict[str, Any], payload: bytes, *, received_at: float = 0.0) -> Result:
    """Decode the payload of one message according to its header's ``format``."""
    fmt = header.get("format")
    if header.get("type") == "status" or fmt == "status":
        return Result(header, received_at=received_at)
    w, h = header.get("width"), header.get("height")
    if fmt == "overlay" or fmt == "jpeg":
        return Result(header, image=decode_jpeg(payload), received_at=received_at)
    if fmt == "labels":
        return Result(header, labels=decode_png_labels(payload), received_at=received_at)
    if fmt == "raw":
        if not isinstance(w, int) or not isinstance(h, int) or len(payload) != w * h:
            raise ProtocolError(f"raw payload of {len(payload)} bytes does not match {w}x{h}")
        labels = np.frombuffer(payload, dtype=np.uint8).reshape(h, w)
        return Result(header, labels=labels, received_at=received_at)
    if fmt == "rle":
        if not isinstance(w, int) or not isinstance(h, int):
            raise ProtocolError("rle message without width/height")
        return Result(header, labels=labels_from_rle(header.get("rle", []), h, w), received_at=received_at)
    if fmt == "layers":
        n = int(header["layers"]["image"])
        image = decode_jpeg(payload[:n])
        return Result(header, image=image, labels=decode_png_labels(payload[n:]), received_at=received_at)
    raise ProtocolError(f"unknown format {fmt!r}")


def stream_url(target: str, *, server: str = "http://127.0.0.1:8000") -> str:
    """A websocket URL from a stream id, an http(s) stream page URL or a ws(s) URL."""
    if target.startswith(("ws://", "wss://")):
        return target
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))
    if not target or "/" in target:
        raise ValueError(f"not a stream id or URL: {target!r}")
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
    return urlunsplit((scheme, parts.netloc, f"/ws/streams/{target}", "", ""))


class SegstreamClient:
    """Async iterator of decoded results from one stream, reconnecting with backoff.

    ``include_status`` also yields ``status`` messages (``stale: true`` while the source
    is down). Fatal close codes (4400, 4401, 4404, 4410) raise :class:`ClientClosed`.

    ``format``, ``max_fps`` and ``quality`` given here replace the same parameters in the
    URL's query; those not given keep the URL's value. Without either, ``format`` is
    ``labels`` and the others are the server's defaults.
    """

    def __init__(
        self,
        url: str,
        *,
        format: str | None = None,
        max_fps: float | None = None,
        quality: int | None = None,
        token: str | None = None,
        include_status: bool = False,
        reconnect: bool = True,
        open_timeout: float = 10.0,
        max_size: int = 64 * 1024 * 1024,
    ) -> None:
        if format is not None and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
        self.url = url
        # Explicit settings only; DEFAULTS fill in what neither these nor the URL set.
        self.params: dict[str, Any] = {}
        if format is not None:
            self.params["format"] = format
        if max_fps is not None:
            self.params["max_fps"] = max_fps
        if quality is not None:
            self.params["quality"] = quality
        self.token = token
        self.include_status = include_status
        self.reconnect = reconnect
        self.open_timeout = open_timeout
        self.max_size = max_size
        self._ws: Any = None

    DEFAULTS: dict[str, Any] = {"format": "labels"}

    def _full_url(self) -> str:
        """The URL with explicit settings replacing the URL's own, and defaults only where the
        URL sets nothing (the server reads the last of repeated parameters)."""
        parts = urlsplit(self.url)
        given = parse_qsl(parts.query, keep_blank_values=True)
        in_url = {k for k, _ in given}
        query = [(k, v) for k, v in given if k not in self.params]
        query += list(self.params.items())
        query += [(k, v) for k, v in self.DEFAULTS.items() if k not in in_url and k not in self.params]
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))

    async def _connect(self) -> Any:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        return await connect(
            self._full_url(),
            additional_headers=headers,
            open_timeout=self.open_timeout,
            max_size=self.max_size,
        )

    async def __aenter__(self) -> SegstreamClient:
        self._ws = await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def set(self, **settings: Any) -> None:
        """Change format, max_fps or quality on the fly (kept across reconnects)."""
        self.params.update({k: v for k, v in settings.items() if v is not None})
        if self._ws is not None:
            await self._ws.send(json.dumps(settings))

    def __aiter__(self) -> AsyncIterator[Result]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Result]:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        backoff = 0.5
        while True:
            if self._ws is None:
                self._ws = await self._connect()
            try:
                async for message in self._ws:
                    if isinstance(message, str):
                        continue  # settings acknowledgements and control errors
                    header, payload = unpack(message)
                    result = decode(header, payload, received_at=time.time())
                    if result.type == "status" and not self.include_status:
                        continue
                    backoff = 0.5
                    yield result
                code, reason = self._close_info()
            except ConnectionClosed as e:
                rcvd = e.rcvd
                code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (1006, "")
            except (OSError, InvalidHandshake, TimeoutError) as e:
                code, reason = 1006, str(e)
            self._ws = None
            if code in FATAL_CLOSE_CODES:
                raise ClientClosed(code, reason)
            if not self.reconnect or code == 1000:
                return
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(8.0, backoff * 2)

    def _close_info(self) -> tuple[int, str]:
        ws = self._ws
        code = getattr(ws, "close_code", None) if ws is not None else None
        return (code, ws.close_reason or "") if code is not None else (1000, "")


async def results(url: str, **kwargs: Any) -> AsyncIterator[Result]:
    """Shorthand: ``async for r in results(url, format="rle"): ...``."""
    async with SegstreamClient(url, **kwargs) as client:
        async for r in client:
            yield r


# ------------------------------------------------------------------- segstream watch


def _summary(result: Result) -> str:
    h = result.header
    if result.type == "status":
        return f"status  state={h.get('state')} stale={h.get('stale')} error={h.get('error')}"
    parts = [f"frame {h.get('frame'):>6}", f"{h.get('width')}x{h.get('height')}", h.get("format", "?")]
    if result.labels is not None and result.labels.size:
        counts = np.bincount(result.labels.ravel(), minlength=len(result.classes))
        total = result.labels.size
        present = [
            f"{result.classes[i] if i < len(result.classes) else i}={100 * c / total:.1f}%"
            for i, c in enumerate(counts.tolist())
            if c and i > 0
        ]
        parts.append(" ".join(present) or "(background only)")
    lat = result.latency_ms
    if lat is not None:
        parts.append(f"latency {lat:.0f} ms")
    dropped = h.get("dropped") or {}
    if any(dropped.values()):
        parts.append("dropped " + ",".join(f"{k}={v}" for k, v in dropped.items() if v))
    return "  ".join(parts)


def _save(result: Result, directory: Path) -> None:
    import cv2

    stem = directory / f"{int(result.header['frame']):06d}"
    if result.labels is not None:
        cv2.imwrite(str(stem.with_suffix(".png")), result.labels)
    if result.image is not None:
        cv2.imwrite(str(stem.with_suffix(".jpg")), cv2.cvtColor(result.image, cv2.COLOR_RGB2BGR))
    if result.header.get("format") == "rle":
        stem.with_suffix(".json").write_text(json.dumps(result.header.get("rle", [])))


def watch_client(args: argparse.Namespace) -> SegstreamClient:
    """The client ``segstream watch`` runs: flags not given (None) leave the URL's own query."""
    return SegstreamClient(
        stream_url(args.target, server=args.server),
        format=args.format,
        max_fps=args.max_fps,
        quality=args.quality,
        token=args.token,
        include_status=True,
    )


async def watch(args: argparse.Namespace) -> int:
    client = watch_client(args)
    url = client.url
    save_dir = Path(args.save) if args.save else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        async with client:
            async for result in client:
                print(_summary(result), flush=True)
                if result.type != "result":
                    continue
                if save_dir is not None:
                    _save(result, save_dir)
                n += 1
                if args.count and n >= args.count:
                    break
    except ClientClosed as e:
        print(f"segstream watch: {e}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError) as e:
        print(f"segstream watch: cannot connect to {url}: {e}", file=sys.stderr)
        return 2
    return 0


def _run_watch(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(watch(args))
    except KeyboardInterrupt:
        return 130


def add_watch_parser(sub: Any) -> None:
    w = sub.add_parser("watch", help="print (and optionally save) results of a stream")
    w.add_argument("target", metavar="URL_OR_STREAM", help="stream id, or ws(s)://…/ws/streams/ID URL")
    # No defaults here: a flag given replaces the URL's own parameter, one not given keeps it.
    w.add_argument("--format", choices=FORMATS, help="default: the URL's format=, else labels")
    w.add_argument("--max-fps", type=float, help="most results per second (default: the URL's max_fps=)")
    w.add_argument("--quality", type=int, help="JPEG quality 1..100 (overlay, jpeg, layers)")
    w.add_argument("--token", help="bearer token when the server requires one")
    w.add_argument("--server", default="http://127.0.0.1:8000", help="server for a bare stream id")
    w.add_argument("--save", metavar="DIR", help="write NNNNNN.png label maps / .jpg images / .json RLE")
    w.add_argument("--count", type=int, default=0, help="stop after this many results (0: run until stopped)")
    w.set_defaults(func=_run_watch)
