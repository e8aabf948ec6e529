"""The one bridge from pipeline threads to asyncio, and per-client latest-wins delivery.

The engine thread hands every result to :meth:`Hub.publish`. The hub encodes only the
formats some connected client wants (in a worker pool, never on the event loop, at
most one encode in flight per stream: newer results replace a waiting one), then
offers the message to each client's single-slot mailbox on the event loop. A client
whose previous message has not been sent yet loses the older one (``client_slow``), so
a slow client never holds up the stream or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any

from pipeline.render import Format, render
from pipeline.types import DropCause, SegmentationResult, StreamState, every_cause, now

log = logging.getLogger("segstream.hub")

PROTOCOL_VERSION = 1


def json_finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    return value


def pack_message(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Protocol v1: uint32 big-endian header length, UTF-8 JSON header, payload.

    The header is strict JSON: a NaN or infinite number (which browsers' ``JSON.parse``
    rejects) goes out as null."""
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(json_finite(header), separators=(",", ":"), allow_nan=False)
    h = text.encode("utf-8")
    return struct.pack(">I", len(h)) + h + payload


@dataclass
class Outgoing:
    header: dict[str, Any]
    payload: bytes
    ready_at: float  # when encoding finished (perf_counter seconds)


@dataclass
class Client:
    """One websocket subscriber. Mutated only on the event loop (settings under ``lock``)."""

    id: int
    stream_id: str
    fmt: Format
    max_fps: float | None
    quality: int
    loop: asyncio.AbstractEventLoop
    capacity: int = 1  # messages held for this client before the oldest is dropped (limits.client_queue)
    queue: deque[Outgoing] = field(default_factory=deque)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set by close()
    dropped_slow: int = 0
    sent: int = 0
    # max_fps: the time the next result is due (virtual scheduling; see ``wants``)
    due: float = -math.inf
    # A result marked ``discontinuity`` was skipped for this client (its rate limit): the next
    # result it gets carries the mark, so it never carries state across a reconnect.
    missed_discontinuity: bool = False
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_slow: Callable[[], None] | None = None  # also counts the skip in the stream's drop counters

    def wants(self, t: float) -> bool:
        """Rate limit: accept a result captured at ``t`` (seconds) if max_fps allows it, and
        count it as accepted.

        Results are booked on a schedule one interval (1 / max_fps) apart and are taken up
        to half an interval before their slot, so max_fps pass on average (at most two more
        in any one second), while a stream at the client's rate loses no frame to jitter, and a
        25 fps stream gives a 20 fps client four frames in five (not one in two, as a plain
        minimum gap would). Capture times are used, not delivery times: frames batched
        together or a busy encoder do not bunch them. The schedule restarts after a pause
        (or a clock step back).
        """
        with self.lock:
            if self.max_fps is None:
                return True
            interval = 1.0 / self.max_fps
            if self.due - 2 * interval <= t < self.due - 0.5 * interval:
                return False
            late = t >= self.due + interval or t < self.due - 2 * interval
            self.due = (t if late else self.due) + interval
            return True

    def settings(self) -> tuple[Format, int]:
        with self.lock:
            return self.fmt, self.quality

    def update(self, *, fmt: Format | None = None, max_fps: float | None = -1.0, quality: int | None = None):
        with self.lock:
            if fmt is not None:
                self.fmt = fmt
            if max_fps is None or max_fps >= 0:
                if max_fps != self.max_fps:
                    self.due = -math.inf  # the new rate starts now
                self.max_fps = max_fps
            if quality is not None:
                self.quality = quality

    @property
    def pending(self) -> Outgoing | None:
        """The newest message not sent yet, if any."""
        return self.queue[-1] if self.queue else None

    def offer(self, msg: Outgoing) -> None:
        """Event loop only: queue a message. Results are held up to ``capacity``; when full,
        the oldest unsent result is dropped (counted). A status is never dropped for a
        result: it replaces any older status still queued (the newest state is what counts)."""
        if self.closed:
            return
        if msg.header.get("type") == "status":
            if any(m.header.get("type") == "status" for m in self.queue):
                self.queue = deque(m for m in self.queue if m.header.get("type") != "status")
        else:
            results = [m for m in self.queue if m.header.get("type") == "result"]
            while len(results) >= self.capacity:
                old = results.pop(0)
                self.queue = deque(m for m in self.queue if m is not old)
                self.dropped_slow += 1
                if self.on_slow is not None:
                    self.on_slow()
                if old.header.get("discontinuity"):
                    msg.header["discontinuity"] = True  # the mark outlives the skipped result
        self.queue.append(msg)
        self.event.set()

    async def next(self) -> Outgoing | None:
        """Wait for the next message (None once closed)."""
        while not self.closed:
            if self.queue:
                msg = self.queue.popleft()
                if not self.queue:
                    self.event.clear()
                return msg
            self.event.clear()
            await self.event.wait()
        return None

    def close(self) -> None:
        self.closed = True
        self.event.set()
        self.ended.set()


