"""Load benchmarks: overload, many streams, websocket fan-out, and the GPU speed-up."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from bench.harness import Received, Service, clients, rss_mb
from bench.pipeline import HD, WARMUP_S, Run, sustained_fps
from bench.tables import Table, percentile, ratio, skipped, verdict
from models.registry import build_model, get_spec
from models.segmenter import Segmenter


def bench_overload(run: Run) -> Table:
    t = Table(
        "overload",
        f"6. Overload: source at 2× the sustained rate (`{run.model}`, 720p)",
        ["source fps", "duration s", "p99 first window ms", "p99 last window ms", "last/first",
         "goal ≤ 1.2", "RSS growth MB", "goal ≤ 50"],
    )
    fps = int(max(4, round(2 * sustained_fps(run))))
    dur = run.seconds(60.0, 20.0)
    win = 10.0 if dur >= 40 else 5.0
    with Service(model=run.model, engine=run.engine_config(), realtime=True) as svc:
        handle = svc.add(run.clip(*HD, fps=fps, seconds=3.0), stream_id="hd")
        with clients(svc, [("hd", {}, 0.0)], WARMUP_S + dur) as recs:
            start = time.time() + WARMUP_S
            time.sleep(WARMUP_S + win)
            rss0 = rss_mb()
        rss1 = rss_mb()
        drops = handle.drops.snapshot()
        frames_in = handle.worker.status().frames
    rec = recs[0]
    end = start + dur
    first = percentile(rec.latencies_ms(start, start + win), 99)
    last = percentile(rec.latencies_ms(end - win, end), 99)
    q = ratio(last, first)
    growth = rss1 - rss0
    t.add(fps, dur, first, last, q, verdict(q, 1.2, at_most=True),
          growth, verdict(growth, 50.0, at_most=True))
    if rec.headers:
        drops = {**drops, "client_slow": rec.headers[-1].get("dropped", {}).get("client_slow", 0)}
    results = len(rec.window(start, end))
    t.notes.append(f"{frames_in} frames decoded, {results} results delivered; drops by cause: {drops}")
    t.notes.append(f"windows: first and last {win:g} s; RSS measured after the first window and at the end")
    t.data = {"fps": fps, "p99_first": first, "p99_last": last, "ratio": q, "rss_growth_mb": growth,
              "drops": drops, "frames_in": frames_in, "results": results}
    return t


def _stream_round(run: Run, svc: Service, n: int, dur: float) -> dict[str, Any]:
    clip = run.clip(640, 360, fps=15)
    ids = [f"s{i}" for i in range(n)]
    for sid in ids:
        svc.add(clip, stream_id=sid)
    before = dict(svc.manager.engine.stats.batch_sizes)
    with clients(svc, [(sid, {}, 0.0) for sid in ids], WARMUP_S + dur) as recs:
        start = time.time() + WARMUP_S
    after = svc.manager.engine.stats.batch_sizes
    for sid in ids:
        svc.manager.remove(sid)
    end = start + dur
    sizes = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    total = sum(sizes.values())
    p95 = [p for r in recs if (p := percentile(r.latencies_ms(start, end), 95)) is not None]
    return {
        "aggregate_fps": sum(r.fps(start, end) for r in recs),
        "p95_max_ms": max(p95) if p95 else None,
        "p95_mean_ms": statistics.fmean(p95) if p95 else None,
        "mean_batch": sum(k * v for k, v in sizes.items()) / total if total else None,
        "errors": [r.error for r in recs if r.error],
    }


def bench_streams(run: Run) -> Table:
    t = Table(
        "streams",
        f"7. Many streams (640×360, 15 fps each, `{run.model}`): batched (max_batch 8) vs batch size 1",
        ["streams", "demand fps", "batched fps", "mean batch", "p95 ms (worst stream)",
         "batch-1 fps", "p95 ms batch-1 (worst)", "batched / batch-1"],
    )
    dur = run.seconds(8.0, 4.0)
    counts = (1, 2, 4, 8)
    res: dict[int, dict[str, dict[str, Any]]] = {n: {} for n in counts}
    for label, max_batch in (("batched", 8), ("single", 1)):
        with Service(model=run.model, engine=run.engine_config(max_batch=max_batch), realtime=True) as svc:
            for n in counts:
                res[n][label] = _stream_round(run, svc, n, dur)
    for n in counts:
        b, s = res[n]["batched"], res[n]["single"]
        t.add(n, 15 * n, b["aggregate_fps"], b["mean_batch"], b["p95_max_ms"], s["aggregate_fps"],
              s["p95_max_ms"], ratio(b["aggregate_fps"], s["aggregate_fps"]))
    t.data = {str(n): v for n, v in res.items()}
    return t


def _fps_stats(recs: list[Received], start: float, end: float) -> tuple[float, float]:
    fps = [r.fps(start, end) for r in recs]
    return statistics.fmean(fps), min(fps)


def bench_fanout(run: Run) -> Table:
    t = Table(
        "fanout",
        f"8. Websocket fan-out: one stream (640×360, 15 fps, `{run.model}`), overlay to every client",
        ["clients", "slow client", "stream results/s", "client fps mean", "client fps min",
         "min / stream", "slow client fps"],
    )
    dur = run.seconds(8.0, 4.0)
    rows: dict[str, Any] = {}
    with Service(model=run.model, engine=run.engine_config(), realtime=True) as svc:
        handle = svc.add(run.clip(640, 360, fps=15), stream_id="cam")
        for k, slow in ((1, False), (10, False), (50, False), (10, True)):
            specs = [("cam", {}, 0.0)] * k + ([("cam", {}, 0.5)] if slow else [])
            with clients(svc, specs, WARMUP_S + dur) as recs:
                start = time.time() + WARMUP_S
                time.sleep(WARMUP_S)
                out1 = handle.frames_out
                time.sleep(max(0.0, start + dur - time.time()))
                out2 = handle.frames_out  # read here: closing a slow client may outlast the window
            stream_fps = (out2 - out1) / dur
            end = start + dur
            mean, low = _fps_stats(recs[:k], start, end)
            slow_fps = recs[-1].fps(start, end) if slow else None
            t.add(k, slow, stream_fps, mean, low, ratio(low, stream_fps), slow_fps)
            rows[f"{k}{'+slow' if slow else ''}"] = {
                "stream_fps": stream_fps, "mean": mean, "min": low, "slow": slow_fps,
                "errors": [r.error for r in recs if r.error],
            }
    # The stream's own rate varies with machine load between rounds, so the slow client's
    # effect is judged within its round: do the others still get every result the stream made?
    r = rows["10+slow"]
    q = ratio(r["min"], r["stream_fps"])
    t.notes.append(
        f"with a slow client (reads one message per 0.5 s), the other 10 clients' min fps ÷ the stream's "
        f"results/s: {q if q is None else round(q, 3)} ({verdict(q, 0.9)}, goal ≥ 0.9)"
    )
    t.data = {**rows, "slow_ratio": q}
    return t


def _infer_fps(seg: Segmenter, bs: int, seconds: float) -> float:
    """Frames/s of ``infer`` alone at batch ``bs`` on random input (never zeros: they can run
    faster than real data), after warm-up runs that also capture a CUDA graph or compile."""
    th, tw = seg.spec.input_size
    xs = [torch.rand((bs, 3, th, tw), device=seg.device) for _ in range(2)]
    for i in range(3):
        seg.infer(xs[i % 2])
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        seg.infer(xs[n % 2])
        n += 1
    torch.cuda.synchronize()
    return n * bs / (time.perf_counter() - t0)


GPU_BATCHES = (8, 16, 32)


def _warmup_s(module: Any, spec: Any, sizes: range) -> float:
    """Seconds the engine's start-up warm-up takes on a GPU: every batch size captured."""
    seg = Segmenter(module, spec, device="cuda", precision="fp16", channels_last=True, cuda_graphs=True)
    t0 = time.perf_counter()
    seg.warmup(sizes)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _gpu_variants(run: Run, name: str) -> list[tuple[str, dict[str, Any], tuple[int, ...]]]:
    """(label, Segmenter settings, batch sizes) measured against eager fp32 at batch 1. The
    baseline comes first: later variants switch the shared module to channels-last in place."""
    nhwc = {"channels_last": True}
    graphs = {**nhwc, "cuda_graphs": True}
    out: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
        ("fp32 eager", {"precision": "fp32", "channels_last": False}, (1,)),
        ("fp16 eager", {"precision": "fp16", **nhwc}, (1, *GPU_BATCHES)),
        ("fp16 CUDA graphs", {"precision": "fp16", **graphs}, (1, *GPU_BATCHES)),
        ("bf16 CUDA graphs", {"precision": "bf16", **graphs}, GPU_BATCHES),
    ]
    if not run.quick and name == run.model:  # compiling takes a minute or more per batch size
        out.append(("fp16 torch.compile + graphs", {"precision": "fp16", **graphs, "compile": True}, (1, 16)))
    return out


