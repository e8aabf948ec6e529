"""REST API: streams, models, health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from models.registry import UnknownModelError, WeightsError, get_spec, list_models, weights_status
from pipeline.config import StreamConfig
from pipeline.manager import LimitError, StreamExistsError, StreamHandle, StreamManager, StreamNotFoundError
from pipeline.render import class_colours
from server.auth import require_token
from server.schemas import (
    ErrorBody,
    ModelInfo,
    StreamCreate,
    StreamInfo,
    StreamPatch,
    roi_from,
    temporal_from,
)

router = APIRouter(prefix="/api", dependencies=[Depends(require_token)])

_errors: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    401: {"model": ErrorBody, "description": "missing or wrong token (when the server has one)"},
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    422: {"model": ErrorBody},
    413: {"model": ErrorBody, "description": "request body too large"},
    429: {"model": ErrorBody},
}


def manager(request: Request) -> StreamManager:
    return request.app.state.manager


def describe(request: Request, sid: str) -> dict[str, Any]:
    return describe_handle(request, manager(request).get(sid))


def describe_handle(request: Request, handle: StreamHandle) -> dict[str, Any]:
    info = handle.describe()
    info["clients"] = request.app.state.hub.client_count(handle.id)
    return info


@router.get("/streams", response_model=list[StreamInfo], summary="List streams")
def list_streams(request: Request) -> list[dict[str, Any]]:
    out = []
    for h in manager(request).list():
        try:
            out.append(describe(request, h.id))
        except StreamNotFoundError:
            continue  # removed meanwhile
    return out


@router.post(
    "/streams",
    response_model=StreamInfo,
    status_code=status.HTTP_201_CREATED,
    responses=_errors,
    summary="Add a stream",
)
def add_stream(body: StreamCreate, request: Request, response: Response) -> dict[str, Any]:
    mgr = manager(request)
    temporal = temporal_from(body.temporal)
    roi = roi_from(body.roi)
    try:
        sc = StreamConfig(
            id=body.id,
            source=body.source,
            model=body.model,
            **({"temporal": temporal} if temporal else {}),
            **({"roi": roi} if roi else {}),
            **({"options": body.options} if body.options else {}),
        )
        handle = mgr.add(sc)
    except StreamExistsError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    except LimitError as e:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(e)) from None
    except UnknownModelError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
    except WeightsError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
    response.headers["Location"] = f"/api/streams/{handle.id}"
    # From the handle: a DELETE may already have removed the stream again.
    return describe_handle(request, handle)


@router.get("/streams/{stream_id}", response_model=StreamInfo, responses=_errors, summary="One stream")
def get_stream(stream_id: str, request: Request) -> dict[str, Any]:
    try:
        return describe(request, stream_id)
    except StreamNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown stream {stream_id!r}") from None


@router.patch("/streams/{stream_id}", response_model=StreamInfo, responses=_errors, summary="Change a stream")
def patch_stream(stream_id: str, body: StreamPatch, request: Request) -> dict[str, Any]:
    mgr = manager(request)
    try:
        handle = mgr.get(stream_id)
        mgr.update(
            stream_id,
            temporal=temporal_from(body.temporal, handle.temporal),
            roi=roi_from(body.roi, handle.roi),
        )
        return describe(request, stream_id)
    except (StreamNotFoundError, KeyError):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown stream {stream_id!r}") from None
    except ValueError as e:  # settings that are valid one by one but not together
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None


@router.delete(
    "/streams/{stream_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors,
    summary="Remove a stream",
)
def delete_stream(stream_id: str, request: Request) -> Response:
    try:
        # Gone for everyone at once; a source blocked in a read is not waited for long.
        manager(request).remove(stream_id, timeout=1.0)
    except StreamNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown stream {stream_id!r}") from None
    request.app.state.hub.close_stream(stream_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def model_info(name: str, default: str) -> dict[str, Any]:
    spec = get_spec(name)
    return {
        "name": spec.name,
        "description": spec.description,
        "classes": list(spec.classes),
        "colours": class_colours(tuple(spec.classes)),
        "input_size": list(spec.input_size),
        "binary": spec.binary,
        "weights": weights_status(spec),
        "default": spec.name == default,
    }


@router.get("/models", response_model=list[ModelInfo], summary="Registered models")
def get_models(request: Request) -> list[dict[str, Any]]:
    default = manager(request).config.default_model
    return [model_info(s.name, default) for s in list_models()]


@router.get("/models/{name}", response_model=ModelInfo, responses=_errors, summary="One model")
def get_model(name: str, request: Request) -> dict[str, Any]:
    try:
        return model_info(name, manager(request).config.default_model)
    except UnknownModelError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
