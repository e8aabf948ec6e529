"""Per-model cost: parameters, GFLOPs at the input size, ms/frame at batch 1 and 8, frames/s.

    python -m bench.models [--quick] [--threads 2] [--models selfie,null]

Times are the network alone (``Segmenter.infer`` on a preprocessed batch, fp32, CPU: the frozen
channels-last graph the segmenter uses by default, plus an eager row for the default model), the
best of several repeats so that other load on the machine inflates them as little as possible.
URL-weighted models are timed with random weights (cost does not depend on the values), so the
benchmark never downloads. When ``ai_edge_litert`` is importable (e.g. run with the converter
venv's python), the default model is also timed against the TFLite reference interpreter in the
same run, alternating the two, and the ratio of the medians reference_ms / ours_ms is printed,
with pre- and post-processing times for camera-sized frames.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.registry import DEFAULT_MODEL, build_model, get_spec, list_models
from models.segmenter import Segmenter

HEAVY_GFLOPS = 20.0
REFERENCE_TFLITE = Path("/tmp/mp/mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite")


def best_ms(fn: Callable[[], object], *, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1000.0


def gflops(module: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(x)
    return counter.get_total_flops() / 1e9


def median_ms(fn: Callable[[], object], *, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return times


def make_segmenter(name: str, *, optimize: bool = True) -> Segmenter:
    spec = get_spec(name)
    if spec.weights.kind == "url":
        module = spec.builder().eval()  # random weights: same cost, no download
    else:
        module, spec = build_model(name)
    return Segmenter(module, spec, device="cpu", precision="fp32", optimize=optimize)


def bench_model(name: str, *, reps: int, optimize: bool = True) -> dict:
    seg = make_segmenter(name, optimize=optimize)
    h, w = seg.spec.input_size
    x1 = torch.rand(1, 3, h, w)
    flops = gflops(seg.module, x1)
    heavy = flops > HEAVY_GFLOPS
    r = 1 if heavy else reps
    ms1 = best_ms(lambda: seg.infer(x1), reps=r, warmup=1 if heavy else 2)
    x8 = torch.rand(8, 3, h, w)
    ms8 = best_ms(lambda: seg.infer(x8), reps=r, warmup=0 if heavy else 1) / 8
    return {
        "model": name + ("" if optimize else " (eager)"),
        "params": sum(p.numel() for p in seg.module.parameters()),
        "input": f"{h}x{w}",
        "gflops": flops,
        "ms1": ms1,
        "ms8": ms8,
        "fps8": 1000.0 / ms8 if ms8 > 0 else float("inf"),
    }


def reference_vs_ours(reps: int) -> str:
    try:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return (
            "reference: ai_edge_litert not importable here; run with the converter venv's python to compare"
        )
    if not REFERENCE_TFLITE.is_file():
        return f"reference: {REFERENCE_TFLITE} not found (see models/weights/README.md)"
    interp = Interpreter(model_path=str(REFERENCE_TFLITE), num_threads=torch.get_num_threads())
    interp.allocate_tensors()
    idx = interp.get_input_details()[0]["index"]
    img = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)

    def ref() -> None:
        interp.set_tensor(idx, img)
        interp.invoke()

    seg = make_segmenter(DEFAULT_MODEL)
    eager = make_segmenter(DEFAULT_MODEL, optimize=False)
    x1, x8 = torch.rand(1, 3, 256, 256), torch.rand(8, 3, 256, 256)
    runs: dict[str, Callable[[], object]] = {
        "reference": ref,
        "ours b1": lambda: seg.infer(x1),
        "ours b8": lambda: seg.infer(x8),
        "eager b1": lambda: eager.infer(x1),
        "eager b8": lambda: eager.infer(x8),
    }
    for fn in runs.values():  # warm up (and trace) outside the timed rounds
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):  # alternate so that background load hits all alike
        for k, fn in runs.items():
            times[k] += median_ms(fn, reps=1)
    med = {k: statistics.median(v) / (8 if k.endswith("b8") else 1) for k, v in times.items()}
    r = med["reference"]
    lines = [
        f"reference vs ours, medians of {reps} alternating rounds ({torch.get_num_threads()} threads):",
        "",
        "| run | ms/frame | ratio reference/this | frames/s |",
        "|---|---:|---:|---:|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.2f} | {r / v:.2f} | {1000.0 / v:.1f} |")
    lines += ["", "| frame | batch | preprocess ms | postprocess ms |", "|---|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for h, w in ((360, 640), (720, 1280)):
        for n in (1, 8):
            frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
            probs = seg.infer(seg.preprocess(frames))
            pre = statistics.median(median_ms(lambda f=frames: seg.preprocess(f), reps=reps))
            sizes = [(h, w)] * n
            post = statistics.median(median_ms(lambda p=probs, s=sizes: seg.postprocess(p, s), reps=reps))
            lines.append(f"| {w}x{h} | {n} | {pre:.2f} | {post:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="model cost table")
    ap.add_argument("--quick", action="store_true", help="skip the ResNet-101 models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n] or [s.name for s in list_models()]
    if args.quick:
        names = [n for n in names if "resnet101" not in n]
    rows = []
    for name in names:
        rows.append(bench_model(name, reps=args.reps))
        if name == DEFAULT_MODEL:
            rows.append(bench_model(name, reps=args.reps, optimize=False))
    print(f"\n## Models (CPU, {args.threads} threads, fp32, network only)\n")
    print("| model | params | input | GFLOPs | ms/frame b1 | ms/frame b8 | frames/s b8 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['input']} | {r['gflops']:.3f} | {r['ms1']:.2f} | "
            f"{r['ms8']:.2f} | {r['fps8']:.1f} |"
        )
    if DEFAULT_MODEL in names:
        print()
        print(reference_vs_ours(args.reps))


if __name__ == "__main__":
    main()
