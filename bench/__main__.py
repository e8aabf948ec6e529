"""``python -m bench``: every benchmark in one run, printed as markdown tables, saved as JSON.

    python -m bench                 # full run (~5-10 min on 2 cores)
    python -m bench --quick         # shorter windows, no 60 s overload (~2 min)
    python -m bench --only e2e --only latency
    python -m bench --list
    python -m bench --engine cuda_graphs=false --engine precision=bf16   # [engine] settings

``--engine`` settings reach the sections that run the service or the model (not ``decode``,
``gpu``, which sets its own per variant, or the other modules' sections).

Sections from other ``bench`` modules (models, sources, temporal, roi, soak) run when
the module exists and exposes ``run()`` or ``main()``; otherwise they are reported as
skipped; in a run of everything they run in their quick mode. ``soak`` is long and has
its own ``make soak``: it runs only when named.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from bench import load, pipeline
from bench.tables import Table, skipped, write_json
from models.device import check_device
from pipeline.config import EngineConfig

RESULTS = Path(__file__).resolve().parent / "results"

Section = Callable[[pipeline.Run], Table]

SECTIONS: dict[str, Section] = {
    "decode": pipeline.bench_decode,
    "null_pipeline": pipeline.bench_null_pipeline,
    "model": pipeline.bench_model,
    "e2e": pipeline.bench_e2e,
    "threads": pipeline.bench_threads,
    "pinning": pipeline.bench_pinning,
    "latency": pipeline.bench_latency,
    "overload": load.bench_overload,
    "streams": load.bench_streams,
    "fanout": load.bench_fanout,
    "gpu": load.bench_gpu,
}
FULL_ONLY = {"overload"}
EXTERNAL = ("models", "sources", "temporal", "roi", "soak")
NAMED_ONLY = {"soak"}


def _external(name: str, quick: bool) -> tuple[str, Any]:
    """Run ``bench.<name>``'s entry point; (status, its return value or reason)."""
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.{name}":
            return "skipped", f"bench/{name}.py does not exist"
        raise
    fn = getattr(mod, "run", None) or getattr(mod, "main", None)
    if fn is None:
        return "skipped", f"bench/{name}.py has no run() or main()"
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if "quick" in params:
        kwargs["quick"] = quick
    elif "argv" in params:
        kwargs["argv"] = ["--quick"] if quick else []
    # A main() without an argv parameter parses sys.argv: give it its own program name and
    # no arguments, so our flags (--only, --quick) never reach its parser.
    saved = sys.argv
    sys.argv = [f"python -m bench.{name}"]
    try:
        out = fn(**kwargs)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"bench.{name} exited with status {e.code}") from None
        out = None
    finally:
        sys.argv = saved
    return "ok", out


def _engine_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it is JSON (true, 8, 2.5), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    names = list(SECTIONS) + list(EXTERNAL)
    ap = argparse.ArgumentParser(prog="python -m bench", description="segstream benchmarks")
    ap.add_argument("--quick", action="store_true", help="short windows, skip the 60 s overload")
    ap.add_argument("--only", action="append", choices=names, metavar="NAME",
                    help=f"run only this section (repeatable): {', '.join(names)}")
    ap.add_argument("--list", action="store_true", help="list the sections and exit")
    ap.add_argument("--model", default="selfie", help="the model the pipeline sections use (default: selfie)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where JSON results go")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE", type=_engine_setting,
                    help="an [engine] setting for the sections that run the service or the model "
                         "(not decode, gpu or the other modules'), e.g. cuda_graphs=false (repeatable)")
    args = ap.parse_args(argv)
    try:
        engine = EngineConfig(**dict(args.engine))
    except ValidationError as e:
        ap.error(f"--engine: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")
    try:  # an unknown device name, or CUDA on a machine without it, would fail every section
        check_device(engine.device)
    except ValueError as e:
        ap.error(f"--engine: device: {str(e).replace('--device ', 'device=')}")
    if args.list:
        print("\n".join(names))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.only:
        chosen = list(dict.fromkeys(args.only))
    else:
        chosen = [n for n in names if n not in NAMED_ONLY and not (args.quick and n in FULL_ONLY)]
    workdir = args.results / "clips"
    workdir.mkdir(parents=True, exist_ok=True)
    run = pipeline.Run(quick=args.quick, workdir=workdir, model=args.model,
                       engine=engine.model_dump(exclude_unset=True))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "quick": args.quick,
        "engine": run.engine,
    }
    print(f"# segstream benchmarks ({'quick' if args.quick else 'full'}) — {stamp}\n")
    print(f"environment: {json.dumps(env)}\n", flush=True)
    report: dict[str, Any] = {"started": stamp, "environment": env, "sections": {}}
    failed = 0
    for name in chosen:
        t0 = time.perf_counter()
        try:
            if name in SECTIONS:
                table = SECTIONS[name](run)
                print(table.markdown(), flush=True)
                report["sections"][name] = table.to_json()
            else:
                # In a run of everything, other modules run in their quick mode so the whole
                # suite stays within ~10 min; named with --only they follow --quick.
                status, out = _external(name, args.quick or not args.only)
                if status == "skipped":
                    table = skipped(name, f"{name} (bench/{name}.py)", str(out))
                    print(table.markdown(), flush=True)
                    report["sections"][name] = table.to_json()
                else:
                    report["sections"][name] = {"name": name, "result": out}
        except Exception as e:  # one broken section must not hide the others' numbers
            failed += 1
            print(f"### {name}\n\n- FAILED: {type(e).__name__}: {e}\n", flush=True)
            traceback.print_exc(file=sys.stderr)
            report["sections"][name] = {"name": name, "error": f"{type(e).__name__}: {e}"}
        report["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(args.results / f"{name}.json", report["sections"][name])
    write_json(args.results / f"bench-{stamp}.json", report)
    write_json(args.results / "latest.json", report)
    print(f"results: {args.results}/latest.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
