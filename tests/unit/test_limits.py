"""The request-body limit holds for declared and for chunked (undeclared) bodies."""

import httpx
from fastapi import FastAPI, Request

from server.limits import BodySizeLimit


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    app.add_middleware(BodySizeLimit, limit=1000)
    return app


async def test_small_body_passes_and_large_declared_body_is_413():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://t") as c:
        assert (await c.post("/echo", content=b"x" * 1000)).json() == {"n": 1000}
        r = await c.post("/echo", content=b"x" * 1001)
        assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]


async def test_chunked_body_without_length_is_counted():
    async def chunks():
        for _ in range(10):
            yield b"y" * 300

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://t") as c:
        r = await c.post("/echo", content=chunks())
        assert r.status_code == 413
