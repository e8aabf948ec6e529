"""Soak test: a real server, several streams, clients coming and going, a source restarted
every minute. Prints one markdown row per minute and a verdict.

    python -m bench.soak                      # 3 streams, 10 minutes, the null model
    python -m bench.soak --minutes 2 --model selfie
    python -m bench.soak --overhead           # cost of the metrics instrumentation

Checked: RSS and thread count flat (start vs end), no stream lost, latency p99 flat.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def make_clip(path: Path, *, frames: int = 90, width: int = 320, height: int = 240, fps: int = 30) -> Path:
    import av
    import numpy as np

    with av.open(str(path), mode="w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = (np.arange(width) * 255 // width)[None, :]
            x = (i * 5) % (width - 40)
            img[60:140, x : x + 40] = 255
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@dataclass
class Minute:
    latencies: list[float] = field(default_factory=list)
    messages: int = 0
    sessions: int = 0
    errors: int = 0


class Clients:
    """Websocket clients that connect, read for a few seconds and leave, forever."""

    def __init__(self, ws_url: str, streams: list[str], *, concurrency: int, seed: int = 1) -> None:
        self.ws_url, self.streams, self.concurrency = ws_url, streams, concurrency
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.minute = Minute()
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(concurrency)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def take(self) -> Minute:
        with self.lock:
            m, self.minute = self.minute, Minute()
            return m

    def _loop(self, i: int) -> None:
        from websockets.sync.client import connect

        rng = random.Random(i)
        while not self.stop.is_set():
            sid = rng.choice(self.streams)
            fmt = rng.choice(["overlay", "rle", "labels"])
            stay = rng.uniform(2.0, 8.0)
            try:
                with connect(
                    f"{self.ws_url}/ws/streams/{sid}?format={fmt}", open_timeout=5, close_timeout=2
                ) as ws:
                    with self.lock:
                        self.minute.sessions += 1
                    end = time.monotonic() + stay
                    while time.monotonic() < end and not self.stop.is_set():
                        msg = ws.recv(timeout=5)
                        if isinstance(msg, bytes):
                            header = json.loads(msg[4 : 4 + int.from_bytes(msg[:4], "big")])
                            total = header.get("latency_ms", {}).get("total")
                            with self.lock:
                                self.minute.messages += 1
                                if total is not None:
                                    self.minute.latencies.append(total)
            except Exception:
                with self.lock:
                    self.minute.errors += 1
                self.stop.wait(0.5)
            self.stop.wait(rng.uniform(0.2, 1.5))


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]


def soak(minutes: float, *, streams: int, model: str, clients: int, sample_s: float) -> int:
    import uvicorn

    from pipeline.config import AppConfig, EngineConfig, LimitsConfig, ServerConfig, StreamConfig
    from server.app import create_app, uvicorn_options

    tmp = Path(tempfile.mkdtemp(prefix="segstream-soak-"))
    clip = make_clip(tmp / "clip.mp4")
    ids = [f"s{i}" for i in range(streams)]
    cfg = AppConfig(
        default_model=model,
        server=ServerConfig(media_dir=str(tmp), log_level="warning"),
        engine=EngineConfig(threads=1, encode_workers=2),
        limits=LimitsConfig(max_streams=streams + 1),
        streams=[StreamConfig(id=sid, source=f"{clip}?loop=1") for sid in ids],
    )
    app = create_app(cfg)
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **uvicorn_options(cfg)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/readyz", timeout=5)
        if r.status_code == 200 and all(s["frames"] > 0 for s in r.json()["streams"].values()):
            break
        time.sleep(0.2)
    else:
        print("server did not become ready", file=sys.stderr)
        return 1

    crowd = Clients(f"ws://127.0.0.1:{port}", ids, concurrency=clients)
    crowd.start()
    time.sleep(min(5.0, sample_s))  # let the first clients settle before the baseline
    crowd.take()
    start_rss, start_threads = rss_mb(), threading.active_count()
    print(f"soak: {streams} streams, model {model}, {clients} clients churning, {minutes:g} min\n")
    print("| min | RSS MB | threads | clients sessions | messages | p99 total ms | restarted | streams ok |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    rows = []
    t_end = time.monotonic() + minutes * 60
    n = 0
    while time.monotonic() < t_end:
        n += 1
        restarted = ids[(n - 1) % len(ids)]
        # Restart one source: remove the stream and add it again, as an operator would.
        httpx.delete(f"{url}/api/streams/{restarted}", timeout=10).raise_for_status()
        httpx.post(
            f"{url}/api/streams", json={"id": restarted, "source": f"{clip}?loop=1"}, timeout=10
        ).raise_for_status()
        time.sleep(max(0.0, min(sample_s, t_end - time.monotonic())))
        m = crowd.take()
        streams_now = {s["id"]: s for s in httpx.get(f"{url}/api/streams", timeout=10).json()}
        ok = sum(1 for sid in ids if sid in streams_now and streams_now[sid]["state"] == "streaming")
        row = (n, rss_mb(), threading.active_count(), m.sessions, m.messages, p99(m.latencies), restarted, ok)
        rows.append(row)
        cells = [
            f"{n * sample_s / 60:g}",
            f"{row[1]:.0f}",
            row[2],
            m.sessions,
            m.messages,
            f"{row[5]:.1f}",
            restarted,
            f"{ok}/{len(ids)}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
        sys.stdout.flush()
    crowd.stop.set()
    for t in crowd.threads:
        t.join(10)
    time.sleep(1.0)
    end_rss, end_threads = rss_mb(), threading.active_count()
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    server.should_exit = True
    thread.join(30)

    p99s = [r[5] for r in rows if r[5] == r[5]]
    first, last = (p99s[0], p99s[-1]) if p99s else (float("nan"), float("nan"))
    lost = [r for r in rows if r[7] != len(ids)]
    med = statistics.median(p99s) if p99s else float("nan")
    print()
    print(f"RSS: {start_rss:.0f} MB at start, {end_rss:.0f} MB at end ({end_rss - start_rss:+.0f} MB)")
    print(
        f"threads (clients connected): {rows[0][2] if rows else start_threads} in the first row,"
        f" {rows[-1][2] if rows else end_threads} in the last; {end_threads} after the clients left"
    )
    print(f"latency p99: first row {first:.1f} ms, last row {last:.1f} ms, median {med:.1f} ms")
    print(f"rows with a stream not streaming: {len(lost)}")
    print(f"metrics exposition: {len(metrics.splitlines())} lines")
    rss_flat = end_rss - start_rss < max(64.0, 0.15 * start_rss)
    threads_flat = not rows or rows[-1][2] <= rows[0][2] + 2
    p99_flat = not p99s or last <= max(2.0 * first, first + 50.0)
    verdict = rss_flat and threads_flat and p99_flat and not lost
    print(
        f"verdict: {'PASS' if verdict else 'FAIL'}"
        f" (rss flat={rss_flat}, threads flat={threads_flat}, p99 flat={p99_flat}, no lost stream={not lost})"
    )
    return 0 if verdict else 1


def overhead(seconds: float, model: str) -> int:
    """Pipeline throughput with and without the metrics listener (file decoded as fast as possible)."""
    from pipeline.config import AppConfig, EngineConfig, StreamConfig
    from pipeline.manager import StreamManager
    from server.metrics import Metrics

    class NoHub:
        encoded = 0

        def client_count(self, stream_id: str) -> int:
            return 0

    tmp = Path(tempfile.mkdtemp(prefix="segstream-overhead-"))
    clip = make_clip(tmp / "clip.mp4", frames=120)

    def run(with_metrics: bool) -> float:
        cfg = AppConfig(
            default_model=model,
            engine=EngineConfig(threads=1, max_batch=4),
            streams=[StreamConfig(id=f"o{i}", source=f"{clip}?loop=1&realtime=0") for i in range(2)],
        )
        mgr = StreamManager(cfg, realtime=False)
        metrics = Metrics(mgr, NoHub()) if with_metrics else None
        if metrics is not None:
            mgr.result_listeners.append(metrics.observe)
        mgr.start()
        time.sleep(2.0)  # warm-up
        f0, t0 = mgr.engine.stats.frames, time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            if metrics is not None:
                metrics.render()  # a scrape every half second, far more often than Prometheus
        fps = (mgr.engine.stats.frames - f0) / (time.monotonic() - t0)
        mgr.shutdown()
        return fps

    # alternate to spread machine noise over both variants
    results: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for flag in (False, True):
            results[flag].append(run(flag))
    base, inst = statistics.median(results[False]), statistics.median(results[True])

    # the hot-path cost in isolation
    import numpy as np

    from pipeline.types import Frame, SegmentationResult

    m = Metrics(
        type("M", (), {"list": lambda self: [], "engine": None, "device": "cpu"})(), NoHub(), process=False
    )
    frame = Frame("x", 0, None, time.time(), np.zeros((2, 2, 3), np.uint8))
    res = SegmentationResult(
        frame,
        np.zeros((2, 2), np.uint8),
        ("bg", "person"),
        model,
        latency_ms={"decode": 1, "queue": 1, "preprocess": 1, "infer": 1, "postprocess": 1},
        segmented_at=time.time(),
    )
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        m.observe(res)
    per_us = (time.perf_counter() - t) / n * 1e6

    print("| model | fps without metrics | fps with metrics | overhead | observe() per result |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {model} | {base:.1f} | {inst:.1f} | {100 * (base - inst) / base:+.2f}% | {per_us:.1f} µs |")
    print(
        f"(runs: without {[round(v, 1) for v in results[False]]},"
        f" with {[round(v, 1) for v in results[True]]})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--clients", type=int, default=4, help="concurrent websocket clients (each churns)")
    p.add_argument("--model", default="null")
    p.add_argument(
        "--sample-s", type=float, default=60.0, help="seconds per row (one source restart per row)"
    )
    p.add_argument("--overhead", action="store_true", help="measure the metrics instrumentation overhead")
    p.add_argument("--seconds", type=float, default=8.0, help="--overhead: seconds per run")
    args = p.parse_args(argv)
    if args.overhead:
        return overhead(args.seconds, args.model)
    return soak(
        args.minutes, streams=args.streams, model=args.model, clients=args.clients, sample_s=args.sample_s
    )


if __name__ == "__main__":
    sys.exit(main())
