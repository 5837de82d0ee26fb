"""Structured logs: one JSON object per line, for the cluster's log pipeline.

Callers pass their fields with `extra={"fields": {...}}`, or, on a hot path, through `line`.
Nothing secret is ever a field: the admission line names the pod, never its content; the CA's
names the SPIFFE ID and serial.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

_LEVEL_NAMES = {level: logging.getLevelName(level).lower() for level in (
    logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)}


class _Clock:
    """RFC 3339 UTC timestamps to the millisecond; the date and time of the current second are
    formatted once, not per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def timestamp(self, seconds: float) -> str:
        whole = int(seconds)
        if whole != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = whole
        return f"{self._prefix}.{int((seconds - whole) * 1000):03d}+00:00"


_CLOCK = _Clock()


def _entry(created: float, level: int, logger: str, message: str,
           fields: Mapping[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "time": _CLOCK.timestamp(created),
        "level": _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower(),
        "logger": logger,
        "msg": message,
    }
    if fields:
        entry.update(fields)
    return entry


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        entry = _entry(record.created, record.levelno, record.name, record.getMessage(),
                       fields if isinstance(fields, Mapping) else None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class JsonLines(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` installs. `write` puts a line on its stream without a
    LogRecord, for `line`."""

    def write(self, entry: dict[str, Any]) -> None:
        text = orjson.dumps(entry, default=str).decode() + self.terminator
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(text)
            self.flush()


_HANDLER: JsonLines | None = None


def _only_handler(logger: logging.Logger, level: int) -> JsonLines | None:
    """configure()'s handler when it alone would write `logger`'s lines at `level`: no other
    handler or filter on the way to the root (a test capturing logs adds one)."""
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        if current.handlers:
            handler = current.handlers[0]
            if (handler is not _HANDLER or len(current.handlers) != 1 or handler.filters
                    or level < handler.level):
                return None
            return handler
        if not current.propagate:
            return None
        current = current.parent
    return None


def line(logger: logging.Logger, level: int, message: str, fields: Mapping[str, Any]) -> None:
    """The JSON line `logger.log(level, message, extra={"fields": fields})` writes, for a
    line written per request: Python's logging machinery (a LogRecord, handler locks and
    lookups) costs as much as the admission it would report (bench/bench_http.py). Falls back
    to that machinery whenever anything besides configure()'s handler would see the line."""
    if not logger.isEnabledFor(level):
        return
    handler = _only_handler(logger, level)
    if handler is None:
        logger.log(level, message, extra={"fields": fields})
        return
    handler.write(_entry(time.time(), level, logger.name, message, fields))


def configure(level: str) -> None:
    """JSON lines on stderr for our loggers and uvicorn's."""
    global _HANDLER
    # Skip what the JSON lines never show (the caller's file and line, thread, process), a
    # fifth of each record's cost (Python's logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    _HANDLER = JsonLines()
    _HANDLER.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [_HANDLER]
    root.setLevel(level.upper())
    # urllib3 warns of every retry the Kubernetes client makes; our own line says it once.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
