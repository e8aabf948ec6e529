"""The ``segstream`` command: serve, segment, models, eval, watch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import (
    AppConfig,
    ConfigError,
    RoiConfig,
    StreamConfig,
    TemporalConfig,
    build_config,
    load_config_file,
)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _parse_source_arg(value: str) -> tuple[str | None, str]:
    """``[ID=]URI`` -> (id, uri). An '=' inside a URI's query string is not an id separator."""
    if not value.strip():
        raise CliError("empty --source")
    head, sep, tail = value.partition("=")
    if sep and "://" not in head and ":" not in head and "/" not in head and "?" not in head and head:
        if not tail:
            raise CliError(f"--source {value!r}: nothing after '='")
        return head, tail
    return None, value


def _config_from_args(args: argparse.Namespace) -> AppConfig:
    data: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    server = data.setdefault("server", {})
    engine = data.setdefault("engine", {})
    for key in ("host", "port", "token", "media_dir"):
        if getattr(args, key, None) is not None:
            server[key] = getattr(args, key)
    if getattr(args, "log_json", False):
        server["log_json"] = True
    if getattr(args, "device", None):
        engine["device"] = args.device
    for key in ("max_batch", "precision"):
        if getattr(args, key, None) is not None:
            engine[key] = getattr(args, key)
    if getattr(args, "compile", False):
        engine["compile"] = True
    if getattr(args, "pin_threads", False):
        engine["pin_threads"] = True
    if getattr(args, "cuda_graphs", None) is not None:
        engine["cuda_graphs"] = args.cuda_graphs
    if getattr(args, "model", None):
        data["default_model"] = args.model
    if getattr(args, "weights", None):
        data.setdefault("weights", {})[data.get("default_model", "selfie")] = args.weights
    streams = data.setdefault("streams", [])
    for value in getattr(args, "source", None) or []:
        sid, uri = _parse_source_arg(value)
        streams.append({"id": sid, "source": uri})
    temporal = getattr(args, "temporal", None)
    roi = getattr(args, "roi", False)
    for s in streams:
        if temporal:
            s.setdefault("temporal", {})["mode"] = temporal
        if roi:
            s.setdefault("roi", {})["enabled"] = True
    cfg = build_config(data)
    if getattr(args, "command", None) == "serve" and not cfg.streams and not getattr(args, "no_demo", False):
        cfg = cfg.model_copy(update={"streams": [StreamConfig(id="demo", source="demo")]})
    return cfg


def _check_model(name: str | None) -> None:
    from models.registry import get_spec

    if name:
        get_spec(name)  # UnknownModelError names the choices


def _models_used(cfg: AppConfig) -> list[str]:
    return sorted({cfg.default_model} | {sc.model for sc in cfg.streams if sc.model})


def _check_startup(cfg: AppConfig) -> None:
    """What would stop the server's start-up, said in one line before anything starts:
    the device, model names, weights files present, sources, temporal thresholds and the
    stream limit. (:func:`_load_weights` then applies the weights files.)"""
    from models.device import check_device
    from models.temporal import TemporalParams
    from pipeline.sources import parse_source

    check_device(cfg.engine.device)
    if len(cfg.streams) > cfg.limits.max_streams:
        raise CliError(
            f"{len(cfg.streams)} streams configured, above limits.max_streams = {cfg.limits.max_streams}"
        )
    for name in _models_used(cfg):
        _check_model(name)
        path = cfg.weights.get(name)
        if path is not None and not Path(path).is_file():
            raise CliError(f"weights file for {name!r} not found: {path}")
    for sc in cfg.streams:
        label = f"stream {sc.id!r}" if sc.id else f"stream {sc.source!r}"
        parse_source(sc.source, options=sc.options, allowed_schemes=cfg.server.allowed_schemes)
        try:
            TemporalParams(**sc.temporal.model_dump())
        except ValueError as e:
            raise CliError(f"{label}: temporal: {e}") from None


def _load_weights(cfg: AppConfig, load_model: Callable[[str], Any]) -> None:
    """Each network with a configured weights file built and the file applied by
    ``load_model`` (the server's own loader, which keeps the build for the engine), before
    start-up: an unreadable file, or one made for another network, is one line naming it
    (WeightsError)."""
    for name in _models_used(cfg):
        if name in cfg.weights:
            load_model(name)


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.manager import StreamManager
    from server.app import create_app
    from server.logs import setup_logging

    cfg = _config_from_args(args)
    _check_startup(cfg)  # the device among the rest, before the manager takes it
    manager = StreamManager(cfg, restrict_files=True)
    _load_weights(cfg, manager.load_model)
    setup_logging(
        cfg.server.log_level,
        json_lines=cfg.server.log_json,
        rate_limit_s=cfg.server.log_rate_limit_s,
        burst=cfg.server.log_burst,
    )
    app = create_app(cfg, manager=manager)
    return serve_app(app, cfg)


