"""Logging set-up: one line per event, plain or JSON, the stream id on every stream line.

Every line, uvicorn's included, has passwords in URIs and secret query parameters
(``token=``, ``pwd=``, ...) masked: uvicorn logs each websocket's path with its query,
which holds the viewer's ``?token=``. Two filters sit on the handler:

- :class:`StreamContext` gives every record a ``stream`` attribute: from
  ``extra={"stream": id}`` when the caller passed one, else from the ``"stream <id>: …"``
  prefix the pipeline's messages use. Plain lines show it as ``[stream=<id>]``, JSON
  lines as a ``stream`` field, so ``grep``/``jq`` can follow one camera.
- :class:`RateLimit` keeps a camera that is down for days from filling the disk: the
  same message template from the same logger and stream (and ``rate_key``, when the
  caller gives one: a reconnect line gives its error) passes ``burst`` times per
  ``interval_s`` window, then is held back; the next line that passes says how many
  were suppressed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from pipeline.sources import redact_secrets

_STREAM_PREFIX = re.compile(r"^stream ([A-Za-z0-9_.-]{1,64}):")


class StreamContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "stream", None) is None:
            m = _STREAM_PREFIX.match(record.getMessage())
            record.stream = m.group(1) if m else None
        return True


class RateLimit(logging.Filter):
    """At most ``burst`` records per (logger, template, stream) key in each ``interval_s`` window."""

    def __init__(
        self,
        *,
        interval_s: float = 60.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        super().__init__()
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.interval_s = interval_s
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [window start, passed in window, suppressed since the last line that passed]
        self._seen: dict[tuple[str, str, str | None, str | None], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if self.interval_s == 0:
            return True
        # ``extra={"rate_key": ...}`` splits one template into several keys (e.g. by error)
        stream, rate_key = getattr(record, "stream", None), getattr(record, "rate_key", None)
        key = (record.name, str(record.msg), stream, rate_key)
        t = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                if len(self._seen) >= self._max_keys:
                    self._prune(t)
                entry = self._seen[key] = [t, 0, 0]
            if t - entry[0] >= self.interval_s:
                entry[0], entry[1] = t, 0
            if entry[1] >= self.burst:
                entry[2] += 1
                return False
            entry[1] += 1
            suppressed, entry[2] = int(entry[2]), 0
        record.suppressed = suppressed
        return True

    def _prune(self, t: float) -> None:
        old = [k for k, e in self._seen.items() if t - e[0] >= self.interval_s]
        for k in old or list(self._seen)[: len(self._seen) // 2]:
            del self._seen[k]


def _suppressed_note(record: logging.LogRecord) -> str:
    n = getattr(record, "suppressed", 0)
    return f" ({n} similar message{'s' if n != 1 else ''} suppressed)" if n else ""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_secrets(record.getMessage()),
        }
        stream = getattr(record, "stream", None)
        if stream is not None:
            out["stream"] = stream
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            out["suppressed"] = suppressed
        if record.exc_info:
            out["exc"] = redact_secrets(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]  # UTC timestamps, marked with Z

    def __init__(self) -> None:
        super().__init__("%(asctime)sZ %(levelname)-7s %(name)s%(ctx)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        stream = getattr(record, "stream", None)
        record.ctx = f" [stream={stream}]" if stream is not None else ""
        text = redact_secrets(super().format(record)) + _suppressed_note(record)
        # One event, one line: tracebacks keep their content but not their newlines.
        return text.replace("\n", " | ") if record.exc_info or "\n" in text else text


def setup_logging(
    level: str = "info",
    *,
    json_lines: bool = False,
    rate_limit_s: float = 60.0,
    burst: int = 5,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route every logger (uvicorn's too) through one handler on stderr; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    handler.addFilter(StreamContext())
    handler.addFilter(RateLimit(interval_s=rate_limit_s, burst=burst))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
        lg.setLevel(logging.NOTSET)  # the root's level, whatever an earlier set-up left
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return handler
