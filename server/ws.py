"""Websocket endpoint for results: ``/ws/streams/{id}`` speaking protocol v1.

Close codes (also in the README):
    4400 bad parameters, 4401 unauthorised, 4404 unknown stream,
    4410 stream removed, 4429 too many clients, 1001 server shutting down,
    1009 message too big.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from pipeline.render import Format
from server.auth import presented_token, token_matches
from server.hub import Client, Hub

log = logging.getLogger("segstream.ws")
router = APIRouter()

CLOSE_BAD_PARAMS = 4400
CLOSE_UNAUTHORISED = 4401
CLOSE_UNKNOWN_STREAM = 4404
CLOSE_STREAM_REMOVED = 4410
CLOSE_TOO_MANY = 4429
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009

MAX_CONTROL_BYTES = 64 * 1024  # control messages are tiny JSON objects


class ParamError(ValueError):
    pass


def parse_settings(values: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validate client settings (query parameters or a JSON control message)."""
    out: dict[str, Any] = {}
    allowed = {"format", "max_fps", "quality", "token"}
    unknown = set(values) - allowed - ({"type"} if partial else set())
    if unknown:
        raise ParamError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    if "format" in values:
        try:
            out["fmt"] = Format(str(values["format"]))
        except ValueError:
            raise ParamError(
                f"unknown format {values['format']!r}; use one of {', '.join(f.value for f in Format)}"
            ) from None
    if "max_fps" in values:
        v = values["max_fps"]
        if v in (None, "", "0", 0):
            out["max_fps"] = None
        else:
            try:
                fps = float(v)
            except (TypeError, ValueError):
                raise ParamError(f"max_fps must be a number, got {v!r}") from None
            if not 0 < fps <= 240:
                raise ParamError(f"max_fps must be in (0, 240], got {fps}")
            out["max_fps"] = fps
    if "quality" in values:
        try:
            q = int(values["quality"])
        except (TypeError, ValueError):
            raise ParamError(f"quality must be an integer, got {values['quality']!r}") from None
        if not 1 <= q <= 100:
            raise ParamError(f"quality must be 1..100, got {q}")
        out["quality"] = q
    return out


async def receive(ws: WebSocket) -> MutableMapping[str, Any] | None:
    """The client's next message, or None once it has disconnected."""
    try:
        message = await ws.receive()
    except WebSocketDisconnect:
        return None
    return None if message["type"] == "websocket.disconnect" else message


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await ws.close(code=code, reason=reason[:120])


@router.websocket("/ws/streams/{stream_id}")
async def stream_results(ws: WebSocket, stream_id: str) -> None:
    app = ws.app
    hub: Hub = app.state.hub
    config = app.state.config
    await ws.accept()
    if not token_matches(config.server.token, presented_token(ws)):
        await _close(ws, CLOSE_UNAUTHORISED, "missing or wrong token")
        return
    try:
        settings = parse_settings(dict(ws.query_params), partial=False)
    except ParamError as e:
        await _close(ws, CLOSE_BAD_PARAMS, str(e))
        return
    handle = app.state.manager.find(stream_id)
    if handle is None:
        await _close(ws, CLOSE_UNKNOWN_STREAM, f"unknown stream {stream_id!r}")
        return
    if hub.client_count(stream_id) >= config.limits.max_clients_per_stream:
        await _close(ws, CLOSE_TOO_MANY, f"client limit reached ({config.limits.max_clients_per_stream})")
        return
    client = hub.subscribe(
        stream_id,
        fmt=settings.get("fmt", Format.OVERLAY),
        max_fps=settings.get("max_fps"),
        quality=settings.get("quality", 80),
    )
    # Tell the client where the stream stands right away (it may be reconnecting).
    info = handle.describe()
    hub.publish_status(stream_id, {**info, "classes": list(app.state.classes_for(handle.model))}, only=client)
    sender = asyncio.create_task(_send_loop(ws, hub, client))
    receiver = asyncio.create_task(_receive_loop(ws, client))
    try:
        done, pending = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(error, WebSocketDisconnect):
                log.warning("stream %s: websocket client ended with %r", stream_id, error)
    finally:
        hub.unsubscribe(client)
        if (
            ws.application_state != WebSocketState.DISCONNECTED
            and ws.client_state != WebSocketState.DISCONNECTED
        ):
            if app.state.shutting_down:
                await _close(ws, CLOSE_GOING_AWAY, "server shutting down")
            elif app.state.manager.find(stream_id) is None:
                await _close(ws, CLOSE_STREAM_REMOVED, f"stream {stream_id!r} was removed")


async def _send_loop(ws: WebSocket, hub: Hub, client: Client) -> None:
    while True:
        msg = await client.next()
        if msg is None:
            return
        data = hub.finalize(client, msg)
        await ws.send_bytes(data)
        client.sent += 1


async def _receive_loop(ws: WebSocket, client: Client) -> None:
    """Control messages: JSON objects changing format, max_fps or quality."""
    while (message := await receive(ws)) is not None:
        text = message.get("text")
        size = len(text.encode("utf-8") if text is not None else message.get("bytes") or b"")
        if size > MAX_CONTROL_BYTES:
            await _close(ws, CLOSE_TOO_BIG, f"message of {size} bytes exceeds {MAX_CONTROL_BYTES} bytes")
            return
        if text is None:
            await ws.send_text(json.dumps({"type": "error", "error": "control messages must be JSON text"}))
            continue
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise ParamError("control message must be a JSON object")
            settings = parse_settings(values, partial=True)
        except (json.JSONDecodeError, ParamError) as e:
            await ws.send_text(json.dumps({"type": "error", "error": f"bad control message: {e}"}))
            continue
        client.update(
            fmt=settings.get("fmt"),
            max_fps=settings.get("max_fps", -1.0),
            quality=settings.get("quality"),
        )
        fmt, quality = client.settings()
        await ws.send_text(
            json.dumps(
                {"type": "settings", "format": fmt.value, "max_fps": client.max_fps, "quality": quality}
            )
        )
