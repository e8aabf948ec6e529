"""The request-body limit holds for declared and for chunked (undeclared) bodies."""

import httpx
from fastapi import FastAPI, Request
from pydantic import BaseModel

from server.limits import BodySizeLimit


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    class Body(BaseModel):
        text: str

    @app.post("/model")
    async def model(body: Body) -> dict:  # FastAPI parses the body: its own errors become 400s
        return {"n": len(body.text)}

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



async def test_chunked_body_over_the_limit_is_413_where_the_framework_parses_the_body():
    async def chunks(n):
        yield b'{"text": "'
        for _ in range(n):
            yield b"z" * 300
        yield b'"}'

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://t") as c:
        headers = {"content-type": "application/json"}
        r = await c.post("/model", content=chunks(10), headers=headers)
        assert r.status_code == 413, r.text
        r = await c.post("/model", content=chunks(2), headers=headers)  # a chunked body that fits
        assert r.status_code == 200 and r.json() == {"n": 600}
