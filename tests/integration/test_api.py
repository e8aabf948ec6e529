"""REST API against a real uvicorn: stream lifecycle, validation messages, auth, docs."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline.config import AppConfig, EngineConfig, ServerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_stream_lifecycle_and_models(live_server, null_config) -> None:
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.get("/api/streams").json() == []
        r = http.post("/api/streams", json={"source": "demo", "id": "cam", "temporal": "smooth"})
        assert r.status_code == 201 and r.headers["location"] == "/api/streams/cam"
        info = r.json()
        assert (info["id"], info["model"], info["temporal"], info["kind"]) == (
            "cam",
            "null",
            "smooth",
            "demo",
        )
        for key in ("state", "error", "fps", "latency_ms", "drops", "clients"):
            assert key in info
        assert [s["id"] for s in http.get("/api/streams").json()] == ["cam"]
        r = http.patch("/api/streams/cam", json={"temporal": "off"})
        assert r.status_code == 200 and r.json()["temporal"] == "off"
        # each threshold is in range, but not together: a 400 that says why, the stream untouched
        bad = {"temporal": {"mode": "smooth", "motion_low": 0.5, "motion_high": 0.1}}
        r = http.patch("/api/streams/cam", json=bad)
        assert r.status_code == 400 and "motion_high must be above motion_low" in r.json()["detail"], r.text
        assert http.get("/api/streams/cam").json()["temporal"] == "off"
        models = {m["name"]: m for m in http.get("/api/models").json()}
        assert models["null"]["default"] and models["null"]["classes"] == ["background", "person"]
        assert len(models["null"]["colours"]) == 2
        assert http.delete("/api/streams/cam").status_code == 204
        assert http.get("/api/streams/cam").status_code == 404
        assert http.get("/docs").status_code == 200
        assert "/api/streams" in http.get("/openapi.json").json()["paths"]
        assert http.get("/").headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({}, 422, "source"),
        ({"source": ""}, 422, "source"),
        ({"source": "demo", "id": "bad id!"}, 422, "id"),
        ({"source": "demo", "colour": "red"}, 422, "colour"),
        ({"source": "demo", "model": "nope"}, 400, "unknown model 'nope'"),
        ({"source": "gopher://x"}, 400, "unsupported source scheme"),
        ({"source": "demo", "temporal": "sometimes"}, 422, "temporal"),
    ],
)
def test_invalid_post_bodies_get_clear_4xx(live_server, null_config, body, status, needle) -> None:
    srv = live_server(null_config)
    r = httpx.post(f"{srv.url}/api/streams", json=body, timeout=10)
    assert r.status_code == status, r.text
    assert needle in r.text
    # the server keeps serving
    assert httpx.post(f"{srv.url}/api/streams", json={"source": "demo"}, timeout=10).status_code == 201


def test_duplicate_and_unknown_ids(live_server, null_config) -> None:
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "a"}).status_code == 201
        r = http.post("/api/streams", json={"source": "demo", "id": "a"})
        assert r.status_code == 409 and "already exists" in r.json()["detail"]
        for method in ("GET", "PATCH", "DELETE"):
            r = http.request(method, "/api/streams/zz", json={} if method == "PATCH" else None)
            assert r.status_code == 404 and "unknown stream 'zz'" in r.json()["detail"], method
        r = http.post("/api/streams", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = http.post("/api/streams", content=b"x" * 100_000, headers={"content-type": "application/json"})
        assert r.status_code == 413


async def test_token_guards_rest_and_websockets(live_server) -> None:
    config = AppConfig(
        default_model="null",
        server=ServerConfig(token="s3cret"),
        engine=EngineConfig(threads=1, encode_workers=1),
    )
    srv = live_server(config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = http.get("/api/streams", headers=headers)
            assert r.status_code == 401 and "token" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert http.post("/api/streams", json={"source": "demo", "id": "d"}, headers=good).status_code == 201
        assert http.get("/api/streams?token=s3cret").status_code == 200
        assert http.get("/").status_code == 200  # the viewer page itself asks for the token
        # /docs can send the token: the scheme is declared, and every /api route requires it
        spec = http.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert spec["paths"]["/api/streams"]["post"]["security"] == [{"HTTPBearer": []}]
    for url in (srv.stream_ws("d"), srv.stream_ws("d", token="wrong"), srv.stream_ws("nope")):
        async with connect(url, open_timeout=5) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 4401 and "token" in ws.close_reason
    async with connect(srv.stream_ws("d", format="rle", token="s3cret"), open_timeout=5) as ws:
        assert isinstance(await asyncio.wait_for(ws.recv(), 5), bytes)
    async with connect(
        srv.stream_ws("d", format="rle"),
        additional_headers={"Authorization": "Bearer s3cret"},
        open_timeout=5,
    ) as ws:
        assert isinstance(await asyncio.wait_for(ws.recv(), 5), bytes)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"source": "demo", "temporal": {"mode": "smooth", "blend": NaN}}', "blend"),
        (b'{"source": "demo", "options": {"target_fps": Infinity}}', "target_fps"),
        (b'{"source": "demo", "roi": {"enabled": true, "margin": 1e308}}', "margin"),
        (b'{"source": "demo", "id": ".."}', "id"),
    ],
)
def test_non_finite_absurd_or_unusable_values_are_a_422(live_server, null_config, body, field) -> None:
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        r = http.post("/api/streams", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert any(field in e["loc"] for e in r.json()["detail"])
        assert http.post("/api/streams", json={"source": "demo", "id": "cam"}).status_code == 201
        patch = body.replace(b'"source": "demo", ', b"").replace(b'"id": ".."', b'"temporal": "off"')
        if field != "id" and b"options" not in patch:
            r = http.patch("/api/streams/cam", content=patch, headers={"content-type": "application/json"})
            assert r.status_code == 422, r.text


async def test_adding_and_removing_one_id_at_once_never_fails(live_server, null_config) -> None:
    """A DELETE that lands while the same stream is being added (or just after) gets 204 or
    404, the POST 201 or 409: never a 500, and no stream is left behind."""
    srv = live_server(null_config)
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        seen: set[tuple[int, int]] = set()
        for _ in range(20):
            post, delete = await asyncio.gather(
                http.post("/api/streams", json={"source": "demo", "id": "race"}),
                http.delete("/api/streams/race"),
            )
            assert post.status_code in (201, 409), post.text
            assert delete.status_code in (204, 404), delete.text
            seen.add((post.status_code, delete.status_code))
            await http.delete("/api/streams/race")
        assert (await http.get("/api/streams")).json() == []
        assert any(p == 201 for p, _ in seen)


def test_patch_with_an_object_changes_only_the_fields_it_names(live_server, null_config) -> None:
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "cam"}).status_code == 201
        http.patch("/api/streams/cam", json={"roi": True, "temporal": "smooth"})
        r = http.patch("/api/streams/cam", json={"roi": {"full_every": 3}, "temporal": {"blend": 0.3}})
        assert r.status_code == 200, r.text
        info = http.get("/api/streams/cam").json()
        assert set(info["drops"]) == {"source_overrun", "engine_busy", "client_slow", "stale", "error"}
        assert info["temporal"] == "smooth" and info["temporal_settings"]["blend"] == 0.3, info
        assert info["roi"] is True and info["roi_settings"]["full_every"] == 3, info
        r = http.patch("/api/streams/cam", json={"temporal": {"motion_high": 0.01}})  # below motion_low
        assert r.status_code == 400 and "motion_high" in r.text


async def test_websockets_from_another_sites_page_are_refused(live_server, null_config) -> None:
    """Browsers apply no CORS to websockets: the server checks the Origin itself. The page's
    own origin and configured ones may connect, clients that send none (programs) too."""
    server = null_config.server.model_copy(update={"allowed_origins": ["http://good.example"]})
    srv = live_server(null_config.model_copy(update={"server": server}))
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "d"}).status_code == 201
        preflight = http.options(
            "/api/streams",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
    host = srv.url.removeprefix("http://")
    ingest = srv.url.replace("http://", "ws://") + "/ws/ingest"
    for url in (srv.stream_ws("d", format="rle"), ingest):
        async with connect(url, origin="http://evil.example", open_timeout=5) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 4403 and "origin" in ws.close_reason
    for origin in (None, f"http://{host}", "http://good.example"):
        async with connect(srv.stream_ws("d", format="rle"), origin=origin, open_timeout=5) as ws:
            assert isinstance(await asyncio.wait_for(ws.recv(), 5), bytes), origin
    # behind a proxy that rewrites Host: the public host it forwards
    async with connect(
        srv.stream_ws("d", format="rle"),
        origin="https://cams.example",
        additional_headers={"X-Forwarded-Host": "cams.example"},
        open_timeout=5,
    ) as ws:
        assert isinstance(await asyncio.wait_for(ws.recv(), 5), bytes)


def test_oversized_request_headers_are_refused(live_server, null_config) -> None:
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.get("/healthz", headers={"X-Filler": "a" * 8000}).status_code == 200
        try:
            r = http.get("/healthz", headers={"X-Filler": "a" * 200_000})
            refused = r.status_code == 400
        except httpx.HTTPError:
            refused = True  # closed while the client was still sending: a reset
        assert refused
        assert http.get("/healthz").status_code == 200  # and goes on serving


def test_a_taken_id_is_a_409_even_at_the_stream_limit(live_server, null_config) -> None:
    limits = null_config.limits.model_copy(update={"max_streams": 1})
    srv = live_server(null_config.model_copy(update={"limits": limits}))
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "a"}).status_code == 201
        assert http.post("/api/streams", json={"source": "demo", "id": "a"}).status_code == 409
        assert http.post("/api/streams", json={"source": "demo", "id": "b"}).status_code == 429


def test_a_refused_token_is_logged_without_the_token(live_server, caplog) -> None:
    engine = EngineConfig(threads=1, encode_workers=1)
    config = AppConfig(default_model="null", server=ServerConfig(token="s3cret"), engine=engine)
    srv = live_server(config)
    with caplog.at_level("WARNING", logger="segstream.auth"):
        assert httpx.get(f"{srv.url}/api/streams?token=guess1", timeout=5).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "segstream.auth"]
    assert any("refused /api/streams from 127.0.0.1: missing or wrong token" in line for line in lines), lines
    assert not any("guess1" in line for line in lines)


def _raw(url: str, request: str) -> bytes:
    """Everything the server sends back for one raw HTTP/1.1 request (connection closed after)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(request.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_head_is_answered_like_get_without_a_body(live_server, null_config) -> None:
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "d"}).status_code == 201
        for path, status in [("/healthz", 200), ("/api/models", 200), ("/api/streams/d", 200), ("/", 200),
                             ("/static/app.js", 200), ("/metrics", 200), ("/api/streams/nope", 404)]:
            raw = _raw(srv.url, f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), (path, head[:80])
            assert rest == b"", (path, rest[:80])  # headers only
            got = http.get(path)
            assert got.status_code == status
            if path not in ("/metrics", "/api/streams/d"):  # live numbers change between two requests
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                assert length and int(length.group(1)) == len(got.content), path
        # one keep-alive connection: a HEAD leaves nothing behind for the next request to trip on
        assert http.head("/api/streams").status_code == 200
        assert http.get("/api/streams").json()[0]["id"] == "d"
        # an MJPEG response never ends: there are no final headers to give
        assert http.head("/api/streams/d/mjpeg").status_code == 405


