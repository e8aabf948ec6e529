"""Results as plain HTTP pictures, for tools that show images but speak no websocket.

    GET /api/streams/{id}/snapshot   the next segmented frame as one JPEG (or PNG labels)
    GET /api/streams/{id}/mjpeg      segmented frames as an MJPEG stream
                                     (multipart/x-mixed-replace: an <img> tag, VLC, ffplay,
                                     a dashboard or NVR that takes an MJPEG camera)

Both subscribe to the stream like a websocket client (same ``format``, ``quality`` and
``max_fps`` parameters, same per-stream client limit, same token, also as ``?token=``), so
pictures are only encoded while someone asks for them, and a slow reader loses older
frames (counted as ``client_slow``) instead of holding up the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from pipeline.render import Format
from pipeline.types import StreamState
from server.auth import require_token
from server.hub import Client, Hub
from server.schemas import ErrorBody
from server.ws import (
    CLOSE_WAIT_S,
    SEND_TIMEOUT_S,
    ParamError,
    cancel_and_wait,
    list_names,
    number_param,
    parse_settings,
    send_timeout,
)

log = logging.getLogger("segstream.pictures")

router = APIRouter(prefix="/api", dependencies=[Depends(require_token)])

BOUNDARY = "segstream-frame"
SNAPSHOT_TIMEOUT_S = 3.0  # default wait for the next segmented frame
MAX_SNAPSHOT_TIMEOUT_S = 30.0
MEDIA_TYPES = {Format.OVERLAY: "image/jpeg", Format.JPEG: "image/jpeg", Format.LABELS: "image/png"}
MJPEG_FORMATS = (Format.OVERLAY, Format.JPEG)
CLIENT_LEFT = 499  # the status logged for a snapshot whose client left before it came

_errors: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad query parameter"},
    401: {"model": ErrorBody, "description": "missing or wrong token (when the server has one)"},
    404: {"model": ErrorBody, "description": "unknown stream, or removed while waiting"},
    409: {"model": ErrorBody, "description": "the stream has ended (stopped or failed)"},
    429: {"model": ErrorBody, "description": "the stream's client limit is reached"},
    503: {"model": ErrorBody, "description": "no picture in time, or the server is shutting down"},
}


def _query(request: Request, formats: tuple[Format, ...], *, snapshot: bool) -> tuple[dict[str, Any], float]:
    """Validated settings (``fmt``, ``quality``, ``max_fps``) and the snapshot's timeout."""
    values = dict(request.query_params)
    timeout = SNAPSHOT_TIMEOUT_S
    try:
        # One value each: ``format=jpeg&format=labels`` answered whichever came last.
        query = request.query_params
        repeated = sorted(k for k in values if len(query.getlist(k)) > 1)
        if repeated:
            raise ParamError(f"parameter(s) given more than once: {list_names(repeated)}")
        if snapshot:
            if "max_fps" in values:
                raise ParamError("max_fps applies to /mjpeg, not to a snapshot")
            if "timeout" in values:
                timeout = number_param("timeout", values.pop("timeout"))
                if not 0 < timeout <= MAX_SNAPSHOT_TIMEOUT_S:
                    limit = f"(0, {MAX_SNAPSHOT_TIMEOUT_S:g}]"
                    raise ParamError(f"timeout must be in {limit} seconds, got {timeout:g}")
        settings = parse_settings(values, partial=False)
    except ParamError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
    fmt = settings.setdefault("fmt", Format.OVERLAY)
    if fmt not in formats:
        names = ", ".join(f.value for f in formats)
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"format {fmt.value!r} is not a picture here; use {names}"
        )
    return settings, timeout


