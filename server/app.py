"""The FastAPI application: wires the stream manager, the hub, REST, websockets and the viewer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from models.registry import get_spec

from pipeline.config import AppConfig
from pipeline.manager import StreamManager, default_threads
from pipeline.stream import StreamStatus
from pipeline.types import SegmentationResult
from server import api, ws
from server.hub import Hub

log = logging.getLogger("segstream.server")
STATIC = Path(__file__).parent / "static"


def encode_workers(config: AppConfig) -> int:
    if config.engine.encode_workers:
        return config.engine.encode_workers
    return max(1, min(4, default_threads()))


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

        await anyio.to_thread.run_sync(mgr.start)
        log.info("segstream ready on %s:%s", config.server.host, config.server.port)
        try:
            yield
        finally:
            app.state.shutting_down = True
            hub.shutdown()
            await anyio.to_thread.run_sync(lambda: mgr.shutdown(config.server.shutdown_timeout_s))
            log.info("segstream stopped")

    app = FastAPI(
        title="segstream",
        version="0.1.0",
        description="Real-time video segmentation streaming: sources in, masks out.",
        lifespan=lifespan,
    )
    mgr = manager or StreamManager(config, restrict_files=True)
    hub = Hub(
        workers=encode_workers(config),
        on_drop=lambda sid, cause: mgr.count_drop(sid, cause),
    )
    app.state.config = config
    app.state.manager = mgr
    app.state.hub = hub
    app.state.shutting_down = False

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

    def on_client_change(stream_id: str, delta: int) -> None:
        handle = mgr.find(stream_id)
        if handle is not None:
            handle.clients = max(0, handle.clients + delta)

    def classes_for(model: str) -> tuple[str, ...]:
        return tuple(get_spec(model).classes)

    app.state.on_result = on_result
    app.state.on_status = on_status
    app.state.on_client_change = on_client_change
    app.state.classes_for = classes_for

    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.server.allowed_origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        limit = config.limits.max_request_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse({"detail": f"request body too large (limit {limit} bytes)"}, status_code=413)
        return await call_next(request)

    app.include_router(api.router)
    app.include_router(ws.router)

    @app.get("/healthz", include_in_schema=True, summary="Process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded and engine running")
    def readyz() -> JSONResponse:
        stats = mgr.engine.stats.snapshot()
        streams = {h.id: h.worker.status().state.value for h in mgr.list()}
        ready = bool(stats["ready"] and mgr.engine.alive and not app.state.shutting_down)
        body = {"ready": ready, "engine": stats, "device": mgr.device, "streams": streams}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
