"""The one configuration tree: read once at start-up (CLI flags, a TOML file) and passed down.

No module reads environment variables on its own; ``AppConfig`` is built in one place
(``server.cli``) and every component receives the part it needs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    # NaN and infinities are refused wherever a number is expected (JSON bodies may carry them).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SourceOptions(_Strict):
    """Per-source options; also accepted as query parameters on the source URI."""

    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = Field(5.0, gt=0, le=120)
    read_timeout_s: float = Field(5.0, gt=0, le=120)
    target_fps: float | None = Field(None, gt=0, le=240)
    loop: bool = False
    low_latency: bool = True
    realtime: bool | None = None  # pace files at their frame rate; None = decide by context
    deinterlace: Literal["auto", "on", "off"] = "auto"  # auto: pictures flagged interlaced


class ReconnectConfig(_Strict):
    initial_backoff_s: float = Field(0.5, gt=0)
    max_backoff_s: float = Field(10.0, gt=0)
    jitter: float = Field(0.2, ge=0, le=1)
    stall_timeout_s: float = Field(5.0, gt=0)  # no frame for this long = stalled, decoder restarted
    max_attempts: int | None = Field(None, ge=1)  # None: retry for ever
    # A source that refuses the credentials is retried after this, doubling up to
    # auth_max_backoff_s: many cameras lock the account after a few failed logins.
    auth_backoff_s: float = Field(60.0, gt=0)
    auth_max_backoff_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _caps_not_below_their_start(self) -> ReconnectConfig:
        for first, cap in (("initial_backoff_s", "max_backoff_s"), ("auth_backoff_s", "auth_max_backoff_s")):
            if getattr(self, cap) < getattr(self, first):
                raise ValueError(
                    f"{cap} ({getattr(self, cap):g}) must be at least {first} ({getattr(self, first):g})"
                )
        return self


class TemporalConfig(_Strict):
    mode: Literal["off", "smooth", "keyframe"] = "off"
    # smooth (and keyframe full passes): where the residual is below `motion_low` and the model
    # agrees with the previous output (within `agreement`), blend with it (weight `blend`)
    motion_low: float = Field(0.06, ge=0, le=1)
    motion_high: float = Field(0.24, ge=0, le=1)
    blend: float = Field(0.85, ge=0, le=1)
    # keyframe: run the model when accumulated residual energy exceeds this, or every K frames
    keyframe_energy: float = Field(0.02, ge=0, le=1)
    keyframe_max_gap: int = Field(8, ge=1, le=10000)
    scene_cut_energy: float = Field(0.25, ge=0, le=1)
    hysteresis: float = Field(0.05, ge=0, lt=1)  # bias toward the previous label where it counts
    max_gap_reset: int = Field(30, ge=0, le=100000)  # more dropped frames than this in a row resets the state
    motion_search: int = Field(0, ge=0, le=8)  # smooth: follow motion this many residual cells (0: off)
    compensate: bool = False  # smooth, moving cameras: follow the dominant translation between frames
    agreement: float = Field(0.6, gt=0, le=1)  # new/previous probability difference where blending stops
    noise_floor: float = Field(0.02, ge=0, le=1)  # keyframe: residual below this is noise, not motion


class RoiConfig(_Strict):
    enabled: bool = False
    full_every: int = Field(10, ge=1, le=10000)  # full-frame discovery pass at least every K frames
    max_regions: int = Field(4, ge=1, le=16)
    margin: float = Field(0.25, ge=0, le=4)  # margin on each side, relative to the region's longer side
    motion_margin: float = Field(0.5, ge=0, le=10)  # extra margin per pixel of predicted displacement
    min_area: float = Field(0.0005, ge=0)  # components smaller than this share of the frame are ignored
    gap_margin: float = Field(0.15, ge=0, le=4)  # extra relative margin per frame missing since last update
    min_crop: float = Field(0.2, ge=0, le=1)  # smallest crop side, as a share of the frame's short side
    full_area: float = Field(0.7, gt=0, le=1)  # crops covering this share of the frame: one full pass instead
    collapse: float = Field(0.35, ge=0, le=1)  # crop mask below this share of the tracked area: full pass
    jump: float = Field(0.5, ge=0, le=10)  # centroid this share of the region off its prediction: full pass
    border_touch: float = Field(0.05, ge=0, le=1)  # share of an inner crop edge that is foreground: full pass
    scene_cut: float = Field(0.2, ge=0, le=1)  # mean thumbnail change that resets the state
    max_gap_reset: int = Field(30, ge=1, le=100000)  # more frames missing than this resets the state
    feather: float = Field(0.08, ge=0, le=0.5)  # blend ramp at inner crop edges, share of the crop side
    seed_threshold: float = Field(0.2, gt=0, le=1)  # fg probability that starts tracking a region
    merge_overlap: float = Field(0.3, ge=0, le=1)  # crops sharing this much of the smaller one merge
    budget: float = Field(1.5, ge=0, le=64)  # mean model inputs per frame (full passes + crops); 0: no limit
    hold: float = Field(0.2, ge=0, le=1)  # keep last frame's crop while its side is within this share


# The one rule for stream ids: they appear in URLs (/api/streams/ID, /ws/streams/ID).
STREAM_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_STREAM_ID = re.compile(STREAM_ID_PATTERN)


def check_stream_id(value: str | None) -> str | None:
    """``value`` if it is a usable stream id (or None), else ValueError saying why. "." and
    ".." match the pattern but are path segments: a URL cannot name them."""
    if value is None:
        return None
    if not _STREAM_ID.fullmatch(value):
        raise ValueError(f"invalid stream id {value!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    if value in (".", ".."):
        raise ValueError(f"invalid stream id {value!r}: '.' and '..' cannot be named in a URL")
    return value


class StreamConfig(_Strict):
    id: str | None = Field(None, pattern=STREAM_ID_PATTERN)
    source: str = Field(..., min_length=1, max_length=2048)
    model: str | None = None
    temporal: TemporalConfig = TemporalConfig()
    roi: RoiConfig = RoiConfig()
    options: SourceOptions = SourceOptions()

    @field_validator("id")
    @classmethod
    def _usable_id(cls, value: str | None) -> str | None:
        return check_stream_id(value)


class EngineConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(4.0, ge=0, le=1000)
    latency_budget_ms: float = Field(1000.0, gt=0)  # older frames are dropped as stale
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = True  # CUDA only (ignored on a CPU): one graph per batch size, captured at warm-up
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None = cores - 1 (>=1)
    # CPU only, Linux: the engine thread on the first `threads` CPUs, every other thread on the
    # others (pipeline.affinity)
    pin_threads: bool = False
    encode_workers: int | None = Field(None, ge=1)


class LimitsConfig(_Strict):
    max_streams: int = Field(16, ge=1)
    max_clients_per_stream: int = Field(64, ge=1)
    max_source_pixels: int = Field(3840 * 2160, ge=1)
    max_ws_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_request_bytes: int = Field(64 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024)  # request line and headers of one request
    client_queue: int = Field(1, ge=1, le=16)
    # a message a websocket client does not take within this many seconds (its TCP window stays
    # full: it does not read) closes the connection (1008), reset if the close cannot go out;
    # unset: 20 s
    ws_send_timeout_s: float | None = Field(None, gt=0, le=3600)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = None
    # Other origins whose pages may call the API and open the websockets; the viewer's own
    # origin always may. "*" lets any web page in (and drive the server from a visitor's browser).
    allowed_origins: list[str] = Field(default_factory=list)

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            # An empty value (an unset environment variable in a template) must not quietly
            # mean "no authentication".
            raise ValueError("the token is empty: give one, or leave it out to run without a token")
        return v
    media_dir: str | None = None  # API-added file sources must live under this directory
    allowed_schemes: list[str] = Field(
        default_factory=lambda: ["rtsp", "rtsps", "rtmp", "http", "https", "file", "webcam", "demo"]
    )
    log_json: bool = False
    # permessage-deflate on websockets: JPEG/PNG payloads do not compress, and deflating a
    # raw label map per frame costs more CPU than the engine; opt in for slow links only.
    ws_compression: bool = False
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # The same message (template, logger, stream) passes `log_burst` times per window, then is held back.
    log_rate_limit_s: float = Field(60.0, ge=0)  # 0 = no rate limiting
    log_burst: int = Field(5, ge=1)
    metrics: bool = True  # serve /metrics
    shutdown_timeout_s: float = Field(5.0, gt=0, le=300)


class AppConfig(_Strict):
    default_model: str = "selfie"
    server: ServerConfig = ServerConfig()
    engine: EngineConfig = EngineConfig()
    limits: LimitsConfig = LimitsConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    streams: list[StreamConfig] = Field(default_factory=list)
    weights: dict[str, str] = Field(default_factory=dict)  # model name -> weights file

    @field_validator("streams")
    @classmethod
    def _unique_ids(cls, streams: list[StreamConfig]) -> list[StreamConfig]:
        ids = [s.id for s in streams if s.id]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate stream ids: {', '.join(dupes)}")
        return streams


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the bad key."""


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        # TOML is UTF-8 only; the codec's own message would not name the file.
        bad = e.object[e.start]
        raise ConfigError(f"{p}: not valid UTF-8 (byte 0x{bad:02x} at offset {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def build_config(data: dict) -> AppConfig:
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration: {format_validation_error(e)}") from None
