"""Pipeline benchmarks: decode, the pipeline with a zero-cost model, the model alone, end to end, latency.

Each function takes the shared :class:`Run` and returns a :class:`Table`. Ratios are
measured side by side in one process on one machine; absolute numbers are only
comparable within a run.
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from bench.harness import Service, clients, make_clip
from bench.tables import Table, percentile, ratio, verdict
from models.registry import build_model
from models.segmenter import Segmenter
from pipeline.affinity import AffinityError, available_cpus, split_cpus
from pipeline.config import EngineConfig
from pipeline.manager import default_torch_threads, resolve_device
from pipeline.slot import DropPolicy

HD = (1280, 720)
WARMUP_S = 1.5  # results received before this are not counted (model warm-up, first keyframe)


@dataclass
class Run:
    """Shared state of one ``python -m bench`` run: options, clips, numbers later sections reuse."""

    quick: bool
    workdir: Path
    model: str = "selfie"
    engine: dict[str, Any] = field(default_factory=dict)  # engine settings every section uses
    cache: dict[str, Any] = field(default_factory=dict)

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def engine_config(self, **kw: Any) -> EngineConfig:
        """The engine's configuration: defaults, then ``--engine`` settings, then ``kw``."""
        return EngineConfig(**{**self.engine, **kw})

    def clip(self, width: int, height: int, fps: int, seconds: float = 4.0) -> Path:
        path = self.workdir / f"clip_{width}x{height}_{fps}fps.mp4"
        return make_clip(path, width=width, height=height, fps=fps, frames=max(2, int(fps * seconds)))