class _EncodeGate:
    """At most one encode in flight per stream; a newer result replaces a waiting one.

    A stream has a gate only while one of its results is being encoded (the hub's table of
    gates would otherwise keep one for every stream id ever served). Its fields change under
    the hub's lock."""

    def __init__(self) -> None:
        self.waiting: tuple[SegmentationResult, dict[str, int]] | None = None


class Hub:
    def __init__(
        self,
        *,
        workers: int,
        client_queue: int = 1,
        on_drop: Callable[[str, DropCause], None] | None = None,
    ) -> None:
        if client_queue < 1:
            raise ValueError(f"client_queue must be >= 1, got {client_queue}")
        self.client_queue = client_queue
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="render")
        self._clients: dict[str, dict[int, Client]] = {}
        self._lock = threading.Lock()
        self._ids = count(1)
        self._gates: dict[str, _EncodeGate] = {}
        self._on_drop = on_drop
        self._closed = False
        self._ended: dict[str, Outgoing] = {}  # stream id -> its terminal status message
        # Endpoints that are not subscribers (the camera ingest) but must learn when their
        # stream is closed: stream id -> [(loop, event)], set by close_stream and shutdown.
        self._closing: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self.encoded = 0

    # -- subscriptions (event loop) -------------------------------------------------
    def subscribe(self, stream_id: str, *, fmt: Format, max_fps: float | None, quality: int) -> Client:
        client = Client(
            id=next(self._ids),
            stream_id=stream_id,
            fmt=fmt,
            max_fps=max_fps,
            quality=quality,
            loop=asyncio.get_running_loop(),
            capacity=self.client_queue,
        )
        if self._on_drop is not None:
            on_drop = self._on_drop
            client.on_slow = lambda: on_drop(stream_id, DropCause.CLIENT_SLOW)
        with self._lock:
            self._clients.setdefault(stream_id, {})[client.id] = client
        return client

    def unsubscribe(self, client: Client) -> None:
        client.close()
        with self._lock:
            clients = self._clients.get(client.stream_id)
            if clients is not None:
                clients.pop(client.id, None)
                if not clients:
                    self._clients.pop(client.stream_id, None)

    def clients(self, stream_id: str) -> list[Client]:
        with self._lock:
            return list(self._clients.get(stream_id, {}).values())

    def client_count(self, stream_id: str) -> int:
        with self._lock:
            return len(self._clients.get(stream_id, {}))

    def close_stream(self, stream_id: str) -> None:
        """The stream was removed (or the server is going away): end every subscriber's
        iteration and set the stream's :meth:`closing` events."""
        for client in self.clients(stream_id):
            client.loop.call_soon_threadsafe(client.close)
        with self._lock:
            watchers = self._closing.pop(stream_id, [])
            self._ended.pop(stream_id, None)
        _set_all(watchers)

    def closing(self, stream_id: str) -> asyncio.Event:
        """Event loop only: an event set once :meth:`close_stream` is called for ``stream_id``
        or the hub shuts down. Pair with :meth:`forget_closing`."""
        event = asyncio.Event()
        with self._lock:
            if not self._closed:
                self._closing.setdefault(stream_id, []).append((asyncio.get_running_loop(), event))
        if self._closed:
            event.set()
        return event

    def forget_closing(self, stream_id: str, event: asyncio.Event) -> None:
        with self._lock:
            watchers = self._closing.get(stream_id, [])
            watchers[:] = [w for w in watchers if w[1] is not event]
            if not watchers:
                self._closing.pop(stream_id, None)

    # -- publishing (any thread) -------------------------------------------------------
    def publish(self, result: SegmentationResult, drops: dict[str, int]) -> None:
        if self._closed or not self.clients(result.frame.stream_id):
            return  # nobody listens: encode nothing
        sid = result.frame.stream_id
        queued = replaced = False
        with self._lock:
            gate = self._gates.get(sid)
            if gate is not None:  # an encode is in flight: wait behind it, replacing any waiting
                if gate.waiting is not None:
                    replaced = True
                    if gate.waiting[0].frame.discontinuity:
                        # the newer result takes the mark of the one it replaces
                        result = replace(result, frame=result.frame.marked())
                gate.waiting = (result, drops)
                queued = True
            else:
                gate = self._gates[sid] = _EncodeGate()
        if queued:
            if replaced and self._on_drop is not None:
                self._on_drop(sid, DropCause.ENGINE_BUSY)
            return
        try:
            self._pool.submit(self._encode_loop, sid, gate, result, drops)
        except RuntimeError:  # pool shut down during exit
            with self._lock:
                if self._gates.get(sid) is gate:
                    del self._gates[sid]

    def _encode_loop(
        self, sid: str, gate: _EncodeGate, result: SegmentationResult, drops: dict[str, int]
    ) -> None:
        item: tuple[SegmentationResult, dict[str, int]] | None = (result, drops)
        while item is not None:
            try:
                self._encode_one(*item)
            except Exception:
                log.exception("hub: encoding failed for stream %s", item[0].frame.stream_id)
            with self._lock:
                item, gate.waiting = gate.waiting, None
                if item is None and self._gates.get(sid) is gate:
                    del self._gates[sid]  # idle: the next result opens a new gate

    def _encode_one(self, result: SegmentationResult, drops: dict[str, int]) -> None:
        frame = result.frame
        targets = []
        for c in self.clients(frame.stream_id):
            if c.wants(frame.captured_at):
                targets.append(c)
            elif frame.discontinuity:
                with c.lock:
                    c.missed_discontinuity = True
        if not targets:
            return
        base = {
            "v": PROTOCOL_VERSION,
            "type": "result",
            "stream": frame.stream_id,
            "frame": frame.index,
            "pts": frame.pts,
            "captured_at": frame.captured_at,
            "segmented_at": result.segmented_at,
            "width": frame.width,
            "height": frame.height,
            "classes": list(result.classes),
            "model": result.model,
            "stale": False,
            "discontinuity": frame.discontinuity,
            "full_pass": result.full_pass,
        }
        if result.info:
            base["info"] = result.info
        encoded: dict[tuple[Format, int], tuple[dict[str, Any], bytes, float]] = {}
        for client in targets:
            fmt, quality = client.settings()
            key = (fmt, quality if fmt.uses_quality else 0)
            if key not in encoded:
                t0 = time.perf_counter()
                extra, payload = render(fmt, frame.image, result.labels, result.classes, quality=quality)
                encoded[key] = (extra, payload, (time.perf_counter() - t0) * 1000.0)
                with self._lock:  # several render threads count here
                    self.encoded += 1
            extra, payload, enc_ms = encoded[key]
            header = {
                **base,
                **extra,
                "format": fmt.value,
                "latency_ms": {**result.latency_ms, "encode": round(enc_ms, 3)},
                "dropped": every_cause(drops),
            }
            with client.lock:
                if client.missed_discontinuity:
                    header["discontinuity"] = True
                    client.missed_discontinuity = False
            msg = Outgoing(header=header, payload=payload, ready_at=time.perf_counter())
            client.loop.call_soon_threadsafe(client.offer, msg)
        with self._lock:
            ended = self._ended.get(frame.stream_id)
        if ended is not None:
            for client in targets:
                client.loop.call_soon_threadsafe(client.offer, ended)

    def publish_status(self, stream_id: str, status: dict[str, Any], *, only: Client | None = None) -> None:
        """A stream changed state: tell its clients (``stale`` while no fresh frames come)."""
        header = {
            "v": PROTOCOL_VERSION,
            "type": "status",
            "format": "status",
            "stream": stream_id,
            "frame": None,
            "captured_at": None,
            "width": status.get("width"),
            "height": status.get("height"),
            "stale": status["state"] != "streaming",
            "state": status["state"],
            "error": status.get("error"),
            "classes": status.get("classes", []),
            "latency_ms": {},
            "dropped": every_cause(status.get("drops", {})),
            "discontinuity": False,
        }
        msg = Outgoing(header=header, payload=b"", ready_at=time.perf_counter())
        if only is None:
            # A stream ends (stopped, failed) from its source thread while its last frames are
            # still in the engine: the end is said again after each of those results, so it is
            # the last thing clients hear.
            with self._lock:
                if StreamState(status["state"]).terminal:
                    self._ended[stream_id] = msg
                else:
                    self._ended.pop(stream_id, None)
        for client in [only] if only is not None else self.clients(stream_id):
            client.loop.call_soon_threadsafe(client.offer, msg)

    @staticmethod
    def finalize(client: Client, msg: Outgoing) -> bytes:
        """Stamp send-time fields and pack; runs on the event loop right before sending."""
        header = dict(msg.header)
        header["sent_at"] = now()
        lat = dict(header.get("latency_ms", {}))
        if msg.header.get("type") == "result":
            lat["send"] = round((time.perf_counter() - msg.ready_at) * 1000.0, 3)
            if header.get("captured_at"):
                lat["total"] = round((header["sent_at"] - header["captured_at"]) * 1000.0, 3)
        header["latency_ms"] = {k: round(v, 3) for k, v in lat.items()}
        dropped = dict(header.get("dropped", {}))
        dropped[DropCause.CLIENT_SLOW.value] = client.dropped_slow
        header["dropped"] = dropped
        return pack_message(header, msg.payload)

    def shutdown(self) -> None:
        self._closed = True
        with self._lock:
            everyone = [c for cs in self._clients.values() for c in cs.values()]
        for client in everyone:
            try:
                client.loop.call_soon_threadsafe(client.close)
            except RuntimeError:
                client.closed = True
        with self._lock:
            watchers = [w for ws in self._closing.values() for w in ws]
            self._closing.clear()
        _set_all(watchers)
        self._pool.shutdown(wait=True, cancel_futures=True)


def _set_all(watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    for loop, event in watchers:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(event.set)
