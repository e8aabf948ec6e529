"""Websocket endpoint for results: ``/ws/streams/{id}`` speaking protocol v1.

Close codes (also in the README):
    4400 bad parameters, 4401 unauthorised, 4403 origin not allowed, 4404 unknown stream,
    4410 stream removed, 4429 too many clients, 1001 server shutting down,
    1008 the client took no message for ``SEND_TIMEOUT_S``, 1009 message too big.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import MutableMapping
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketDisconnected, WebSocketState

from pipeline.render import Format
from server.auth import origin_allowed, presented_token, refused, token_matches
from server.hub import Client, Hub

log = logging.getLogger("segstream.ws")
router = APIRouter()

CLOSE_BAD_PARAMS = 4400
CLOSE_UNAUTHORISED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
CLOSE_UNKNOWN_STREAM = 4404
CLOSE_STREAM_REMOVED = 4410
CLOSE_TOO_MANY = 4429
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009

CLOSE_NOT_READING = 1008

MAX_CONTROL_BYTES = 64 * 1024  # control messages are tiny JSON objects
# A message the transport cannot take for this long (its buffer stays full) means the client
# does not read: it is closed instead of holding its slot, its encoder output and its
# connection for ever (the server's keepalive ping cannot end it: the ping waits behind the
# same full buffer). A reader on a slow link empties the buffer in well under a second.
SEND_TIMEOUT_S = 20.0
# How long a removed stream's (or a stopping server's) sender may take to finish, and how
# long the close frame may wait to be written, before the handler gives up on the client.
CLOSE_WAIT_S = 2.0


class ParamError(ValueError):
    pass


def show(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that echo client input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_names(names: list[str], most: int = 5) -> str:
    """``a, b, c`` for error messages: at most ``most`` names of at most 30 characters."""
    listed = ", ".join(n if len(n) <= 30 else n[:27] + "..." for n in names[:most])
    return listed + (f" and {len(names) - most} more" if len(names) > most else "")


def number_param(name: str, value: Any) -> float:
    """A finite float from a JSON number or a query-string text; booleans are not numbers."""
    if isinstance(value, bool):
        raise ParamError(f"{name} must be a number, got {show(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParamError(f"{name} must be a number, got {show(value)}") from None
    except OverflowError:  # an integer too large for a float
        raise ParamError(f"{name} must be a finite number, got {show(value)}") from None
    if not math.isfinite(number):
        raise ParamError(f"{name} must be a finite number, got {show(value)}")
    return number


def _integer(name: str, value: Any) -> int:
    """An int from a JSON integer (or a whole float such as 80.0) or a query-string text."""
    if isinstance(value, bool):
        raise ParamError(f"{name} must be an integer, got {show(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ParamError(f"{name} must be an integer, got {show(value)}")
        return int(value)
    if not isinstance(value, int | str):
        raise ParamError(f"{name} must be an integer, got {show(value)}")
    try:
        return int(value)
    except ValueError:  # not an integer, or more digits than Python converts
        raise ParamError(f"{name} must be an integer, got {show(value)}") from None


def parse_settings(values: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validate client settings (query parameters or a JSON control message)."""
    out: dict[str, Any] = {}
    allowed = {"format", "max_fps", "quality", "token"}
    unknown = set(values) - allowed - ({"type"} if partial else set())
    if unknown:
        names = sorted(unknown)
        raise ParamError(f"unknown parameter(s): {list_names(names)}")
    if "format" in values:
        fmt = values["format"]
        try:
            if not isinstance(fmt, str):
                raise ValueError(fmt)
            out["fmt"] = Format(fmt)
        except ValueError:
            raise ParamError(
                f"unknown format {show(fmt)}; use one of {', '.join(f.value for f in Format)}"
            ) from None
    if "max_fps" in values:
        v = values["max_fps"]
        if v is None or (not isinstance(v, bool) and v in ("", "0", 0)):
            out["max_fps"] = None
        else:
            fps = number_param("max_fps", v)
            if not 0 < fps <= 240:
                raise ParamError(f"max_fps must be in (0, 240], got {fps:g}")
            out["max_fps"] = fps
    if "quality" in values:
        q = _integer("quality", values["quality"])
        if not 1 <= q <= 100:
            raise ParamError(f"quality must be 1..100, got {show(q)}")
        out["quality"] = q
    return out


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes) -> Any:
    """Strict JSON from a client: NaN/Infinity refused; every failure is a ParamError."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise ParamError("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, non-finite constants, integers of too many digits
        raise ParamError(str(e)) from None


def parse_control(text: str) -> dict[str, Any]:
    """A control message (a JSON object of settings) to validated settings, or ParamError."""
    values = parse_json(text)
    if not isinstance(values, dict):
        raise ParamError("control message must be a JSON object")
    return parse_settings(values, partial=True)


async def receive(ws: WebSocket) -> MutableMapping[str, Any] | None:
    """The client's next message, or None once it has disconnected."""
    try:
        message = await ws.receive()
    except WebSocketDisconnect:
        return None
    return None if message["type"] == "websocket.disconnect" else message


def close_reason(reason: str) -> str:
    """``reason`` cut to the 123 UTF-8 bytes a close frame holds (a longer one fails to send)."""
    data = reason.encode("utf-8")
    if len(data) <= 123:
        return reason
    return data[:120].decode("utf-8", errors="ignore") + "..."


