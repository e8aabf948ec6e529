"""Websocket endpoint for results: ``/ws/streams/{id}`` speaking protocol v1.

Close codes (also in the README):
    4400 bad parameters, 4401 unauthorised, 4403 origin not allowed, 4404 unknown stream,
    4410 stream removed, 4429 too many clients, 1001 server shutting down,
    1008 the client took no message for ``limits.ws_send_timeout_s`` (``SEND_TIMEOUT_S`` when
    unset), 1009 message too big.

A client that does not read (its TCP receive window stays full) cannot be told anything: the
close frame waits behind the messages it does not take. Once its send timeout has run out, it
gets ``CLOSE_WAIT_S`` for the close frame, then its connection is reset (:class:`TransportAbort`),
so neither its socket nor its buffered messages stay on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import struct
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
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
# A message the transport cannot take for limits.ws_send_timeout_s (its buffer stays full) means
# the client does not read: it is closed instead of holding its slot, its encoder output and its
# connection for ever (the server's keepalive ping cannot end it: the ping waits behind the
# same full buffer). A reader on a slow link empties the buffer in well under a second.
# limits.ws_send_timeout_s when the config leaves it unset (also the MJPEG readers' timeout).
SEND_TIMEOUT_S = 20.0
# How long a removed stream's (or a stopping server's) sender may take to finish, and how
# long the close frame may wait to be written, before the connection is reset.
CLOSE_WAIT_S = 2.0
# The scope key under which TransportAbort hands the handler a way to reset the connection.
ABORT_KEY = "segstream.abort"


@dataclass
class WsStats:
    """Per-app websocket counters, read by ``/metrics``."""

    not_reading: int = 0  # clients closed because a message to them did not go out in time


class ClientNotReading(Exception):
    """A message to the client could not be handed to the transport within the send timeout."""


def send_timeout(config: Any) -> float:
    """How long a websocket client or MJPEG reader may take no message before it is let go:
    ``limits.ws_send_timeout_s``, or ``SEND_TIMEOUT_S`` when the config leaves it unset."""
    return float(config.limits.ws_send_timeout_s or SEND_TIMEOUT_S)


def transport_abort(send: Send) -> Callable[[], None] | None:
    """A function resetting the connection behind ``send``, or None where the server's
    transport is not reachable.

    ASGI has no way to ask for this. uvicorn's websocket protocols hand the application a
    method of the protocol object, which holds the asyncio transport: its ``abort`` drops the
    connection and its unsent buffer at once, where ``close`` waits for ever for a client that
    does not read to take that buffer. Under another server nothing is reachable and the
    server's own close applies."""
    transport: Any = getattr(getattr(send, "__self__", None), "transport", None)
    if not callable(getattr(transport, "abort", None)):
        return None

    def reset() -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # a reset (RST), not a FIN queued behind data the client does not read; uvloop's
            # stand-in for a socket raises ValueError once the connection is gone
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    return reset


class TransportAbort:
    """ASGI middleware: a websocket's scope carries (under ``ABORT_KEY``) a function resetting
    its connection, or None where the server's transport cannot be reached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope = {**scope, ABORT_KEY: transport_abort(send)}
        await self.app(scope, receive, send)


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
    timeout = send_timeout(config)
    sender = asyncio.create_task(_send_loop(ws, hub, client, timeout))
    receiver = asyncio.create_task(_receive_loop(ws, client))
    ended = asyncio.create_task(client.ended.wait())  # stream removed, server stopping
    not_reading = blocked = False
    try:
        done, _ = await asyncio.wait({sender, receiver, ended}, return_when=asyncio.FIRST_COMPLETED)
        if ended in done and not sender.done():
            # The sender ends by itself now, unless it is blocked on a client that does not read.
            await asyncio.wait({sender}, timeout=CLOSE_WAIT_S)
            blocked = not sender.done()
        await cancel_and_wait(sender, receiver, ended)
        for task in (sender, receiver):
            error = None if task.cancelled() else task.exception()
            if isinstance(error, ClientNotReading):
                not_reading = True
                app.state.ws_stats.not_reading += 1
                log.info(
                    "stream %s: websocket client %s took no message for %g s "
                    "(limits.ws_send_timeout_s): closing it",
                    stream_id, _peer(ws), timeout,
                )
            elif error is not None and not _disconnected(error):
                log.warning("stream %s: websocket client ended with %r", stream_id, error)
    finally:
        hub.unsubscribe(client)
        if (
            ws.application_state != WebSocketState.DISCONNECTED
            and ws.client_state != WebSocketState.DISCONNECTED
        ):
            # A sender still blocked after CLOSE_WAIT_S: the close frame would wait behind the
            # same full buffer, so the connection is reset at once.
            wait = 0.0 if blocked else CLOSE_WAIT_S
            if app.state.shutting_down:
                await _close_within(ws, CLOSE_GOING_AWAY, "server shutting down", wait)
            elif app.state.manager.find(stream_id) is not handle:
                await _close_within(ws, CLOSE_STREAM_REMOVED, f"stream {stream_id!r} was removed", wait)
            elif not_reading:
                await _close_within(
                    ws, CLOSE_NOT_READING, f"client took no message for {timeout:g} s", wait
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


async def _close_within(ws: WebSocket, code: int, reason: str, wait: float = CLOSE_WAIT_S) -> None:
    """:func:`close`, but when the close frame cannot be written within ``wait`` seconds (the
    client does not read: it waits behind the full buffer for ever) the connection is reset
    instead, so that its socket and buffer do not stay on the server."""
    if wait > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await close(ws, code, reason)
                return
    abort = ws.scope.get(ABORT_KEY)
    if abort is not None:
        abort()


def _peer(ws: WebSocket) -> str:
    return f"{ws.client.host}:{ws.client.port}" if ws.client else "?"


async def _send_loop(ws: WebSocket, hub: Hub, client: Client, timeout: float) -> None:
    while True:
        msg = await client.next()
        if msg is None:
            return
        data = hub.finalize(client, msg)
        try:
            async with asyncio.timeout(timeout):
                await ws.send_bytes(data)
        except TimeoutError:
            # raised apart from TimeoutError, which is an OSError: _disconnected() would take it
            # for a client that went away
            raise ClientNotReading(f"no message taken for {timeout:g} s") from None
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
