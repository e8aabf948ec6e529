"""Request and response bodies of the REST API (pydantic, shown in the OpenAPI docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.config import STREAM_ID_PATTERN, RoiConfig, SourceOptions, TemporalConfig, check_stream_id


class StreamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str | None = Field(
        None, pattern=STREAM_ID_PATTERN, description="stream id; generated when absent"
    )
    source: str = Field(
        ..., min_length=1, max_length=2048, description="source URI (rtsp://, http://, file, webcam:0, demo)"
    )
    model: str | None = Field(None, max_length=128, description="model name from GET /api/models")
    temporal: TemporalConfig | Literal["off", "smooth", "keyframe"] | None = None
    roi: RoiConfig | bool | None = None
    options: SourceOptions | None = None

    @field_validator("id")
    @classmethod
    def _usable_id(cls, value: str | None) -> str | None:
        return check_stream_id(value)


class StreamPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temporal: TemporalConfig | Literal["off", "smooth", "keyframe"] | None = None
    roi: RoiConfig | bool | None = None


class StreamInfo(BaseModel):
    id: str
    source: str
    kind: str
    model: str
    state: str
    error: str | None
    state_since: float
    created_at: float
    last_frame_at: float | None
    width: int | None
    height: int | None
    source_fps: float | None
    fps_in: float
    fps: float
    frames_in: int
    frames: int
    reconnects: int
    latency_ms: dict[str, float]
    drops: dict[str, int]
    clients: int
    temporal: str
    roi: bool
    temporal_settings: dict[str, Any]  # every temporal threshold in force
    roi_settings: dict[str, Any]  # every ROI setting in force


class ModelInfo(BaseModel):
    name: str
    description: str
    classes: list[str]
    colours: list[str]
    input_size: list[int]
    binary: bool
    weights: dict[str, Any]
    default: bool


class ErrorBody(BaseModel):
    detail: str


def _merged(value: Any, current: Any) -> Any:
    """``value``'s fields that were given, over ``current`` (a PATCH changes only what it
    names; a POST, with no current settings, starts from the defaults)."""
    if current is None:
        return value
    return type(current).model_validate({**current.model_dump(), **value.model_dump(exclude_unset=True)})


def temporal_from(
    value: TemporalConfig | str | None, current: TemporalConfig | None = None
) -> TemporalConfig | None:
    if value is None:
        return None
    if isinstance(value, TemporalConfig):
        return _merged(value, current)
    base = current or TemporalConfig()
    return base.model_copy(update={"mode": value})


def roi_from(value: RoiConfig | bool | None, current: RoiConfig | None = None) -> RoiConfig | None:
    if value is None:
        return None
    if isinstance(value, RoiConfig):
        return _merged(value, current)
    base = current or RoiConfig()
    return base.model_copy(update={"enabled": bool(value)})
