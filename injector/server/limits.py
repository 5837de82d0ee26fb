"""What one caller may hold of a worker (connections, time, memory), and what happens when a
caller hits a limit: one counter, one log line per reason at most every 10 s.

The port is reachable from every pod, and with `failurePolicy: Fail` a replica that stops
answering stops pod creation in the cluster: so a caller that connects and sends nothing, sends
half a header, trickles a body or opens connections by the hundred is cut off on a deadline or
refused, never allowed to pile up file descriptors or memory. The values and what a caller sees
are listed in SECURITY.md ("Limits, and what a caller sees"); `injector.server.connections`
enforces them.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("injector.limits")

MAX_CONNECTIONS = 1000
# File descriptors kept for everything but client connections: the listener, the event loop,
# logs, the Kubernetes client's pool, files read on reload, the metrics files of --workers.
RESERVED_FILE_DESCRIPTORS = 64
LOG_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class Limits:
    """One worker's limits (SECURITY.md lists them with what the caller sees)."""

    max_connections: int = MAX_CONNECTIONS
    max_connections_per_peer: int = MAX_CONNECTIONS // 2
    handshake_seconds: float = 10.0
    # From the end of the handshake to the first byte of the first request.
    first_request_seconds: float = 5.0
    # Between two requests on one connection (uvicorn's own timer).
    keep_alive_seconds: float = 5.0
    # From the start of waiting for a request to the end of its headers, and their size.
    header_seconds: float = 10.0
    max_header_bytes: int = 64 * 1024
    # From the end of the headers to the end of the body.
    body_seconds: float = 10.0
    # Bodies being read at once by the worker's routes, in bytes.
    body_budget_bytes: int = 64 * 1024 * 1024
    # How long a closing TLS connection may take to flush and exchange close_notify.
    tls_close_seconds: float = 2.0
    # How long accepting pauses when the process has no file descriptor left.
    no_file_descriptor_pause_seconds: float = 0.5

    @classmethod
    def for_this_process(cls) -> Limits:
        """The defaults, with at most as many connections as the file-descriptor limit allows
        (less what the process needs for itself), and half of those for any one address."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        allowed = MAX_CONNECTIONS
        if soft != resource.RLIM_INFINITY:
            allowed = min(allowed, max(2, soft - RESERVED_FILE_DESCRIPTORS))
        return cls(max_connections=allowed, max_connections_per_peer=max(1, allowed // 2))


# What each reason means, for the log line (the counter's label is the reason itself).
REASONS = {
    "capacity": "too many open connections: refused before TLS",
    "peer-capacity": "too many open connections from one address: refused before TLS",
    "no-file-descriptors": "no file descriptor left: accepting paused",
    "handshake-timeout": "the TLS handshake did not finish in time: closed",
    "idle": "no request after the TLS handshake: closed",
    "header-timeout": "the request's headers did not arrive in time: 408, closed",
    "header-too-large": "the request's headers are too large: 431, closed",
    "body-timeout": "the request's body did not arrive in time: 408, closed",
    "body-budget": "too many request bodies being read at once: 503, closed",
}


class _Throttle:
    """One log line per reason at most every LOG_EVERY_SECONDS, with how many were not
    logged since: an attacker hitting a limit a thousand times a second must not fill the
    disk or the log pipeline."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def due(self, reason: str, now: float) -> int | None:
        """How many went unlogged since the last line, if a line is due now; else None."""
        if now - self._last.get(reason, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return None
        self._last[reason] = now
        return self._unlogged.pop(reason, 0)


_THROTTLE = _Throttle()
_COUNTERS: dict[str, Any] = {}


def count_refusals() -> None:
    """Make every reason's counter, at 0 until a refusal, so that /metrics lists them all.
    Not at import: prometheus_client must not be imported before `serve` has chosen its
    multiprocess mode (injector.server.wiring)."""
    from injector.server.metrics import CONNECTIONS_REFUSED

    for reason in REASONS:
        _COUNTERS[reason] = CONNECTIONS_REFUSED.labels(reason)


def refused(reason: str, peer: str | None, limit: float | int | None = None) -> None:
    """Count a refusal (`reason` from REASONS) and log it, unless a line for that reason went
    out within the last LOG_EVERY_SECONDS."""
    if not _COUNTERS:
        count_refusals()
    _COUNTERS[reason].inc()
    unlogged = _THROTTLE.due(reason, time.monotonic())
    if unlogged is None:
        return
    fields: dict[str, object] = {"reason": reason, "peer": peer or "unknown"}
    if limit is not None:
        fields["limit"] = limit
    if unlogged:
        fields["not_logged_since_last_line"] = unlogged
    log.warning("connection limit: %s", REASONS[reason], extra={"fields": fields})
