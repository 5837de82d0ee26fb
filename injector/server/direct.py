"""Routes answered by the connection itself, without ASGI: `POST /inject`.

An admission is answered synchronously once its body is in hand, and the ASGI machinery around
it (a RequestResponseCycle, a task, the receive and send coroutines, two messages and the
routing of `injector.server.asgi`) cost a fifth of an admission over HTTPS, as much as parsing
and injecting the pod (bench/bench_http.py). Here uvicorn's httptools protocol hands such a
request to its route as soon as the body is complete, and writes the answer in one piece.

What a caller sees is the same as through ASGI (`injector.server.asgi.FastRoutes`, which still
serves such a route when it is pipelined behind another request, or behind a root path): the
same answers and headers (uvicorn's `date` included), a body refused by its `content-length`
before it is read (413), a body that does not come in one read held within the worker's
BODY_BUDGET (503 with `retry-after`), `100 Continue` when asked for, `connection: close` for
HTTP/1.0 or when asked, and the rest of a body answered early read and dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from injector.server import httpio, limits
from injector.server.coalesce import CoalescingHttpToolsProtocol
from injector.server.httpio import BUSY_HEADERS, json_error

log = logging.getLogger("injector")

_JSON_HEAD = b"content-type: application/json\r\ncontent-length: %d\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class DirectRoute(Protocol):
    """A route the connection answers: synchronous, given the whole body (at most
    `max_body_bytes`), answering a status and a JSON body."""

    max_body_bytes: int

    def answer(self, body: bytes, started: float) -> tuple[int, bytes]:
        """The answer to a body; `started` is when its headers were read (perf_counter)."""

    def too_large(self) -> tuple[int, bytes]:
        """The answer to a body over `max_body_bytes`."""

    def busy(self) -> tuple[int, bytes]:
        """The answer when BODY_BUDGET has no room for the body (sent with BUSY_HEADERS)."""


# Direct routes by method and raw path, as httptools gives them.
DirectRoutes = Mapping[tuple[bytes, bytes], DirectRoute]


class _Request:
    """A direct route's request being read."""

    __slots__ = ("answered", "chunks", "declared", "keep_alive", "reserved", "route", "size",
                 "started")

    def __init__(self, route: DirectRoute, declared: int | None, keep_alive: bool) -> None:
        self.route = route
        self.declared = declared
        self.keep_alive = keep_alive
        self.started = time.perf_counter()
        self.chunks: list[bytes] = []
        self.size = 0
        self.reserved = 0  # taken from BODY_BUDGET
        self.answered = False  # then what still comes of the body is dropped


class DirectHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's httptools protocol (with coalesced writes) that answers the app's
    `direct_routes` itself; every other request goes to the app as before."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        routes: DirectRoutes = getattr(self.app, "direct_routes", None) or {}
        # Behind a root path the app sees other paths: ASGI only, then.
        self.direct_routes = routes if not self.root_path else {}
        self.direct: _Request | None = None

    # --- httptools' callbacks -------------------------------------------------------------

    def on_headers_complete(self) -> None:
        route = self._direct_route() if self.direct_routes else None
        if route is None:
            super().on_headers_complete()
            return
        declared = None
        for name, value in self.headers:
            if name == b"content-length":
                if value.isdigit():
                    declared = int(value)
                break
        keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() != "1.0"
        request = self.direct = _Request(route, declared, keep_alive)
        if declared is not None and declared > route.max_body_bytes:
            self._answer(request, *route.too_large())
        elif self.expect_100_continue:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        request = self.direct
        if request is None:
            super().on_body(body)
            return
        if request.answered:
            return  # answered early: dropped
        request.size += len(body)
        if request.size > request.route.max_body_bytes:
            self._answer(request, *request.route.too_large())
            return
        request.chunks.append(body)

    def on_message_complete(self) -> None:
        request = self.direct
        if request is None:
            super().on_message_complete()
            return
        self.direct = None
        if request.answered:
            return
        body = request.chunks[0] if len(request.chunks) == 1 else b"".join(request.chunks)
        try:
            status, answer = request.route.answer(body, request.started)
        except Exception:
            # A bug must not leak a traceback to the caller; the log keeps it.
            log.exception("internal error")
            status, answer = 500, json_error("internal error")
        self._answer(request, status, answer)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        request = self.direct
        if request is not None and not request.answered and request.size > request.reserved:
            # Not all of the body came in this read: it is held until the rest comes.
            self._reserve(request)

    # --- the connection ---------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.abandon_direct()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        request = self.direct
        if request is None or request.answered:
            super().shutdown()
        else:
            request.keep_alive = False  # answered, then closed

    def abandon_direct(self) -> None:
        """Drop the direct request being read, unanswered (the client left, or was cut)."""
        request, self.direct = self.direct, None
        if request is not None:
            request.answered = True
            self._release(request)

    def answered_early(self) -> bool:
        """Whether the request being read has its answer already, its body not all read."""
        if self.direct is not None:
            return self.direct.answered
        return self.cycle is not None and self.cycle.response_complete

    def answering_started(self) -> bool:
        """Whether the request being read was answered already (early, its body unread)."""
        if self.direct is not None:
            return self.direct.answered
        return self.cycle is not None and self.cycle.response_started

    # --- helpers ----------------------------------------------------------------------------

    def _direct_route(self) -> DirectRoute | None:
        # Behind a request still being answered (pipelined), uvicorn queues: ASGI keeps order.
        if self.cycle is not None and not self.cycle.response_complete:
            return None
        # The path, without the query the API server adds (`/inject?timeout=10s`); a target in
        # another form (absolute, %-encoded) goes to the app, which decodes it.
        path = self.url.partition(b"?")[0]
        route = self.direct_routes.get((self.parser.get_method(), path))
        if route is None or self.parser.should_upgrade():
            return None
        return route

    def _reserve(self, request: _Request) -> None:
        """Take the body's room from BODY_BUDGET as httpio.receive_body does: its declared
        length, else its size so far, growing by steps; BUSY when there is none."""
        budget = httpio.BODY_BUDGET
        limit = request.route.max_body_bytes
        if request.reserved == 0:
            wanted = request.declared if request.declared is not None else request.size
        else:
            wanted = min(max(request.size - request.reserved, httpio.RESERVE_STEP),
                         limit - request.reserved)
        if budget.take(wanted):
            request.reserved += wanted
            return
        limits.refused("body-budget", self.client[0] if self.client else None, budget.limit)
        self._answer(request, *request.route.busy(), BUSY_HEADERS)

    def _release(self, request: _Request) -> None:
        request.chunks = []
        if request.reserved:
            httpio.BODY_BUDGET.give_back(request.reserved)
            request.reserved = 0

    def _answer(self, request: _Request, status: int, body: bytes,
                headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Write the whole response at once, as uvicorn would for the same ASGI messages."""
        request.answered = True
        self._release(request)
        parts = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(_JSON_HEAD % len(body))
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not request.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        # Through the coalescing transport, which writes at the end of the loop's pass: the
        # answers of a pass leave together, and the client is woken once for them rather than
        # once for each (a write at once cost 1.6 times the CPU per admission under load, in
        # waking the client's thread: bench/bench_http.py, concurrency 16).
        self.transport.write(b"".join(parts))
        if not request.keep_alive:
            self.transport.close()
        self.on_response_complete()