async def close(ws: WebSocket, code: int, reason: str) -> None:
    """Close with ``code`` and ``reason`` (cut to fit a close frame); a socket already gone
    is not an error."""
    with contextlib.suppress(Exception):
        await ws.close(code=code, reason=close_reason(reason))


async def admit(ws: WebSocket) -> bool:
    """Accept the websocket and check its origin and token (both endpoints); False when it
    was refused and closed (4403, 4401) with the reason logged."""
    server = ws.app.state.config.server
    await ws.accept()
    if not origin_allowed(ws, server.allowed_origins):
        refused(ws, f"origin {ws.headers.get('origin')!r} not allowed")
        await close(ws, CLOSE_FORBIDDEN_ORIGIN, "origin not allowed (server.allowed_origins)")
        return False
    if not token_matches(server.token, presented_token(ws)):
        refused(ws, "missing or wrong token")
        await close(ws, CLOSE_UNAUTHORISED, "missing or wrong token")
        return False
    return True


@router.websocket("/ws/streams/{stream_id}")
async def stream_results(ws: WebSocket, stream_id: str) -> None:
    app = ws.app
    hub: Hub = app.state.hub
    config = app.state.config
    if not await admit(ws):
        return
    try:
        settings = parse_settings(dict(ws.query_params), partial=False)
    except ParamError as e:
        await close(ws, CLOSE_BAD_PARAMS, str(e))
        return
    handle = app.state.manager.find(stream_id)
    if handle is None:
        await close(ws, CLOSE_UNKNOWN_STREAM, f"unknown stream {stream_id!r}")
        return
    if hub.client_count(stream_id) >= config.limits.max_clients_per_stream:
        await close(ws, CLOSE_TOO_MANY, f"client limit reached ({config.limits.max_clients_per_stream})")
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
    ended = asyncio.create_task(client.ended.wait())  # stream removed, server stopping
    not_reading = False
    try:
        done, _ = await asyncio.wait({sender, receiver, ended}, return_when=asyncio.FIRST_COMPLETED)
        if ended in done and not sender.done():
            # The sender ends by itself now, unless it is blocked on a client that does not read.
            await asyncio.wait({sender}, timeout=CLOSE_WAIT_S)
        await cancel_and_wait(sender, receiver, ended)
        for task in (sender, receiver):
            error = None if task.cancelled() else task.exception()
            if error is None or _disconnected(error):
                continue
            if task is sender and isinstance(error, TimeoutError):
                not_reading = True
                log.info(
                    "stream %s: websocket client took no message for %.0f s: closing it",
                    stream_id, SEND_TIMEOUT_S,
                )
            else:
                log.warning("stream %s: websocket client ended with %r", stream_id, error)
    finally:
        hub.unsubscribe(client)
        if (
            ws.application_state != WebSocketState.DISCONNECTED
            and ws.client_state != WebSocketState.DISCONNECTED
        ):
            if app.state.shutting_down:
                await _close_within(ws, CLOSE_GOING_AWAY, "server shutting down")
            elif app.state.manager.find(stream_id) is not handle:
                await _close_within(ws, CLOSE_STREAM_REMOVED, f"stream {stream_id!r} was removed")
            elif not_reading:
                await _close_within(
                    ws, CLOSE_NOT_READING, f"client took no message for {SEND_TIMEOUT_S:.0f} s"
                )


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until each has ended, whatever it ended with (read its
    outcome afterwards from the task itself)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _disconnected(error: BaseException) -> bool:
    """Whether a websocket call failed only because the connection was already closing (the
    client went away or closed, or the server closed it): nothing to report."""
    if isinstance(error, WebSocketDisconnect | WebSocketDisconnected | OSError):
        return True
    # uvicorn's answer to a send after the close handshake began (the client's close frame
    # arrived while a result was on its way)
    return isinstance(error, RuntimeError) and "after sending 'websocket.close'" in str(error)


async def _close_within(ws: WebSocket, code: int, reason: str) -> None:
    """:func:`close`, but given up after ``CLOSE_WAIT_S``: the close frame of a client that
    does not read waits behind the full buffer for ever."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_WAIT_S):
            await close(ws, code, reason)


async def _send_loop(ws: WebSocket, hub: Hub, client: Client) -> None:
    while True:
        msg = await client.next()
        if msg is None:
            return
        data = hub.finalize(client, msg)
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await ws.send_bytes(data)
        client.sent += 1


async def _receive_loop(ws: WebSocket, client: Client) -> None:
    """Control messages: JSON objects changing format, max_fps or quality."""
    while (message := await receive(ws)) is not None:
        text = message.get("text")
        size = len(text.encode("utf-8") if text is not None else message.get("bytes") or b"")
        if size > MAX_CONTROL_BYTES:
            await close(ws, CLOSE_TOO_BIG, f"message of {size} bytes exceeds {MAX_CONTROL_BYTES} bytes")
            return
        if text is None:
            await ws.send_text(json.dumps({"type": "error", "error": "control messages must be JSON text"}))
            continue
        try:
            settings = parse_control(text)
        except ParamError as e:
            await _send_error(ws, f"bad control message: {e}")
            continue
        except Exception as e:  # whatever else a client can provoke must not end its connection
            log.warning("stream %s: control message failed: %r", client.stream_id, e)
            await _send_error(ws, f"bad control message: {type(e).__name__}")
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


async def _send_error(ws: WebSocket, error: str) -> None:
    await ws.send_text(json.dumps({"type": "error", "error": error[:500]}))
