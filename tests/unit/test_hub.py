"""The hub: encode only what clients want, latest-wins per client, slow clients counted."""

import asyncio
import json
import struct

import numpy as np

from pipeline.render import Format
from pipeline.types import Frame, SegmentationResult, now
from server.hub import Hub


def result(i: int, sid: str = "s") -> SegmentationResult:
    img = np.full((8, 10, 3), 100, np.uint8)
    labels = np.zeros((8, 10), np.uint8)
    labels[2:6, 3:7] = 1
    f = Frame(stream_id=sid, index=i, pts=i / 30, captured_at=now(), image=img)
    return SegmentationResult(
        frame=f,
        labels=labels,
        classes=("background", "person"),
        model="m",
        latency_ms={"infer": 1.0},
        segmented_at=now(),
    )


def unpack(data: bytes):
    (n,) = struct.unpack(">I", data[:4])
    return json.loads(data[4 : 4 + n]), data[4 + n :]


async def wait_for(pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_nothing_is_encoded_without_clients():
    hub = Hub(workers=1)
    hub.publish(result(0), {})
    await asyncio.sleep(0.05)
    assert hub.encoded == 0
    hub.shutdown()


async def test_each_client_gets_its_format_and_header():
    hub = Hub(workers=2)
    a = hub.subscribe("s", fmt=Format.RAW, max_fps=None, quality=80)
    b = hub.subscribe("s", fmt=Format.RLE, max_fps=None, quality=80)
    hub.publish(result(3), {"stale": 2})
    ma, mb = await asyncio.wait_for(a.next(), 5), await asyncio.wait_for(b.next(), 5)
    ha, pa = unpack(hub.finalize(a, ma))
    hb, pb = unpack(hub.finalize(b, mb))
    assert ha["format"] == "raw" and len(pa) == 80 and ha["frame"] == 3 and ha["v"] == 1
    assert hb["format"] == "rle" and pb == b"" and hb["rle"][0]["class"] == 1
    for h in (ha, hb):
        assert h["dropped"] == {"stale": 2, "client_slow": 0}
        assert h["sent_at"] >= h["captured_at"]
        assert {"infer", "encode", "send", "total"} <= set(h["latency_ms"])
    hub.shutdown()


async def test_a_slow_client_loses_old_messages_not_new_ones():
    hub = Hub(workers=1)
    slow = hub.subscribe("s", fmt=Format.RAW, max_fps=None, quality=80)
    for i in range(5):
        hub.publish(result(i), {})
        await wait_for(lambda i=i: slow.pending is not None and slow.pending.header["frame"] == i)
    msg = await asyncio.wait_for(slow.next(), 5)
    header, _ = unpack(hub.finalize(slow, msg))
    assert header["frame"] == 4  # latest wins
    assert header["dropped"]["client_slow"] == 4
    hub.shutdown()


async def test_max_fps_skips_results_before_encoding():
    hub = Hub(workers=1)
    c = hub.subscribe("s", fmt=Format.OVERLAY, max_fps=1.0, quality=50)
    for i in range(5):
        hub.publish(result(i), {})
        await asyncio.sleep(0.01)
    await wait_for(lambda: c.pending is not None)
    await asyncio.sleep(0.05)
    assert hub.encoded == 1  # at most one result per second is even encoded for this client
    hub.shutdown()


async def test_status_messages_mark_stale_and_close_ends_iteration():
    hub = Hub(workers=1)
    c = hub.subscribe("s", fmt=Format.RAW, max_fps=None, quality=80)
    hub.publish_status("s", {"state": "reconnecting", "error": "connection refused"})
    header, payload = unpack(hub.finalize(c, await asyncio.wait_for(c.next(), 5)))
    assert header["type"] == "status" and header["stale"] is True and header["error"] == "connection refused"
    hub.close_stream("s")
    assert await asyncio.wait_for(c.next(), 5) is None
    hub.shutdown()


async def test_client_queue_holds_that_many_messages_before_dropping_the_oldest():
    hub = Hub(workers=1, client_queue=3)
    c = hub.subscribe("s", fmt=Format.RAW, max_fps=None, quality=80)
    for i in range(5):
        hub.publish(result(i), {})
        await wait_for(lambda i=i: c.pending is not None and c.pending.header["frame"] == i)
    frames = [unpack(hub.finalize(c, await asyncio.wait_for(c.next(), 5)))[0]["frame"] for _ in range(3)]
    assert frames == [2, 3, 4] and c.dropped_slow == 2
    hub.shutdown()
