"""Browser camera upstream: ``/ws/ingest`` turns pushed JPEG pictures into a stream.

The browser opens ``/ws/ingest?model=NAME[&id=ID][&max_fps=N][&token=T]`` and, after a
``{"type": "ready", "stream": ID}`` text message, sends one binary message per picture:
either a bare JPEG or protocol-v1 framing (``uint32 BE length | JSON {"t": capture
seconds} | JPEG``), whose ``t`` comes back as the result's ``pts`` so the browser can
measure its own round trip. The server answers each picture with ``{"type": "ack"}``
once the engine has taken it; the browser sends the next one only then, so pictures
never queue on either side and the rate follows what the server keeps up with.

The stream (source ``push:ID``) is listed and consumable like any other while the
browser is connected, and removed when it leaves.

A malformed picture (not a JPEG, a header that is not JSON, a ``t`` that is not a finite
number) gets ``{"type": "error", "error": "bad picture: ..."}`` and the upload goes on.
Close codes: 4400 bad parameters or a picture above ``limits.max_source_pixels`` (refused
from its JPEG header, before decoding), 4401 unauthorised, 4403 origin not allowed, 4409 the id
is in use, 4410 the stream was removed, 4429 stream limit, 1009 a message above
``limits.max_ws_message_bytes``, 1001 server shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import secrets
import struct
import time
from typing import Any

import anyio
import numpy as np
import simplejpeg
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from models.registry import UnknownModelError, WeightsError
from pipeline.config import StreamConfig, check_stream_id, format_validation_error
from pipeline.manager import LimitError, StreamExistsError
from pipeline.render import decode_jpeg
from pipeline.sources.push import PushFeed, push_spec
from server.ws import (
    CLOSE_BAD_PARAMS,
    CLOSE_GOING_AWAY,
    CLOSE_STREAM_REMOVED,
    CLOSE_TOO_BIG,
    CLOSE_TOO_MANY,
    ParamError,
    admit,
    cancel_and_wait,
    close,
    list_names,
    number_param,
    parse_json,
    receive,
    show,
)

log = logging.getLogger("segstream.ingest")
router = APIRouter()

CLOSE_EXISTS = 4409
CLOSE_INTERNAL = 1011
_ACK_WAIT_S = 2.0  # the longest a picture waits for the engine before it is acknowledged anyway
_JPEG_MAGIC = b"\xff\xd8"


class PictureTooLarge(ParamError):
    """The picture has more pixels than ``limits.max_source_pixels``: the upload is closed."""


def check_ingest_id(sid: str) -> str:
    try:
        check_stream_id(sid)
    except ValueError as e:
        raise ParamError(str(e)) from None
    return sid


def parse_ingest_params(values: dict[str, str]) -> dict[str, Any]:
    allowed = {"id", "model", "max_fps", "token"}
    unknown = set(values) - allowed
    if unknown:
        raise ParamError(f"unknown parameter(s): {list_names(sorted(unknown))}")
    out: dict[str, Any] = {
        "id": check_ingest_id(values["id"]) if values.get("id") else f"cam-{secrets.token_hex(3)}",
        "model": values.get("model"),
    }
    raw = values.get("max_fps")
    out["max_fps"] = 30.0
    if raw:
        out["max_fps"] = number_param("max_fps", raw)  # a finite number, as on the results websocket
        if not 0 < out["max_fps"] <= 120:
            raise ParamError(f"max_fps must be in (0, 120], got {show(raw)}")
    return out


def split_picture(message: bytes) -> tuple[float | None, bytes]:
    """(capture time from the browser or None, JPEG bytes) of one upstream message."""
    if message[:2] == _JPEG_MAGIC:
        return None, message
    if len(message) < 4:
        raise ParamError("picture message too short")
    (n,) = struct.unpack(">I", message[:4])
    if n > 4096 or 4 + n > len(message):
        raise ParamError(f"bad header length {n}")
    try:
        header = parse_json(message[4 : 4 + n].decode("utf-8"))
    except (UnicodeDecodeError, ParamError) as e:
        raise ParamError(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise ParamError(f"header must be a JSON object, got {show(header)}")
    t = header.get("t")
    pts = None
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise ParamError(f"t must be a finite number of seconds, got {show(t)}")
        try:
            pts = float(t)
        except OverflowError:  # an integer beyond the float range
            pts = math.inf
        if not math.isfinite(pts):
            raise ParamError(f"t must be a finite number of seconds, got {show(t)}")
    jpeg = message[4 + n :]
    if jpeg[:2] != _JPEG_MAGIC:
        raise ParamError("payload is not a JPEG picture")
    return pts, jpeg


def decode_picture(jpeg: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode a pushed JPEG to RGB, refusing one above ``max_pixels`` from its header alone
    (a small file can claim a huge picture: decoding it first could take gigabytes)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError as e:
        raise ParamError(f"unreadable JPEG header: {e}") from None
    if width * height > max_pixels:
        raise PictureTooLarge(f"picture {width}x{height} is too large (limit {max_pixels} pixels)")
    image = decode_jpeg(jpeg)
    if image.shape[0] * image.shape[1] > max_pixels:  # the header is what libjpeg decodes; belt and braces
        raise PictureTooLarge(f"picture {image.shape[1]}x{image.shape[0]} is too large")
    return image


async def _send(ws: WebSocket, body: dict[str, Any]) -> None:
    await ws.send_text(json.dumps(body))


@router.websocket("/ws/ingest")
async def ingest(ws: WebSocket) -> None:
    app = ws.app
    mgr = app.state.manager
    if not await admit(ws):
        return
    try:
        params = parse_ingest_params(dict(ws.query_params))
    except ParamError as e:
        await close(ws, CLOSE_BAD_PARAMS, str(e))
        return
    feed = PushFeed(open_timeout_s=10.0)
    sid = params["id"]
    try:
        sc = StreamConfig(id=sid, source=f"push:{sid}", model=params["model"])
        handle = await anyio.to_thread.run_sync(lambda: mgr.add(sc, spec=push_spec(sid, feed)))
    except StreamExistsError as e:
        await close(ws, CLOSE_EXISTS, str(e))
        return
    except LimitError as e:
        await close(ws, CLOSE_TOO_MANY, str(e))
        return
    except ValidationError as e:
        await close(ws, CLOSE_BAD_PARAMS, format_validation_error(e))
        return
    except (UnknownModelError, WeightsError, ValueError) as e:
        await close(ws, CLOSE_BAD_PARAMS, str(e).splitlines()[0])
        return
    hub = app.state.hub
    closing = hub.closing(sid)  # set when the stream is removed or the server shuts down
    if app.state.shutting_down or mgr.find(sid) is not handle:  # that happened already
        closing.set()
    log.info("stream %s: browser camera connected", sid)
    try:
        await _send(ws, {"type": "ready", "stream": sid, "model": handle.model, "max_fps": params["max_fps"]})
        pump = asyncio.create_task(_pump(ws, app, feed, handle, params["max_fps"]))
        watch = asyncio.create_task(closing.wait())
        try:
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(pump, watch)
        error = pump.exception() if pump in done and not pump.cancelled() else None
        if error is not None and not isinstance(error, WebSocketDisconnect):
            log.warning("stream %s: browser camera ended with %r", sid, error)
        if WebSocketState.DISCONNECTED not in (ws.application_state, ws.client_state):
            if error is not None:
                await close(ws, CLOSE_INTERNAL, "internal error")
            elif app.state.shutting_down:
                await close(ws, CLOSE_GOING_AWAY, "server shutting down")
            elif mgr.find(sid) is not handle:
                await close(ws, CLOSE_STREAM_REMOVED, f"stream {sid!r} was removed")
    finally:
        hub.forget_closing(sid, closing)
        # Stop the stream before closing the feed: a closed feed reads to the source thread
        # as a camera failing ("the pusher left"), while a stopped stream just ends.
        # On shutdown the manager stops every stream itself.
        if not app.state.shutting_down:
            if mgr.find(sid) is handle:
                with contextlib.suppress(Exception):
                    await anyio.to_thread.run_sync(lambda: mgr.remove(sid, timeout=2.0))
                hub.close_stream(sid)
            feed.close()
        log.info("stream %s: browser camera left", sid)


async def _pump(ws: WebSocket, app: Any, feed: PushFeed, handle: Any, max_fps: float) -> None:
    limits = app.state.config.limits
    min_gap = 1.0 / max_fps
    last_ack = 0.0
    while (message := await receive(ws)) is not None:
        if app.state.manager.find(handle.id) is not handle:
            await close(ws, CLOSE_STREAM_REMOVED, f"stream {handle.id!r} was removed")
            return
        data = message.get("bytes")
        if data is None:
            await _send(ws, {"type": "error", "error": "send pictures as binary messages"})
            continue
        if len(data) > limits.max_ws_message_bytes:
            await close(
                ws, CLOSE_TOO_BIG, f"picture of {len(data)} bytes exceeds {limits.max_ws_message_bytes}"
            )
            return
        try:
            pts, jpeg = split_picture(data)
            t0 = time.perf_counter()
            # never decode on the event loop; the size is checked from the header first
            image = await anyio.to_thread.run_sync(
                functools.partial(decode_picture, jpeg, max_pixels=limits.max_source_pixels)
            )
            decode_ms = (time.perf_counter() - t0) * 1000.0
        except PictureTooLarge as e:
            await close(ws, CLOSE_BAD_PARAMS, str(e))
            return
        except (ParamError, ValueError, RuntimeError) as e:
            await _send(ws, {"type": "error", "error": f"bad picture: {e}"})
            continue
        seq = feed.push(image, pts=pts, decode_ms=decode_ms)
        # Back-pressure: acknowledge once the worker took the picture and the engine emptied the
        # stream's slot, and not faster than max_fps. Bounded so a stalled engine cannot hang the browser.
        deadline = time.monotonic() + _ACK_WAIT_S
        await anyio.to_thread.run_sync(feed.wait_taken, seq, _ACK_WAIT_S)
        while len(handle.slot) and time.monotonic() < deadline and not feed.closed:
            await asyncio.sleep(0.005)
        wait = last_ack + min_gap - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        last_ack = time.monotonic()
        await _send(ws, {"type": "ack", "seq": seq})
