"""Fuzzing: the REST API against its own OpenAPI spec (schemathesis) and websocket control
messages (hypothesis). Nothing may answer 5xx, crash, or leave a connection unusable."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import AppConfig, EngineConfig, LimitsConfig, StreamConfig
from server.ws import ParamError, parse_settings
from tests.integration.conftest import LiveServer, start_server

schemathesis = pytest.importorskip("schemathesis")
from websockets.sync.client import connect  # noqa: E402

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
    database=None,
)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    cfg = AppConfig(
        default_model="null",
        engine=EngineConfig(threads=1, encode_workers=1),
        limits=LimitsConfig(max_streams=4),
        # Fuzzed sources are refused (unknown schemes) or connect to nothing; keep the allow-list
        # to sources that cannot reach the network or devices.
        server={"allowed_schemes": ["demo"]},
        streams=[StreamConfig(id="cam", source="demo")],
    )
    srv = start_server(cfg)
    yield srv
    srv.stop()
    assert not srv.errors, srv.errors


@pytest.fixture(scope="module")
def api_schema(server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


# Valid requests (positive) and requests that break the schema on purpose (negative):
# the first must be handled, the second refused with a 4xx, never a 5xx.
@pytest.mark.parametrize("mode", ["positive", "negative"])
@given(data=st.data())
@FUZZ
def test_api_never_answers_5xx(api_schema: Any, server: LiveServer, mode: str, data: st.DataObject) -> None:
    from schemathesis import GenerationMode

    case = data.draw(api_schema.as_strategy(generation_mode=GenerationMode(mode)))
    response = case.call(base_url=server.url, timeout=15)
    assert response.status_code < 500, (
        f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    )


def test_server_is_still_healthy_after_fuzzing(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    r = httpx.get(f"{server.url}/readyz", timeout=5)
    assert r.status_code == 200, r.text


# -- websocket control messages ----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(["format", "max_fps", "quality", "token", "type", "fmt", ""]) | st.text(max_size=10)
control_objects = st.dictionaries(keys, json_values, max_size=4)


@given(control_objects)
@settings(max_examples=150, deadline=None, database=None)
def test_parse_settings_accepts_or_raises_param_error_only(values: dict[str, Any]) -> None:
    try:
        out = parse_settings(values, partial=True)
    except ParamError as e:
        assert str(e)
        return
    assert set(out) <= {"fmt", "max_fps", "quality"}
    if out.get("max_fps") is not None:
        assert 0 < out["max_fps"] <= 240
    if "quality" in out:
        assert 1 <= out["quality"] <= 100


@pytest.fixture(scope="module")
def ws(server: LiveServer) -> Iterator[Any]:
    with connect(
        f"{server.ws_url}/ws/streams/cam?format=rle&max_fps=2", open_timeout=10, close_timeout=2
    ) as c:
        yield c


def _reply(ws: Any) -> dict[str, Any]:
    """The next text message (results and status messages in between are skipped)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = ws.recv(timeout=10)
        if isinstance(msg, str):
            return json.loads(msg)
    raise AssertionError("no reply to a control message within 10 s")


messages = (
    control_objects.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text(max_size=200)
    | st.binary(max_size=64)
)


@given(messages)
@FUZZ
def test_websocket_control_messages_get_an_answer_and_the_connection_stays_usable(
    ws: Any, message: Any
) -> None:
    ws.send(message)
    reply = _reply(ws)
    assert reply["type"] in {"settings", "error"}, reply
    if reply["type"] == "error":
        assert reply["error"]


def test_websocket_still_delivers_after_fuzzing(ws: Any) -> None:
    ws.send(json.dumps({"format": "rle", "max_fps": 0, "quality": 80}))
    assert _reply(ws)["type"] == "settings"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = ws.recv(timeout=10)
        if isinstance(msg, bytes):
            header = json.loads(msg[4 : 4 + int.from_bytes(msg[:4], "big")])
            if header["type"] == "result":
                assert header["stream"] == "cam"
                return
    raise AssertionError("no result after fuzzing")