def serve_app(app: Any, cfg: AppConfig) -> int:
    """Run the app under uvicorn until SIGTERM/SIGINT; 0 after a clean shutdown.

    On a signal: stop accepting connections, close every websocket with 1001 (going
    away) and give clients a moment to answer, then let uvicorn finish requests, run the
    lifespan shutdown (sources stopped, threads joined within ``shutdown_timeout_s``) and
    return. A second SIGINT forces the exit.
    """
    import asyncio
    import signal

    import uvicorn

    from server.app import uvicorn_options

    log = logging.getLogger("segstream.server")
    bound = cfg.server.shutdown_timeout_s

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn would re-raise the signal after shutting down, turning a clean stop
            # into "killed by SIGTERM"; record it ourselves and exit 0 instead.
            name = signal.Signals(sig).name
            if self.should_exit:
                if sig == signal.SIGINT:
                    log.warning("%s again: forcing exit", name)
                    self.force_exit = True
                return
            log.info("%s received: shutting down (bound %.1f s)", name, bound)
            self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            for server in getattr(self, "servers", []):
                server.close()  # stop accepting before anything else
            app.state.begin_shutdown()
            deadline = asyncio.get_running_loop().time() + min(2.0, bound)
            while _websockets_open(self) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            await super().shutdown(sockets)

    server = GracefulServer(
        uvicorn.Config(
            app,
            host=cfg.server.host,
            port=cfg.server.port,
            log_config=None,
            timeout_graceful_shutdown=max(1, int(bound)),
            **uvicorn_options(cfg),
        )
    )
    server.run()  # a failed start-up (lifespan, port in use) exits 3 from inside uvicorn
    return exit_status(app, started=server.started, bound=bound)


def exit_status(app: Any, *, started: bool, bound: float) -> int:
    """``serve``'s exit status once uvicorn has returned: 3 when start-up failed, 1 when a
    thread outlived the shutdown bound (named in the log), else 0."""
    import threading
    import time

    log = logging.getLogger("segstream.server")
    if not started:
        return 3  # uvicorn exits 3 itself on a failed start-up; the same status should it return
    if not getattr(app.state, "clean_shutdown", True):
        # A source or engine thread outlived the bound. The manager names stuck sources; an
        # engine still building or warming a model would otherwise go unnamed.
        left = pipeline_threads_alive()
        log.error(
            "threads still running %.1f s after shutdown: %s", bound, ", ".join(left) or "(ended meanwhile)"
        )
        return 1
    # The interpreter waits for non-daemon threads; join them within the bound so a stuck
    # one is named in the log instead of silently holding the process.
    deadline = time.monotonic() + bound
    leftover = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in leftover:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in leftover if t.is_alive()]
    if stuck:
        log.error("threads still running %.1f s after shutdown: %s", bound, ", ".join(stuck))
        return 1
    return 0


_PIPELINE_THREADS = ("engine", "source-", "stall-watchdog")


def pipeline_threads_alive() -> list[str]:
    """Names of the pipeline's threads (engine, its finisher and model builders, sources,
    the stall watchdog) that are still running."""
    import threading

    return sorted(
        t.name for t in threading.enumerate() if t.is_alive() and t.name.startswith(_PIPELINE_THREADS)
    )


