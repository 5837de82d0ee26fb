"""Structured logs: one JSON object per line, for the cluster's log pipeline.

Callers pass their fields with `extra={"fields": {...}}`. Nothing secret is ever a field: the
admission line names the pod, never its content; the CA's names the SPIFFE ID and serial.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str) -> None:
    """JSON lines on stderr for our loggers and uvicorn's."""
    # One line per admission and per SVID: skip what the JSON lines never show (the caller's
    # file and line, thread, process), a fifth of each line's cost (Python's logging HOWTO,
    # "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3 warns of every retry the Kubernetes client makes; our own line says it once.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
