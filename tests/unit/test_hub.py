"""The hub: encode only what clients want, latest-wins per client, slow clients counted."""

import asyncio
import dataclasses
import json
import struct

import numpy as np
import pytest

from pipeline.render import Format
from pipeline.types import Frame, SegmentationResult, now
from server.hub import Client, Hub


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
        # every cause is listed, 0 when it never happened
        assert h["dropped"] == {
            "stale": 2, "client_slow": 0, "source_overrun": 0, "engine_busy": 0, "error": 0
        }
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


def test_headers_never_carry_nan_or_infinity():
    from server.hub import pack_message

    header = {
        "pts": float("nan"),
        "captured_at": float("inf"),
        "latency_ms": {"total": float("-inf"), "infer": 1.5},
        "info": {"roi": {"boxes": [[0.0, float("nan")]]}},
        "frame": 3,
    }
    msg = pack_message(header)
    (n,) = struct.unpack(">I", msg[:4])
    text = msg[4 : 4 + n].decode("utf-8")
    for word in ("NaN", "Infinity"):
        assert word not in text
    decoded = json.loads(text)
    assert decoded["pts"] is None and decoded["captured_at"] is None
    assert decoded["latency_ms"] == {"total": None, "infer": 1.5}
    assert decoded["info"]["roi"]["boxes"] == [[0.0, None]]


async def test_a_result_with_a_nan_pts_is_sent_with_a_null_pts():
    hub = Hub(workers=1)
    c = hub.subscribe("s", fmt=Format.RLE, max_fps=None, quality=80)
    r = result(1)
    r = dataclasses.replace(r, frame=dataclasses.replace(r.frame, pts=float("nan"), captured_at=float("inf")))
    hub.publish(r, {})
    header, _ = unpack(hub.finalize(c, await asyncio.wait_for(c.next(), 5)))
    assert header["pts"] is None and header["captured_at"] is None
    assert header["latency_ms"].get("total") is None
    hub.shutdown()


async def test_closing_event_is_set_when_the_stream_closes_or_the_hub_shuts_down():
    hub = Hub(workers=1)
    a = hub.closing("a")
    b = hub.closing("b")
    gone = hub.closing("c")
    hub.forget_closing("c", gone)
    hub.close_stream("a")
    await asyncio.wait_for(a.wait(), 5)
    assert not b.is_set()
    hub.close_stream("c")
    await asyncio.sleep(0.01)
    assert not gone.is_set()
    hub.shutdown()
    await asyncio.wait_for(b.wait(), 5)


def marked(i: int) -> SegmentationResult:
    r = result(i)
    return dataclasses.replace(r, frame=dataclasses.replace(r.frame, discontinuity=True))


async def test_a_discontinuity_skipped_by_a_clients_rate_limit_marks_its_next_result():
    hub = Hub(workers=1)
    limited = hub.subscribe("s", fmt=Format.RLE, max_fps=1.0, quality=80)
    hub.publish(result(0), {})  # accepted: the client's first
    header, _ = unpack(hub.finalize(limited, await asyncio.wait_for(limited.next(), 5)))
    assert header["frame"] == 0 and not header["discontinuity"]
    hub.publish(marked(1), {})  # within 1 s of the last one: skipped for this client
    await asyncio.sleep(0.05)
    assert limited.pending is None
    limited.update(max_fps=None)
    hub.publish(result(2), {})
    header, _ = unpack(hub.finalize(limited, await asyncio.wait_for(limited.next(), 5)))
    assert header["frame"] == 2 and header["discontinuity"]  # the reconnect is not missed
    hub.publish(result(3), {})
    header, _ = unpack(hub.finalize(limited, await asyncio.wait_for(limited.next(), 5)))
    assert not header["discontinuity"]  # once only
    hub.shutdown()


async def test_a_discontinuity_dropped_from_a_slow_clients_queue_marks_the_newer_result():
    hub = Hub(workers=1)
    slow = hub.subscribe("s", fmt=Format.RLE, max_fps=None, quality=80)
    hub.publish(marked(0), {})
    await wait_for(lambda: slow.pending is not None and slow.pending.header["frame"] == 0)
    hub.publish(result(1), {})  # replaces the unsent marked result (latest wins)
    await wait_for(lambda: slow.pending is not None and slow.pending.header["frame"] == 1)
    header, _ = unpack(hub.finalize(slow, await asyncio.wait_for(slow.next(), 5)))
    assert header["frame"] == 1 and header["discontinuity"] and header["dropped"]["client_slow"] == 1
    hub.shutdown()


@pytest.mark.parametrize(
    ("stream_fps", "max_fps", "jitter"), [(25, 25, 0.015), (25, 20, 0.01), (25, 1, 0.01), (30, 12, 0.0)]
)
def test_max_fps_gives_the_rate_asked_for(stream_fps: int, max_fps: float, jitter: float) -> None:
    """The client's rate on average from a faster or equal stream, despite capture-time
    jitter, and never more than max_fps + 2 in any second."""
    loop = asyncio.new_event_loop()
    client = Client(id=1, stream_id="s", fmt=Format.RLE, max_fps=max_fps, quality=80, loop=loop)
    loop.close()
    rng = np.random.default_rng(0)
    seconds = 20
    times = [i / stream_fps + rng.uniform(-jitter, jitter) for i in range(seconds * stream_fps)]
    taken = [t for t in times if client.wants(t)]
    expected = min(stream_fps, max_fps) * seconds
    assert abs(len(taken) - expected) <= 1 + 0.01 * expected, (len(taken), expected)
    for t in taken:
        in_window = sum(1 for u in taken if t <= u < t + 1.0)
        assert in_window <= max_fps + 2


def _status(state: str) -> dict:
    return {"state": state, "error": None, "width": 10, "height": 8}


async def test_a_status_is_never_dropped_for_a_result_and_the_end_is_said_last():
    """A client that is not reading still learns the newest state; when a stream ends while
    its last results are on their way, the end comes again after them."""
    hub = Hub(workers=1)
    c = hub.subscribe("s", fmt=Format.RLE, max_fps=None, quality=80)
    hub.publish_status("s", _status("reconnecting"))
    hub.publish_status("s", _status("streaming"))  # replaces the older status still queued
    hub.publish(result(0), {})
    await wait_for(lambda: c.sent == 0 and len(c.queue) == 2)
    hub.publish_status("s", _status("stopped"))  # the source ended; frame 1 is still in flight
    hub.publish(result(1), {})
    await wait_for(lambda: any(m.header.get("frame") == 1 for m in c.queue))
    await asyncio.sleep(0.05)
    kinds = [(m.header["type"], m.header.get("state") or m.header.get("frame")) for m in c.queue]
    # frame 0 gave way to frame 1 (one result held); "stopped" replaced "streaming" and comes
    # again after frame 1, replacing its earlier copy
    assert kinds == [("result", 1), ("status", "stopped")], kinds
    assert c.dropped_slow == 1
    hub.shutdown()
