"""Source benchmark: decode throughput against FFmpeg itself, and frame age for a live-paced source.

    python -m bench.sources [--frames 150] [--workdir DIR]

1. Generates 720p and 1080p H.264 clips (FFmpeg's ``testsrc2`` through PyAV's libx264).
2. Decode-only frames/s of each clip through our file source (decode + RGB conversion, the
   work every frame needs before the model sees it) and through the stream worker in
   offline mode (numbering, timestamps, a blocking slot drained by a consumer thread),
   against the ``ffmpeg`` binary decoding the same file in the same run
   (``ffmpeg -benchmark -i clip -f null -``, and the same with ``-pix_fmt rgb24`` for the
   same conversion our source does). Goal: ratio >= 0.9.
3. Frame age at the consumer (now - captured_at, p50/p99) for a file served live (paced
   at its frame rate) with a consumer that spends 10 ms per frame.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import av

from pipeline.config import ReconnectConfig
from pipeline.slot import DropPolicy, FrameSlot
from pipeline.sources import parse_source
from pipeline.stream import StreamWorker
from pipeline.types import StreamState, now

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


def make_clip(path: Path, *, width: int, height: int, frames: int, fps: int = 30) -> Path:
    src = av.open(f"testsrc2=size={width}x{height}:rate={fps}", format="lavfi")
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(fps * 2)}
        for n, frame in enumerate(src.decode(video=0), start=1):
            frame.pts = None
            for packet in stream.encode(frame.reformat(format="yuv420p")):
                out.mux(packet)
            if n >= frames:
                break
        for packet in stream.encode():
            out.mux(packet)
    src.close()
    return path


def ours_decode_fps(clip: Path) -> tuple[float, int]:
    src = parse_source(str(clip)).create()
    src.open()
    t0 = time.perf_counter()
    n = sum(1 for f in src.frames() if f is not None)
    dt = time.perf_counter() - t0
    src.close()
    return n / dt, n


def worker_fps(clip: Path) -> tuple[float, int]:
    slot = FrameSlot(capacity=2, policy=DropPolicy.BLOCK)
    worker = StreamWorker("bench", parse_source(str(clip)), slot, reconnect=ReconnectConfig(), realtime=False)
    got = 0
    t0 = time.perf_counter()
    worker.start()
    while True:
        if slot.take() is not None:
            got += 1
            continue
        if worker.status().state.terminal and len(slot) == 0:
            break
        time.sleep(0.0005)
    dt = time.perf_counter() - t0
    worker.stop()
    return got / dt, got


def ffmpeg_fps(ffmpeg: str, clip: Path, frames: int, *, rgb: bool) -> float | None:
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-benchmark", "-i", str(clip)]
    if rgb:
        cmd += ["-pix_fmt", "rgb24"]
    cmd += ["-f", "null", "-"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    m = re.search(r"bench: utime=[\d.]+s stime=[\d.]+s rtime=([\d.]+)s", r.stderr)
    if r.returncode != 0 or not m:
        return None
    return frames / float(m.group(1))


def ffmpeg_version(ffmpeg: str) -> str:
    r = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True, timeout=30, check=False)
    return r.stdout.split("\n", 1)[0].replace("ffmpeg version ", "").split(" ")[0]


def live_age(clip: Path, seconds: float, work_ms: float) -> tuple[list[float], dict[str, int]]:
    slot = FrameSlot(capacity=1, policy=DropPolicy.LATEST)
    spec = parse_source(f"{clip}?loop=1")
    worker = StreamWorker("live", spec, slot, reconnect=ReconnectConfig(), realtime=True)
    worker.start()
    worker.wait_state({StreamState.STREAMING}, timeout=10)
    ages: list[float] = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        f = slot.take()
        if f is None:
            time.sleep(0.0005)  # an engine would be woken by the slot's on_put instead
            continue
        ages.append((now() - f.captured_at) * 1000.0)
        time.sleep(work_ms / 1000.0)
    worker.stop()
    return ages, slot.drops.snapshot()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--live-seconds", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segstream-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ffmpeg = shutil.which("ffmpeg")

    print(
        f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}); ffmpeg binary: "
        f"{ffmpeg_version(ffmpeg) + ' at ' + ffmpeg if ffmpeg else 'not found (apt-get install ffmpeg)'}"
    )
    print()
    print(
        "| clip | frames | ours: source fps | ours: worker fps | ffmpeg null fps | ffmpeg rgb24 fps "
        "| ratio vs null | ratio vs rgb24 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    clips = {}
    for name, (w, h) in SIZES.items():
        clip = make_clip(workdir / f"bench_{name}.mp4", width=w, height=h, frames=args.frames)
        clips[name] = clip
        # Best of --repeat runs each, interleaved, so a noisy neighbour hurts every side alike.
        ours = wfps = 0.0
        null: float | None = None
        rgb: float | None = None
        for _ in range(args.repeat):
            o, n = ours_decode_fps(clip)
            wf, wn = worker_fps(clip)
            assert wn == n, f"worker delivered {wn} of {n} frames"
            ours, wfps = max(ours, o), max(wfps, wf)
            if ffmpeg:
                null = max(null or 0.0, ffmpeg_fps(ffmpeg, clip, n, rgb=False) or 0.0) or None
                rgb = max(rgb or 0.0, ffmpeg_fps(ffmpeg, clip, n, rgb=True) or 0.0) or None

        def fmt(x: float | None) -> str:
            return f"{x:.1f}" if x else "n/a"

        def ratio(x: float | None, ours: float = ours) -> str:
            return f"{ours / x:.2f}" if x else "n/a"

        print(
            f"| {name} {w}x{h} | {n} | {ours:.1f} | {wfps:.1f} | {fmt(null)} | {fmt(rgb)} "
            f"| {ratio(null)} | {ratio(rgb)} |"
        )

    print()
    ages, drops = live_age(clips["720p"], args.live_seconds, work_ms=10.0)
    half = len(ages) // 2
    print("Live-paced 720p file (30 fps), consumer spending 10 ms per frame, latest-wins slot:")
    print()
    print("| frames seen | age p50 ms | age p99 ms | max ms | 1st-half median | 2nd-half median | overruns |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {len(ages)} | {pct(ages, 0.5):.2f} | {pct(ages, 0.99):.2f} | {max(ages):.2f} "
        f"| {statistics.median(ages[:half]):.2f} | {statistics.median(ages[half:]):.2f} "
        f"| {drops.get('source_overrun', 0)} |"
    )


if __name__ == "__main__":
    main()