def cpu_s() -> float:
    """CPU seconds used by this process so far, all threads (FFmpeg's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _decode_fps(path: Path, min_s: float) -> tuple[float, float]:
    """(frames/s, CPU ms per frame) of PyAV decoding ``path`` to rgb24 arrays, as the file source
    does: frame threads, and one scaler kept for the stream (``frame.to_ndarray(format=...)``
    would build one per picture, a third of the decode's time at 720p)."""
    n, t0, c0 = 0, time.perf_counter(), cpu_s()
    while time.perf_counter() - t0 < min_s:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            scaler = VideoReformatter()
            for frame in c.decode(stream):
                scaler.reformat(frame, format="rgb24").to_ndarray()
                n += 1
    return n / (time.perf_counter() - t0), 1000.0 * (cpu_s() - c0) / max(1, n)


def decode_fps(run: Run) -> float:
    if "decode_fps" not in run.cache:
        run.cache["decode_fps"], run.cache["decode_cpu_ms"] = _decode_fps(
            run.clip(*HD, fps=30), run.seconds(4.0, 2.0)
        )
    return float(run.cache["decode_fps"])


def bench_decode(run: Run) -> Table:
    t = Table("decode", "1. Decode only (PyAV, 720p H.264, rgb24 frames)",
              ["clip", "frames/s", "CPU ms/frame"])
    t.add("1280x720 30 fps H.264", decode_fps(run), run.cache["decode_cpu_ms"])
    t.data["fps"] = decode_fps(run)
    t.data["cpu_ms_per_frame"] = run.cache["decode_cpu_ms"]
    return t


def _throughput(
    run: Run, model: str, fmt: str, *, threads: int | None = None, **engine_kw: Any
) -> dict[str, Any]:
    """One unpaced 720p stream through the real service (blocking slot: nothing is decoded in vain)."""
    engine = run.engine_config(threads=threads, **engine_kw)
    dur = run.seconds(8.0, 4.0)
    cpu: list[float] = []  # process CPU seconds at the start and the end of the measured window
    with Service(model=model, engine=engine, realtime=False, policy=DropPolicy.BLOCK) as svc:
        svc.add(run.clip(*HD, fps=30), stream_id="hd")
        with clients(svc, [("hd", {"format": fmt}, 0.0)], WARMUP_S + dur) as recs:
            start = time.time() + WARMUP_S
            time.sleep(WARMUP_S)
            cpu.append(cpu_s())
            time.sleep(dur)
            cpu.append(cpu_s())
        rec = recs[0]
        stats = svc.manager.engine.stats.snapshot()
    end = start + dur
    stages = {
        s: statistics.median(v) if (v := rec.stage_ms(s, start, end)) else None
        for s in ("decode", "queue", "preprocess", "infer", "postprocess", "encode", "send")
    }
    sizes = stats["batch_sizes"]
    frames = rec.fps(start, end) * dur
    return {
        "fps": rec.fps(start, end),
        # everything in this process: decode, engine, encoding, server and the client
        "cpu_ms_per_frame": 1000.0 * (cpu[1] - cpu[0]) / frames if frames else None,
        "stages_ms": stages,
        "batch": max(sizes, key=sizes.get) if sizes else None,
        "error": rec.error,
    }


def bench_null_pipeline(run: Run) -> Table:
    t = Table(
        "null_pipeline",
        "2. Full pipeline, identity model (`null`), 720p → websocket client",
        ["client format", "frames/s", "decode-only frames/s", "ratio", "goal ≥ 0.9",
         "CPU ms/frame", "decode-only CPU ms/frame", "pre ms", "post ms", "encode ms"],
    )
    dec = decode_fps(run)
    for fmt in ("overlay", "raw"):
        r = _throughput(run, "null", fmt)
        q = ratio(r["fps"], dec)
        st = r["stages_ms"]
        t.add(fmt, r["fps"], dec, q, verdict(q, 0.9), r["cpu_ms_per_frame"], run.cache["decode_cpu_ms"],
              st["preprocess"], st["postprocess"], st["encode"])
        t.data[fmt] = {**r, "ratio": q}
        if r["error"]:
            t.notes.append(f"{fmt} client: {r['error']}")
    t.notes.append("stage columns: medians per result (preprocess/postprocess are per batch)")
    t.notes.append("CPU ms/frame: all of this process's threads (decoder, engine, encoders, server, "
                   "client) over the frames the client received")
    return t


def segmenter_for(run: Run, name: str) -> Segmenter:
    module, spec = build_model(name)
    cfg = run.engine_config()
    return Segmenter(module, spec, device=resolve_device(cfg.device), precision=cfg.precision,
                     channels_last=cfg.channels_last, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)


def model_only(run: Run) -> dict[int, float]:
    """Frames/s of ``infer`` alone (input already preprocessed) at batch 1, 2, 4, 8."""
    if "model_only" in run.cache:
        return dict(run.cache["model_only"])
    torch.set_num_threads(run.engine_config().threads or default_torch_threads())
    seg = segmenter_for(run, run.model)
    th, tw = seg.spec.input_size
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for bs in (1, 2, 4, 8):
        x = seg.preprocess([rng.integers(0, 255, (th, tw, 3), dtype=np.uint8) for _ in range(bs)])
        seg.infer(x)  # warm-up at this shape
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < run.seconds(2.0, 0.8):
            seg.infer(x)
            n += bs
        if seg.device.type == "cuda":
            torch.cuda.synchronize()
        out[bs] = n / (time.perf_counter() - t0)
    run.cache["model_only"] = out
    return out


def model_only_beside_decode(run: Run) -> float:
    """Batch-1 frames/s of ``infer`` while another thread decodes the 720p clip nonstop: what the
    network alone can do when the rest of a pipeline (here just its decoder) uses the other cores."""
    if "model_only_loaded" in run.cache:
        return float(run.cache["model_only_loaded"])
    torch.set_num_threads(run.engine_config().threads or default_torch_threads())
    seg = segmenter_for(run, run.model)
    th, tw = seg.spec.input_size
    x = seg.preprocess([np.zeros((th, tw, 3), np.uint8)])
    seg.infer(x)
    stop = threading.Event()
    clip = run.clip(*HD, fps=30)

    def decode() -> None:
        while not stop.is_set():
            with av.open(str(clip)) as c:
                stream = c.streams.video[0]
                stream.thread_type = "AUTO"
                scaler = VideoReformatter()
                for frame in c.decode(stream):
                    scaler.reformat(frame, format="rgb24").to_ndarray()
                    if stop.is_set():
                        return

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    try:
        time.sleep(0.2)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < run.seconds(2.0, 1.0):
            seg.infer(x)
            n += 1
        fps = n / (time.perf_counter() - t0)
    finally:
        stop.set()
        worker.join(5)
    run.cache["model_only_loaded"] = fps
    return fps


def bench_model(run: Run) -> Table:
    t = Table("model", f"3. Model only: `{run.model}` infer, preprocessed input",
              ["batch", "frames/s", "ms per batch", "vs batch 1"])
    mo = model_only(run)
    for bs, fps in mo.items():
        t.add(bs, fps, 1000.0 * bs / fps, ratio(fps, mo[1]))
    t.data["fps"] = mo
    return t


def _model_b1(run: Run) -> float:
    """Batch-1 frames/s of ``infer`` alone, over a short window: measured right before and right
    after an end-to-end run, so that the ratio divides by what the network did at that time
    (a shared machine's speed drifts by tens of percent within minutes)."""
    torch.set_num_threads(run.engine_config().threads or default_torch_threads())
    if "b1_segmenter" not in run.cache:
        seg = segmenter_for(run, run.model)
        th, tw = seg.spec.input_size
        x = seg.preprocess([np.random.default_rng(0).integers(0, 255, (th, tw, 3), dtype=np.uint8)])
        seg.infer(x)
        run.cache["b1_segmenter"] = (seg, x)
    seg, x = run.cache["b1_segmenter"]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < run.seconds(1.5, 0.8):
        seg.infer(x)
        n += 1
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _bracketed(run: Run, fmt: str) -> dict[str, Any]:
    """An end-to-end run with the network's batch-1 speed measured right before and after it."""
    before = _model_b1(run)
    r = _throughput(run, run.model, fmt)
    after = _model_b1(run)
    return {**r, "model_b1_around": (before, after)}


def sustained_fps(run: Run) -> float:
    """End-to-end frames/s of one 720p stream with the default model (measured once per run)."""
    if "e2e" not in run.cache:
        run.cache["e2e"] = _bracketed(run, "overlay")
    return float(run.cache["e2e"]["fps"])


def bench_e2e(run: Run) -> Table:
    t = Table("e2e", f"4. End to end, `{run.model}`, one unpaced 720p stream → websocket client",
              ["client format", "frames/s", "batch used", "model-only frames/s at that batch (around it)",
               "ratio", "goal ≥ 0.85", "÷ model beside a decoder", "CPU ms/frame"])
    sustained_fps(run)
    mo = model_only(run)
    loaded = model_only_beside_decode(run)
    t.notes.append(
        f"model-only at batch 1 with a 720p decoder running beside it: {loaded:.1f} frames/s "
        f"({ratio(loaded, mo[1]):.2f} of the idle figure): the ceiling the other cores' work leaves"
    )
    t.data["model_only_beside_decode"] = loaded
    # overlay: what a browser viewer gets (JPEG per frame); rle: what a program acting on the
    # masks gets (no image encoding)
    rows = {"overlay": run.cache["e2e"], "rle": _bracketed(run, "rle")}
    for fmt, r in rows.items():
        base = mo.get(r["batch"] or 1)
        around = r.get("model_b1_around")
        if (r["batch"] or 1) == 1 and around:
            # batch 1: the network's own speed right before and after this run, averaged
            base = statistics.fmean(around)
            t.notes.append(f"{fmt}: model-only batch 1 right before / after the run: "
                           f"{around[0]:.1f} / {around[1]:.1f} frames/s")
        q = ratio(r["fps"], base)
        # against the batch-1 ceiling: what the pipeline makes of what the network can do while
        # the decoder runs (only meaningful at batch 1)
        ceiling = ratio(r["fps"], loaded) if (r["batch"] or 1) == 1 else None
        t.add(fmt, r["fps"], r["batch"], base, q, verdict(q, 0.85), ceiling, r["cpu_ms_per_frame"])
        t.notes.append(f"{fmt}: median stage ms " + ", ".join(
            f"{k} {v:.1f}" for k, v in r["stages_ms"].items() if v is not None))
        t.data[fmt] = {**r, "model_only": base, "ratio": q, "of_ceiling": ceiling}
    return t


def bench_threads(run: Run) -> Table:
    t = Table("threads", f"Torch CPU threads, end to end (`{run.model}`, one unpaced 720p stream, overlay)",
              ["torch threads", "frames/s", "infer ms", "vs 1 thread"])
    if resolve_device("auto") != "cpu":
        return t
    # Interleaved rounds, best of each: a noisy neighbour then hurts both settings alike.
    res: dict[int, dict[str, Any]] = {}
    for _ in range(1 if run.quick else 2):
        for n in (1, 2):
            r = _throughput(run, run.model, "overlay", threads=n)
            if n not in res or r["fps"] > res[n]["fps"]:
                res[n] = r
    for n, r in res.items():
        t.add(n, r["fps"], r["stages_ms"]["infer"], ratio(r["fps"], res[1]["fps"]))
    t.data = {str(n): r for n, r in res.items()}
    return t


def bench_pinning(run: Run) -> Table:
    t = Table("pinning", f"`engine.pin_threads`, end to end (`{run.model}`, one unpaced 720p stream)",
              ["client format", "not pinned frames/s", "pinned frames/s", "pinned ÷ not",
               "infer ms not pinned / pinned"])
    cpus = available_cpus()
    if resolve_device(run.engine_config().device) != "cpu" or cpus is None:
        t.notes.append("skipped: needs the CPU device and CPUs that threads may be pinned to")
        return t
    try:
        engine_cpus, _ = split_cpus(cpus, run.engine_config().threads or default_torch_threads())
    except AffinityError as e:
        t.notes.append(f"skipped: {e}")
        return t
    # Interleaved rounds, medians: a noisy neighbour then hurts both settings alike.
    got: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for _ in range(2 if run.quick else 3):
        for fmt in ("rle", "overlay"):
            for pin in (False, True):
                got.setdefault((fmt, pin), []).append(_throughput(run, run.model, fmt, pin_threads=pin))
    for fmt in ("rle", "overlay"):
        fps = {pin: statistics.median(r["fps"] for r in got[fmt, pin]) for pin in (False, True)}
        infer = {pin: statistics.median(r["stages_ms"]["infer"] or 0.0 for r in got[fmt, pin])
                 for pin in (False, True)}
        t.add(fmt, fps[False], fps[True], ratio(fps[True], fps[False]),
              f"{infer[False]:.1f} / {infer[True]:.1f}")
        t.notes.append(f"{fmt} rounds, not pinned / pinned frames/s: " + ", ".join(
            f"{a['fps']:.0f} / {b['fps']:.0f}" for a, b in zip(got[fmt, False], got[fmt, True], strict=True)))
        t.data[fmt] = {"not_pinned": got[fmt, False], "pinned": got[fmt, True]}
    t.notes.append(f"medians of interleaved rounds; pinned: the engine thread on CPUs {sorted(engine_cpus)}, "
                   "every other thread (this benchmark's client included) on the others")
    return t


def bench_latency(run: Run) -> Table:
    t = Table("latency", f"5. Capture → client latency at nominal load (`{run.model}`, 720p, paced)",
              ["source fps", "p50 ms", "p95 ms", "p99 ms", "infer ms",
               "goal: p50 ≤ (infer + 2 intervals) ms", "met"])
    fps = int(max(2, min(30, round(0.5 * sustained_fps(run)))))
    dur = run.seconds(15.0, 6.0)
    with Service(model=run.model, engine=run.engine_config(), realtime=True) as svc:
        svc.add(run.clip(*HD, fps=fps), stream_id="hd")
        with clients(svc, [("hd", {}, 0.0)], WARMUP_S + dur) as recs:
            start = time.time() + WARMUP_S
    rec = recs[0]
    lat = rec.latencies_ms(start, start + dur)
    infer = statistics.median(v) if (v := rec.stage_ms("infer", start, start + dur)) else None
    goal = None if infer is None else infer + 2000.0 / fps
    p50 = percentile(lat, 50)
    t.add(fps, p50, percentile(lat, 95), percentile(lat, 99), infer, goal,
          verdict(p50, goal or 0, at_most=True))
    t.notes.append(f"nominal load = half the sustained end-to-end rate ({sustained_fps(run):.1f} frames/s)")
    t.data = {"fps": fps, "latency_ms": lat, "infer_ms": infer, "goal_ms": goal, "results": len(lat)}
    return t