def _subscribe(
    request: Request, stream_id: str, settings: dict[str, Any]
) -> tuple[Hub, Client, dict[str, Any]]:
    """Subscribe like a websocket client; the stream's description at that moment."""
    app = request.app
    if app.state.shutting_down:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "server shutting down")
    handle = app.state.manager.find(stream_id)
    if handle is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown stream {stream_id!r}")
    hub: Hub = app.state.hub
    limit = app.state.config.limits.max_clients_per_stream
    if hub.client_count(stream_id) >= limit:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, f"client limit reached ({limit})")
    client = hub.subscribe(
        stream_id, fmt=settings["fmt"], max_fps=settings.get("max_fps"), quality=settings.get("quality", 80)
    )
    # Subscribed first: a state change after this description reaches the client, so an end
    # that comes in between is not missed (it would leave the client waiting for nothing).
    info = handle.describe()
    return hub, client, info


def _ended(header_or_info: dict[str, Any]) -> bool:
    try:
        return StreamState(str(header_or_info.get("state"))).terminal
    except ValueError:
        return False


def _why(info: dict[str, Any]) -> str:
    state = info.get("state")
    error = info.get("error")
    return f"stream is {state}" + (f": {error}" if error else "")


@router.get(
    "/streams/{stream_id}/snapshot",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "the picture"},
        **_errors,
    },
    summary="The next segmented frame as a picture",
)
async def snapshot(request: Request, stream_id: str) -> Response:
    """Waits (up to ``timeout`` seconds, default 3) for the stream's next segmented frame and
    returns it: ``format=overlay`` (JPEG, default), ``jpeg`` (the frame alone) or ``labels``
    (PNG of class indices). The frame's index and capture time come as ``X-Frame-Index`` and
    ``X-Captured-At`` headers."""
    settings, timeout = _query(request, tuple(MEDIA_TYPES), snapshot=True)
    hub, client, info = _subscribe(request, stream_id, settings)
    # A client that gives up waiting (a dashboard's own timeout, a camera that is down) is
    # let go at once: its subscription would otherwise count against the client limit until
    # ``timeout``.
    left = asyncio.create_task(_until_disconnect(request.receive, client))
    try:
        if _ended(info):
            raise HTTPException(status.HTTP_409_CONFLICT, f"no picture will come: {_why(info)}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                msg = await asyncio.wait_for(client.next(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                handle = request.app.state.manager.find(stream_id)
                now = handle.describe() if handle is not None else info
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"no picture within {timeout:g} s ({_why(now)})",
                    headers={"Retry-After": "1"},
                ) from None
            if msg is None:
                if left.done():
                    return Response(status_code=CLIENT_LEFT)  # nobody to send it to
                if request.app.state.shutting_down:
                    raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "server shutting down")
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"stream {stream_id!r} was removed")
            header = msg.header
            if header.get("type") == "status":
                if _ended(header):
                    raise HTTPException(status.HTTP_409_CONFLICT, f"no picture will come: {_why(header)}")
                continue
            client.sent += 1
            return Response(
                msg.payload,
                media_type=MEDIA_TYPES[settings["fmt"]],
                headers={
                    "Cache-Control": "no-store",
                    "X-Frame-Index": str(header["frame"]),
                    "X-Captured-At": f"{header['captured_at']:.6f}",
                },
            )
    finally:
        await cancel_and_wait(left)
        hub.unsubscribe(client)


