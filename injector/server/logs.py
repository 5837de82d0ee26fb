"""Structured logs: one JSON object per line, for the cluster's log pipeline.

Callers pass their fields with `extra={"fields": {...}}`, or, on a hot path, through `line`.
Nothing secret is ever a field: the admission line names the pod, never its content; the CA's
names the SPIFFE ID and serial.

Every field of a line is bounded (`bounded`): a pod's name is whatever its caller sent, and one
7 MiB request made a 14.7 MB log line. A value longer than its bound is cut, with its length
noted (`…[7340032 chars]`), so that a line says what it was about without carrying it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import orjson

_LEVEL_NAMES = {level: logging.getLevelName(level).lower() for level in (
    logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)}


# ".000+00:00" to ".999+00:00": a timestamp's end, by its milliseconds.
_MILLISECONDS = [f".{milliseconds:03d}+00:00" for milliseconds in range(1000)]


class _Clock:
    """RFC 3339 UTC timestamps to the millisecond; the date and time of the current second are
    formatted once, not per line, and the milliseconds looked up."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def timestamp(self, seconds: float) -> str:
        whole = int(seconds)
        if whole != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = whole
        return self._prefix + _MILLISECONDS[int((seconds - whole) * 1000)]


_CLOCK = _Clock()

# The bounds of a line's values, in characters: the message, a traceback, any other field.
MAX_MESSAGE_CHARS = 4096
MAX_EXCEPTION_CHARS = 16384
MAX_FIELD_CHARS = 1024
_BOUNDS = {"msg": MAX_MESSAGE_CHARS, "exception": MAX_EXCEPTION_CHARS}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…[{len(text)} chars]"


def bounded(entry: Mapping[Any, Any]) -> dict[str, Any]:
    """`entry` with each value within its bound: a string cut, anything else (a list, a
    mapping, an object) cut as its JSON text; keys as strings, cut too."""
    result: dict[str, Any] = {}
    for key, value in entry.items():
        name = _cut(key if isinstance(key, str) else str(key), MAX_FIELD_CHARS)
        limit = _BOUNDS.get(name, MAX_FIELD_CHARS)
        if isinstance(value, str):
            result[name] = _cut(value, limit)
        elif value is None or isinstance(value, bool | float) or (
                isinstance(value, int) and -(2**63) <= value < 2**64):
            result[name] = value
        else:
            try:
                text = orjson.dumps(value, default=str).decode()
            except (TypeError, orjson.JSONEncodeError):  # kept as text, then
                result[name] = _cut(str(value), limit)
                continue
            result[name] = value if len(text) <= limit else _cut(text, limit)
    return result


def dumps(entry: Mapping[str, Any]) -> str:
    """The JSON text of a log line, each value within its bound. The common line (a few
    hundred characters) is serialised once; only a longer one is looked at field by field."""
    try:
        text = orjson.dumps(entry, default=str).decode()
    except (TypeError, orjson.JSONEncodeError):  # a key or number JSON cannot hold
        text = ""
    if not text or len(text) > MAX_FIELD_CHARS:
        text = orjson.dumps(bounded(entry), default=str).decode()
    return text


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
        return dumps(entry)


# StreamHandler is generic in typeshed only; at run time it takes no parameter.
class JsonLines(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` installs. `write` adds a line without a LogRecord, for `line`.

    Lines written on the event loop wait for the end of the loop's current pass and go out in
    one write: a write system call per admission cost more than building its line (25 µs to a
    file, bench/bench_http.py), and one pass answers many admissions under load. From another
    thread, and for records through logging, the pending lines go first, so order is kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # a loop that will flush
        self._flush_thread = 0  # the thread that runs that loop

    def write(self, entry: dict[str, Any]) -> None:
        text = dumps(entry) + self.terminator
        # Handler.lock is None only before createLock(), which __init__ calls.
        with self.lock:  # type: ignore[union-attr]
            loop = self._flush_on
            if (loop is not None and self._flush_thread == threading.get_ident()
                    and loop.is_running()):
                # This thread's loop flushes at the end of its pass already: no need to ask
                # asyncio for the running loop (a getpid system call each time).
                self._pending.append(text)
                return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        # Handler.lock is None only before createLock(), which __init__ calls.
        with self.lock:  # type: ignore[union-attr]
            if loop is None:
                self._pending.append(text)
                self.flush()
                return
            if self._flush_on is not loop:
                loop.call_soon(self.flush)
                self._flush_on = loop
                self._flush_thread = threading.get_ident()
            self._pending.append(text)

    def flush(self) -> None:
        # As logging does with a broken stream: the lines are lost, the server goes on.
        with self.lock, contextlib.suppress(OSError, ValueError):  # type: ignore[union-attr]  # as above
            self._flush_on = None
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                self.stream.write(text)
            super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self.flush()
        super().emit(record)


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
