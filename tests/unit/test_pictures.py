"""The MJPEG response's own disconnect watch, under the newer ASGI HTTP spec (2.4), where
Starlette no longer listens for the client leaving and only a failed send would tell."""

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest

from pipeline.render import Format
from server.hub import Hub
from server.pictures import _parts, _Subscribed


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_client_leaving_while_no_frame_comes_ends_the_response(spec_version) -> None:
    hub = Hub(workers=1)
    try:
        client = hub.subscribe("cam", fmt=Format.OVERLAY, max_fps=None, quality=80)
        response = _Subscribed(_parts(client), hub, client, media_type="multipart/x-mixed-replace")
        left = asyncio.Event()
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict:
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
        task = asyncio.create_task(response(scope, receive, send))
        await asyncio.sleep(0.2)
        assert not task.done() and hub.client_count("cam") == 1  # waiting for a frame
        left.set()
        await asyncio.wait_for(task, 2)  # no frame ever came, yet the response ended
        assert hub.client_count("cam") == 0
        assert client.closed
    finally:
        hub.shutdown()
