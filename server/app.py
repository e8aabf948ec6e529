"""The FastAPI application: wires the stream manager, the hub, REST, websockets and the viewer."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.registry import get_spec
from pipeline.config import AppConfig
from pipeline.manager import StreamManager, default_threads
from pipeline.stream import StreamStatus
from pipeline.types import SegmentationResult
from server import api, ingest, pictures, ws
from server.hub import Hub, json_finite
from server.limits import BodySizeLimit
from server.metrics import CONTENT_TYPE_LATEST, Metrics, cuda_memory

log = logging.getLogger("segstream.server")
STATIC = Path(__file__).parent / "static"


def encode_workers(config: AppConfig) -> int:
    if config.engine.encode_workers:
        return config.engine.encode_workers
    return max(1, min(4, default_threads()))


async def _invalid_body(request: Request, exc: Exception) -> JSONResponse:
    """422 with pydantic's errors, as FastAPI sends them, but also for bodies holding NaN or
    Infinity (echoed back in ``input``, they made the default handler fail with a 500)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse(status_code=422, content={"detail": json_finite(jsonable_encoder(errors))})


def uvicorn_options(config: AppConfig) -> dict[str, Any]:
    """Server options that follow from the config (shared by the CLI, tests and benchmarks)."""
    return {
        "ws_max_size": config.limits.max_ws_message_bytes,
        "ws_per_message_deflate": config.server.ws_compression,
        "lifespan": "on",
        # h11 caps what it buffers of a request's head; httptools buffers headers without
        # limit (four connections sending 50 MB of headers held 200 MB). The REST calls are
        # few and small, and websocket traffic does not go through this parser.
        "http": "h11",
        "h11_max_incomplete_event_size": config.limits.max_header_bytes,
    }