async def _until_disconnect(receive: Receive, client: Client) -> None:
    """Ends ``client`` (its ``next()`` returns None) once the HTTP client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass
    client.close()


class _Subscribed(StreamingResponse):
    """A streaming response that holds a hub subscription. It ends the subscription however
    the response ends (all sent, the client gone, the stream removed, the server stopping),
    notices a client that went away while no frame was coming (a camera that is down) at
    once, and lets go of a reader that does not read: one that takes no part for
    ``send_timeout`` seconds (``limits.ws_send_timeout_s``, as for websockets), or whose
    stream ended while a send to it was blocked."""

    def __init__(
        self, content: AsyncIterator[bytes], hub: Hub, client: Client, *,
        send_timeout: float = SEND_TIMEOUT_S, **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._hub = hub
        self._client = client
        self._send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        complete = False

        async def timed_send(message: Message) -> None:
            nonlocal complete
            async with asyncio.timeout(self._send_timeout):
                await send(message)
            complete = message["type"] == "http.response.body" and not message.get("more_body", False)

        response = asyncio.create_task(super().__call__(scope, receive, timed_send))
        watcher = asyncio.create_task(_until_disconnect(receive, self._client))  # ends the parts
        ended = asyncio.create_task(self._client.ended.wait())
        try:
            done, _ = await asyncio.wait({response, ended}, return_when=asyncio.FIRST_COMPLETED)
            if response not in done:
                # Out of the stream's clients at once (a stream re-added under the same id
                # starts without it), while the parts end by themselves, unless a send is
                # blocked on a reader that does not read; then the response is dropped
                # unfinished and its connection reset.
                self._hub.unsubscribe(self._client)
                await asyncio.wait({response}, timeout=CLOSE_WAIT_S)
        finally:
            await cancel_and_wait(response, watcher, ended)
            self._hub.unsubscribe(self._client)
            if not complete:
                try:
                    await _drop_connection(scope)
                except Exception:  # the server's own close applies
                    log.debug("could not reset an unfinished MJPEG connection", exc_info=True)
        error = None if response.cancelled() else response.exception()
        if isinstance(error, TimeoutError):
            log.info(
                "stream %s: MJPEG reader took no picture for %.0f s: closing it",
                self._client.stream_id, self._send_timeout,
            )
        elif error is not None and not isinstance(error, OSError | ClientDisconnect):
            raise error


async def _drop_connection(scope: Scope) -> None:
    """Close the connection of a response given up on unfinished, at once (a reset).

    The server's own close of such a connection waits until the data it still holds for
    the client has been sent, which never happens for a reader that does not read: its
    connection, socket and buffers stayed open for as long as it stayed connected, server
    shutdown waited for it, and the server logged each as an error. ASGI has no way to ask
    for this, so the transport is taken from uvicorn's request cycle: the object whose
    ``run_asgi`` runs this request's task (the same scope). Under another server, or should
    uvicorn change, nothing is done here and the server's own close applies."""
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    cycle = frame.f_locals.get("self") if frame is not None else None
    transport: Any = getattr(cycle, "transport", None)
    if getattr(cycle, "scope", None) is not scope or not callable(getattr(transport, "abort", None)):
        return
    if transport.is_closing():  # the client went away (or the server closes it already)
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # a reset, not a FIN after data nobody reads (uvloop's stand-in for a socket raises
        # ValueError once the connection is gone)
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    # The transport reports the loss to the server on the next turn of the loop; once it
    # has, the server knows the client is gone and does not count an unfinished response.
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def _parts(client: Client) -> AsyncIterator[bytes]:
    while (msg := await client.next()) is not None:
        header = msg.header
        if header.get("type") == "status":
            if _ended(header):
                break  # no frame will come: end the stream instead of hanging
            continue
        client.sent += 1
        head = (
            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(msg.payload)}\r\n"
            f"X-Frame-Index: {header['frame']}\r\nX-Captured-At: {header['captured_at']:.6f}\r\n\r\n"
        )
        yield head.encode("ascii") + msg.payload + b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode("ascii")


@router.get(
    "/streams/{stream_id}/mjpeg",
    response_class=StreamingResponse,
    responses={200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}},
                     "description": "JPEG parts until the stream ends or is removed"}, **_errors},
    summary="Segmented frames as an MJPEG stream",
)
async def mjpeg(request: Request, stream_id: str) -> StreamingResponse:
    """``format=overlay`` (default) or ``jpeg``; ``max_fps`` and ``quality`` as on the
    websocket. Ends when the stream ends (stopped, failed) or is removed."""
    settings, _ = _query(request, MJPEG_FORMATS, snapshot=False)
    hub, client, info = _subscribe(request, stream_id, settings)
    if _ended(info):
        hub.unsubscribe(client)
        raise HTTPException(status.HTTP_409_CONFLICT, f"no picture will come: {_why(info)}")
    return _Subscribed(
        _parts(client),
        hub,
        client,
        send_timeout=send_timeout(request.app.state.config),
        media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers={"Cache-Control": "no-store"},
    )
