"""What the pipeline benchmarks run against: generated clips, the real service, real clients.

The service is the production one (``StreamManager`` + ``create_app``) behind a real
uvicorn on 127.0.0.1; clients are ``websockets`` connections speaking protocol v1.
Clients run on an asyncio loop in a thread of this process: on a 2-core machine a
client subprocess would compete for the same cores anyway, and one process keeps
clocks and RSS readings simple.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import uvicorn
import websockets

from pipeline.config import AppConfig, EngineConfig, SourceOptions, StreamConfig
from pipeline.manager import StreamHandle, StreamManager
from pipeline.slot import DropPolicy
from server.app import create_app, uvicorn_options

# -- clips ---------------------------------------------------------------------------------


def _frame(i: int, width: int, height: int, base: np.ndarray) -> np.ndarray:
    img = base.copy()
    # a moving bright block and a moving person-sized dark bar: every frame differs
    side = max(8, min(width, height) // 4)
    x = (i * 9) % max(1, width - side)
    y = (i * 4) % max(1, height - side)
    img[y : y + side, x : x + side] = 250
    bx = (width - (i * 6) % width) % max(1, width - side // 2)
    img[height // 4 : height - 8, bx : bx + side // 2] = (40, 30, 20)
    return img


def make_clip(path: Path, *, width: int, height: int, fps: int, frames: int) -> Path:
    """An H.264 clip of moving shapes (generated here: the benchmarks download nothing)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    base = np.empty((height, width, 3), np.uint8)
    base[..., 0] = (0.6 * xs + 0.4 * ys).astype(np.uint8)
    base[..., 1] = (0.5 * xs).astype(np.uint8)
    base[..., 2] = (255 - 0.7 * ys).astype(np.uint8)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(2 * fps), "bf": "0"}
        for i in range(frames):
            vf = av.VideoFrame.from_ndarray(_frame(i, width, height, base), format="rgb24")
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        import resource

        return pages * resource.getpagesize() / 1e6
    except OSError:
        return float("nan")


# -- the service ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """The real app on a real uvicorn in a thread; streams added in code (file paths allowed)."""

    def __init__(
        self,
        *,
        model: str,
        engine: EngineConfig,
        realtime: bool,
        policy: DropPolicy = DropPolicy.LATEST,
    ) -> None:
        self.config = AppConfig(default_model=model, engine=engine)
        self.manager = StreamManager(self.config, realtime=realtime, slot_policy=policy)
        self.app = create_app(self.config, manager=self.manager)
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                **uvicorn_options(self.config),
            )
        )
        self._thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    def __enter__(self) -> Service:
        self._thread.start()
        deadline = time.monotonic() + 120
        while not (self.server.started and self.manager.engine.stats.ready):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the service did not start within 120 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def add(self, path: Path, *, stream_id: str, loop: bool = True, model: str | None = None) -> StreamHandle:
        return self.manager.add(
            StreamConfig(id=stream_id, source=str(path), model=model, options=SourceOptions(loop=loop))
        )

    def url(self, stream_id: str, **params: Any) -> str:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"ws://127.0.0.1:{self.port}/ws/streams/{stream_id}" + (f"?{q}" if q else "")


# -- clients -------------------------------------------------------------------------------


@dataclass
class Received:
    """What one client saw: receive wall time and header of each result message."""

    stream: str
    times: list[float] = field(default_factory=list)
    headers: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def window(self, start: float, end: float) -> list[int]:
        return [i for i, t in enumerate(self.times) if start <= t < end]

    def fps(self, start: float, end: float) -> float:
        return len(self.window(start, end)) / max(1e-9, end - start)

    def latencies_ms(self, start: float, end: float) -> list[float]:
        """capture → client receive, in ms, for results received in [start, end)."""
        return [(self.times[i] - self.headers[i]["captured_at"]) * 1000.0 for i in self.window(start, end)]

    def stage_ms(self, stage: str, start: float, end: float) -> list[float]:
        out = []
        for i in self.window(start, end):
            v = self.headers[i].get("latency_ms", {}).get(stage)
            if v is not None:
                out.append(float(v))
        return out


def _parse(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack(">I", data[:4])
    return json.loads(data[4 : 4 + n])


async def _consume(url: str, rec: Received, until: float, delay_s: float) -> None:
    try:
        # max_queue=1: a slow client really is slow (the library does not read ahead for it)
        async with websockets.connect(url, max_size=None, max_queue=1 if delay_s else 16) as ws:
            while time.time() < until:
                try:
                    data = await asyncio.wait_for(ws.recv(), timeout=max(0.01, until - time.time()))
                except TimeoutError:
                    break
                if isinstance(data, str):
                    continue
                t = time.time()
                header = _parse(data)
                if header.get("type") != "result":
                    continue
                rec.times.append(t)
                rec.headers.append(header)
                if delay_s:
                    await asyncio.sleep(delay_s)
    except Exception as e:  # recorded; the benchmark reports it instead of hanging
        rec.error = f"{type(e).__name__}: {e}"


@contextmanager
def clients(
    service: Service, specs: list[tuple[str, dict[str, Any], float]], duration_s: float
) -> Iterator[list[Received]]:
    """Run one client per (stream, query params, per-message delay) for ``duration_s``.

    Yields the (filling) records at once; on exit waits for the clients to finish.
    """
    until = time.time() + duration_s
    recs = [Received(stream=sid) for sid, _, _ in specs]

    async def main() -> None:
        await asyncio.gather(
            *(
                _consume(service.url(sid, **params), rec, until, delay)
                for (sid, params, delay), rec in zip(specs, recs, strict=True)
            )
        )

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="bench-clients", daemon=True)
    thread.start()
    try:
        yield recs
    finally:
        thread.join(duration_s + 30)