def _websockets_open(server: Any) -> bool:
    return any(
        type(c).__module__.startswith("uvicorn.protocols.websockets") for c in server.server_state.connections
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.offline import segment_file

    cfg = _config_from_args(args)
    _check_model(cfg.default_model)
    if not args.output and not args.masks_dir:
        raise CliError("give --output OUT.mp4 and/or --masks-dir DIR")
    bar = tqdm(unit="frame", disable=args.quiet or not sys.stderr.isatty() and not args.progress)

    def progress(done: int, total: int | None) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    report = segment_file(
        cfg,
        args.input,
        output=args.output,
        masks_dir=args.masks_dir,
        model=cfg.default_model,
        temporal=TemporalConfig(mode=args.temporal) if args.temporal else None,
        roi=RoiConfig(enabled=True) if args.roi else None,
        progress=progress,
    )
    bar.close()
    print(
        f"segmented {report.frames} frames in {report.seconds:.1f}s ({report.fps:.1f} fps)"
        + (f"; video: {report.output}" if report.output else "")
        + (f"; masks: {report.masks_dir}" if report.masks_dir else "")
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import list_models, weights_status

    rows: list[dict[str, Any]] = []
    for spec in list_models():
        rows.append(
            {
                "name": spec.name,
                "classes": list(spec.classes),
                "input_size": list(spec.input_size),
                "binary": spec.binary,
                "weights": weights_status(spec),
                "description": spec.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<30} {'input':>9}  {'classes':<28} weights")
    for r in rows:
        w = r["weights"]
        classes = ", ".join(r["classes"])
        if len(classes) > 28:
            classes = f"{len(r['classes'])} classes ({r['classes'][1]}, …)"
        state = "present" if w.get("present") else "not present"
        where = f"{w.get('source')}: {w.get('location') or '-'} ({state})"
        size = "x".join(str(v) for v in r["input_size"])
        print(f"{r['name']:<30} {size:>9}  {classes:<28} {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segstream", description="Real-time video segmentation streaming.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="serve the viewer, REST API and websockets")
    s.add_argument("--source", action="append", metavar="[ID=]URI", help="a source to serve (repeatable)")
    s.add_argument("--model", help="default model name (see `segstream models`)")
    s.add_argument("--weights", metavar="FILE", help="weights file for the default model")
    s.add_argument("--device", help="engine.device: auto | cpu | cuda | cuda:N (default: auto)")
    s.add_argument("--host", help="server.host (default: 127.0.0.1; 0.0.0.0 serves other machines)")
    s.add_argument("--port", type=int, help="server.port (default: 8000)")
    s.add_argument("--config", metavar="FILE", help="TOML config file (streams, models, limits)")
    s.add_argument("--token", help="require this bearer token for the API and websockets")
    s.add_argument("--media-dir", metavar="DIR", help="directory that API-added file sources must live in")
    s.add_argument(
        "--max-batch", type=int, metavar="N", help="engine.max_batch: frames per model call (default: 8)"
    )
    s.add_argument(
        "--precision", choices=["auto", "fp32", "fp16", "bf16"], help="engine.precision (auto: fp16 on CUDA)"
    )
    s.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    s.add_argument(
        "--pin-threads",
        action="store_true",
        help="engine.pin_threads: the network's thread on CPUs of its own, the rest on the others",
    )
    s.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="engine.cuda_graphs: replay the model as one CUDA graph per batch size (GPU; default: on)",
    )
    s.add_argument(
        "--temporal", choices=["off", "smooth", "keyframe"], help="temporal refinement for --source streams"
    )
    s.add_argument("--roi", action="store_true", help="person-region crops for --source streams")
    s.add_argument("--log-json", action="store_true", help="JSON log lines")
    s.add_argument("--no-demo", action="store_true", help="start with no stream when no --source is given")
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("segment", help="segment a video file offline, every frame")
    g.add_argument("input", help="video file (or URI)")
    g.add_argument("--output", "-o", metavar="OUT", help="write an overlaid video (.mp4, .mkv, .mov, …)")
    g.add_argument("--masks-dir", metavar="DIR", help="write one label PNG per frame (00000.png, …)")
    g.add_argument("--model", help="model name (default: selfie)")
    g.add_argument("--weights", metavar="FILE", help="weights file for the model")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument(
        "--temporal", choices=["off", "smooth", "keyframe"], help="temporal refinement (default: off)"
    )
    g.add_argument("--roi", action="store_true", help="segment crops around the people found (ROI mode)")
    g.add_argument("--max-batch", type=int, metavar="N", help="frames per model call (default: 8)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    g.add_argument(
        "--progress", action="store_true", help="show the progress bar even when not on a terminal"
    )
    g.set_defaults(func=cmd_segment)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    m.set_defaults(func=cmd_models)

    _add_eval_and_watch(sub)
    return p


def _add_eval_and_watch(sub: Any) -> None:
    from pipeline.evaluate import add_eval_parser
    from server.client import add_watch_parser

    add_eval_parser(sub)
    add_watch_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CliError, ConfigError, ValueError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"segstream {args.command}: error: {msg}", file=sys.stderr)
        logging.getLogger("segstream").debug("error", exc_info=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