def bench_gpu(run: Run) -> Table:
    title = "GPU: model throughput by precision, layout, batch and CUDA graphs ÷ eager fp32 batch 1"
    if not torch.cuda.is_available():
        return skipped("gpu", title, "no CUDA")
    t = Table("gpu", title, ["model", "variant", "batch", "frames/s", "÷ fp32 eager b1"])
    secs = run.seconds(3.0, 1.5)
    for name in (run.model, "deeplabv3_resnet50"):
        try:
            module, spec = build_model(name, allow_download=False)
        except Exception:  # no cached weights offline: speed does not depend on the values
            spec = get_spec(name)
            module = spec.builder()
        # Start-up first, while cuDNN has chosen no kernels for this model yet (on a copy: the
        # segmenter turns its module to channels-last in place, and the fp32 baseline is not).
        sizes = range(1, run.engine_config().max_batch + 1)
        first, again = (_warmup_s(copy.deepcopy(module), spec, sizes) for _ in range(2))
        t.notes.append(f"{name}: the engine's warm-up (fp16, CUDA graphs, batch 1-{sizes[-1]}) took "
                       f"{first:.1f} s, then {again:.1f} s again with cuDNN's kernel choices made")
        rows: dict[str, float] = {}
        base: float | None = None
        for label, settings, batches in _gpu_variants(run, name):
            seg = Segmenter(module, spec, device="cuda", **settings)
            for bs in batches:
                fps = _infer_fps(seg, bs, secs)
                base = fps if base is None else base
                rows[f"{label} b{bs}"] = fps
                t.add(name, label, bs, fps, ratio(fps, base))
            del seg
            torch.cuda.empty_cache()
        best = max((k for k in rows if k.startswith("fp16")), key=rows.__getitem__)
        q = ratio(rows[best], base)
        t.notes.append(f"{name}: best fp16 ({best}) ÷ fp32 eager b1 = {q if q is None else round(q, 2)} "
                       f"({verdict(q, 3.0)}, goal ≥ 3)")
        t.data[name] = {"frames_per_s": rows, "best_fp16": best, "ratio": q,
                         "warmup_s": {"first": first, "again": again}}
    t.notes.append(f"{torch.cuda.get_device_name(0)}; infer() alone (input already on the device), "
                   "random input, warm-up and graph capture excluded")
    return t