class OneLineStartupFailure:
    """ASGI middleware: a failed start-up reaches the server as the error's own line
    (``RuntimeError: …``), not the traceback Starlette sends with it, which uvicorn logs
    whole; the lifespan has already logged what failed (``cannot start: …``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def one_line(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                lines = [line for line in str(message.get("message") or "").splitlines() if line.strip()]
                message = {**message, "message": lines[-1] if lines else ""}
            await send(message)

        await self.app(scope, receive, one_line)


# Paths whose GET answer never ends (the MJPEG route, /api/streams/{stream_id}/mjpeg).
ENDLESS_PATHS = re.compile(r"/api/streams/[^/]+/mjpeg")


class HeadAsGet:
    """ASGI middleware: ``HEAD`` is answered as ``GET`` would be, with its status and headers
    (``Content-Length`` included) and no body, as HTTP asks; uptime monitors, load balancers and
    ``curl -I`` check ``/healthz`` that way. An endless response (an MJPEG stream) has no
    final headers to give, so its route keeps refusing HEAD (405); other paths that merely end
    in ``/mjpeg`` (a stream or model named ``mjpeg``) are answered as GET."""

    def __init__(self, app: ASGIApp, endless: re.Pattern[str] = ENDLESS_PATHS) -> None:
        self.app = app
        self.endless = endless

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.endless.fullmatch(scope["path"]):
            await self.app(scope, receive, send)
            return
        if scope["method"] != "HEAD":
            await self.app(scope, receive, self._complete_allow(scope, send))
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)

    @staticmethod
    def _complete_allow(scope: Scope, send: Send) -> Send:
        """A 405's ``Allow`` lists every method the path takes, not only those of the first route
        that matched it (Starlette's answer), and HEAD beside GET, since HEAD is answered
        wherever GET is."""

        async def allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = []
                for name, value in message.get("headers", []):
                    if name.lower() == b"allow":
                        named = [m.strip() for m in value.decode("latin-1").split(",") if m.strip()]
                        methods = method_order({*named, *path_methods(scope, {*_METHOD_ORDER, *named})})
                        if "GET" in methods and "HEAD" not in methods:
                            methods.insert(methods.index("GET") + 1, "HEAD")
                        value = ", ".join(methods).encode("latin-1")
                    headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        return allow


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def method_order(methods: set[str]) -> list[str]:
    """HTTP methods in the usual order (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, then
    any other alphabetically), each once."""
    known = [m for m in _METHOD_ORDER if m in methods]
    return known + sorted(methods - set(_METHOD_ORDER))


def path_methods(scope: Scope, candidates: Iterable[str] = _METHOD_ORDER) -> set[str]:
    """Which of ``candidates`` some route of the app takes at the request's path (each route,
    included routers too, asked through Starlette's ``matches``). Mounts are left out: they
    match a path whatever the method."""
    app = scope.get("app")
    methods: set[str] = set()
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if isinstance(route, Mount):
            continue
        for method in set(candidates) - methods:
            try:
                match, _ = route.matches({**scope, "method": method})
            except Exception:  # a path parameter its converter refuses: not this route's path
                break
            if match is Match.FULL:
                methods.add(method)
    return methods


def create_app(config: AppConfig | None = None, *, manager: StreamManager | None = None) -> FastAPI:
    """Build the app. The pipeline starts in the lifespan (so importing this starts nothing)."""
    config = config or AppConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mgr = app.state.manager
        hub: Hub = app.state.hub
        mgr.result_listeners.append(app.state.on_result)
        mgr.status_listeners.append(app.state.on_status)
        # Loading models and opening sources blocks; keep it off the event loop.
        import anyio

        if app.state.metrics is not None:
            mgr.result_listeners.append(app.state.metrics.observe)
            mgr.removal_listeners.append(app.state.metrics.forget)
        bound = config.server.shutdown_timeout_s
        try:
            await anyio.to_thread.run_sync(mgr.start)
        except Exception as e:
            # Stop what did start (the engine thread, streams already added) before failing,
            # so the process ends cleanly instead of with threads still running.
            log.error("cannot start: %s", e)
            await anyio.to_thread.run_sync(lambda: mgr.shutdown(bound))
            raise
        app.state.started = True
        if config.server.port:
            log.info("segstream ready on %s:%s", config.server.host, config.server.port)
        else:  # port 0: the system picks one when uvicorn binds, after this (uvicorn logs it)
            log.info("segstream ready on %s, on the port the system picks", config.server.host)
        try:
            yield
        finally:
            begin_shutdown()
            hub.shutdown()
            app.state.clean_shutdown = await anyio.to_thread.run_sync(lambda: mgr.shutdown(bound))
            log.info("segstream stopped")

    app = FastAPI(
        title="segstream",
        version="0.1.0",
        description="Real-time video segmentation streaming: sources in, masks out.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _invalid_body)
    mgr = manager or StreamManager(config, restrict_files=True)
    hub = Hub(
        workers=encode_workers(config),
        client_queue=config.limits.client_queue,
        on_drop=lambda sid, cause: mgr.count_drop(sid, cause),
    )
    app.state.config = config
    app.state.manager = mgr
    app.state.hub = hub
    app.state.shutting_down = False
    app.state.started = False
    app.state.ws_stats = ws.WsStats()
    app.state.metrics = (
        Metrics(
            mgr,
            hub,
            device_memory=cuda_memory if mgr.device.startswith("cuda") else None,
            not_reading=lambda: int(app.state.ws_stats.not_reading),
        )
        if config.server.metrics
        else None
    )

    def begin_shutdown() -> None:
        """Stop taking new work and end every websocket (they close with 1001, going away).

        Called by the server before it closes connections itself, so clients learn the
        reason instead of seeing the transport drop; idempotent."""
        if app.state.shutting_down:
            return
        app.state.shutting_down = True
        log.info("shutting down: closing websockets")
        for handle in mgr.list():
            hub.close_stream(handle.id)

    def on_result(result: SegmentationResult) -> None:
        handle = mgr.find(result.frame.stream_id)
        if handle is not None:
            hub.publish(result, handle.drops.snapshot())

    def on_status(stream_id: str, status: StreamStatus) -> None:
        handle = mgr.find(stream_id)
        info: dict[str, Any] = {
            "state": status.state.value,
            "error": status.error,
            "width": status.width,
            "height": status.height,
        }
        if handle is not None:
            info["drops"] = handle.drops.snapshot()
            info["classes"] = list(classes_for(handle.model))
        hub.publish_status(stream_id, info)

    def classes_for(model: str) -> tuple[str, ...]:
        return tuple(get_spec(model).classes)

    app.state.on_result = on_result
    app.state.on_status = on_status
    app.state.classes_for = classes_for
    app.state.begin_shutdown = begin_shutdown

    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.server.allowed_origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )

    app.add_middleware(BodySizeLimit, limit=config.limits.max_request_bytes)
    app.add_middleware(HeadAsGet)
    app.add_middleware(OneLineStartupFailure)
    app.add_middleware(ws.TransportAbort)  # outermost: it needs the server's own send

    app.include_router(api.router)
    app.include_router(ws.router)
    app.include_router(ingest.router)
    app.include_router(pictures.router)

    def engine_death() -> str | None:
        """Why the engine thread is gone while the server still runs (None while it runs, before
        start-up and during shutdown): nothing is segmented any more until a restart."""
        engine = mgr.engine
        if not app.state.started or app.state.shutting_down or engine.alive:
            return None
        return f"engine thread died: {engine.died or 'ended'}"

    @app.get("/healthz", include_in_schema=True, summary="Process is alive")
    def healthz() -> JSONResponse:
        # A dead engine thread is never restarted: only a restart of the process helps, which
        # is what a failing liveness probe asks for.
        died = engine_death()
        if died is not None:
            return JSONResponse({"status": "failed", "reason": died}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Model loaded, engine running, per-stream summary")
    def readyz() -> JSONResponse:
        engine = mgr.engine
        stats = engine.stats.snapshot()
        model = config.default_model
        checks = {
            "started": bool(app.state.started),
            "model_loaded": model in engine.loaded_models,
            "engine_running": engine.alive,
            "accepting": not app.state.shutting_down,
        }
        ready = all(checks.values())
        died = engine_death()
        if died is not None:
            reason = died
        elif app.state.shutting_down:
            reason = "shutting down"
        elif not stats["ready"]:
            reason = "warming up: loading and compiling the model"
        elif not checks["model_loaded"]:
            why = stats["failed_models"].get(model) or stats["last_error"]
            reason = f"default model {model!r} failed to load: {why}"
        elif not ready:
            reason = ", ".join(k for k, ok in checks.items() if not ok) + " not satisfied"
        else:
            reason = None
        streams = {}
        for h in mgr.list():
            info = {**h.describe(), "clients": hub.client_count(h.id)}
            streams[h.id] = {
                k: info[k] for k in ("state", "error", "fps", "frames", "reconnects", "clients", "latency_ms")
            }
        body = {
            "ready": ready,
            "reason": reason,
            "checks": checks,
            "model": model,
            "device": mgr.device,
            "engine": stats,
            "streams": streams,
        }
        # Streams that are down do not make the process unready: the operator sees them
        # here and in /metrics, while the load balancer keeps routing to a healthy engine.
        return JSONResponse(body, status_code=200 if ready else 503)

    if app.state.metrics is not None:
        metrics: Metrics = app.state.metrics

        @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
        def get_metrics() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