def test_head_refuses_only_the_mjpeg_route_not_other_paths_ending_in_mjpeg(live_server, null_config) -> None:
    # "mjpeg" is a valid stream id; its GET /api/streams/mjpeg is a finite answer like any other
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "mjpeg"}).status_code == 201
        paths = ("/api/streams/mjpeg", "/api/models/mjpeg", "/static/mjpeg", "/api/streams/mjpeg/snapshot")
        for path in paths:
            assert http.head(path).status_code == http.get(path).status_code, path
        assert http.head("/api/streams/mjpeg/mjpeg").status_code == 405


def test_a_405_names_head_beside_get(live_server, null_config) -> None:
    srv = live_server(null_config)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "d"}).status_code == 201
        r = http.put("/healthz")
        assert r.status_code == 405 and [m.strip() for m in r.headers["allow"].split(",")] == ["GET", "HEAD"]
        r = http.put("/api/streams/d")
        assert r.status_code == 405 and {"GET", "HEAD"} <= {m.strip() for m in r.headers["allow"].split(",")}
        r = http.post("/api/streams/d/mjpeg")  # no HEAD on the endless MJPEG route
        assert r.status_code == 405 and "HEAD" not in r.headers["allow"]


def test_a_405_lists_every_method_the_path_takes(live_server, null_config) -> None:
    """Not only the methods of the first route that matched the path: a client told which
    methods it may use must not be sent away from PATCH and DELETE."""
    srv = live_server(null_config)

    def allow(r: httpx.Response) -> list[str]:
        assert r.status_code == 405, r.text
        return [m.strip() for m in r.headers["allow"].split(",")]

    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.post("/api/streams", json={"source": "demo", "id": "d"}).status_code == 201
        assert allow(http.put("/api/streams/d")) == ["GET", "HEAD", "PATCH", "DELETE"]
        assert allow(http.post("/api/streams/d")) == ["GET", "HEAD", "PATCH", "DELETE"]
        assert allow(http.put("/api/streams/nope")) == ["GET", "HEAD", "PATCH", "DELETE"]
        assert allow(http.delete("/api/streams")) == ["GET", "HEAD", "POST"]
        assert allow(http.delete("/api/models/null")) == ["GET", "HEAD"]
        # every method named is one the path takes
        for method in ("GET", "HEAD", "PATCH"):
            r = http.request(method, "/api/streams/d", json={} if method == "PATCH" else None)
            assert r.status_code == 200, (method, r.status_code)
        assert http.delete("/api/streams/d").status_code == 204
