"""Client connections within limits (injector.server.limits): accepted by us, timed by us.

uvicorn accepts through the event loop's own server, which allows a TLS handshake 60 s, keeps a
connection that completed it and sends nothing (or half a header) for ever, lets httptools
buffer a header of any size and reads a body as slowly as it comes; and it accepts until the
process has no file descriptor left, when every other caller waits in the backlog. So:

- `Listener` accepts from the listening socket itself. A connection over the worker's limit, or
  over one address's share of it, is closed at once, before any TLS work; the others get their
  TLS handshake with a deadline (and a short one for the TLS close).
- `GuardedHttpToolsProtocol` is uvicorn's httptools protocol (with coalesced writes and the
  direct routes of `injector.server.direct`) that knows which phase its connection is in
  (waiting for a request, reading headers, reading the body, answering) and since when; it
  bounds the headers' size as they arrive.
- `ConnectionGuard` counts the connections and, once a second, cuts those past their phase's
  deadline. A sweep rather than a timer per request: the admission path only stores a number.
- `GuardedServer` is uvicorn's server with `Listener` in place of the loop's server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from injector.server import limits, memory
from injector.server.direct import DirectHttpToolsProtocol
from injector.server.httpio import json_error
from injector.server.limits import Limits
from injector.server.metrics import CONNECTIONS_OPEN

log = logging.getLogger("injector.connections")

# The phases of a connection, in order: waiting for a request's first byte, reading its request
# line and headers, reading its body, answering it (no deadline: the app's own work); and,
# once refused with an error, lingering: what the client still sends is read and dropped for a
# moment before the close, so that it reads the error rather than a reset.
WAITING, HEADERS, BODY, ANSWERING, LINGERING = range(5)

SWEEP_SECONDS = 1.0
# Accepted per wake-up of the listening socket, so that a flood of connections cannot keep the
# event loop from the requests of connections already open.
ACCEPT_BATCH = 64
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def _error_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response closing the connection, with a JSON `{"error"}`."""
    body = json_error(message)
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body])


class ConnectionGuard:
    """One worker's connections: how many are open (in all, and per address), and the sweep
    that cuts the ones past their deadline."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0
        self._per_peer: dict[str, int] = {}
        self._connections: set[GuardedHttpToolsProtocol] = set()
        self._sweeping: asyncio.TimerHandle | None = None

    def admit(self, peer: str) -> str | None:
        """Count a new connection from `peer`, or the reason to refuse it."""
        if self.open >= self.limits.max_connections:
            return "capacity"
        from_peer = self._per_peer.get(peer, 0)
        if from_peer >= self.limits.max_connections_per_peer:
            return "peer-capacity"
        self._per_peer[peer] = from_peer + 1
        self.open += 1
        CONNECTIONS_OPEN.inc()
        return None

    def release(self, peer: str) -> None:
        """A connection `admit` counted is closed."""
        self.open -= 1
        CONNECTIONS_OPEN.dec()
        remaining = self._per_peer[peer] - 1
        if remaining:
            self._per_peer[peer] = remaining
        else:
            del self._per_peer[peer]

    def track(self, connection: GuardedHttpToolsProtocol) -> None:
        self._connections.add(connection)
        if self._sweeping is None:
            self._sweeping = connection.loop.call_later(SWEEP_SECONDS, self._sweep,
                                                        connection.loop)

    def untrack(self, connection: GuardedHttpToolsProtocol) -> None:
        self._connections.discard(connection)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for connection in list(self._connections):
            connection.check_deadline(now)
        memory.return_freed_memory_if_due()
        self._sweeping = loop.call_later(SWEEP_SECONDS, self._sweep, loop)


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config, carrying the worker's ConnectionGuard to its protocols."""

    def __init__(self, app: Any, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard


class GuardedHttpToolsProtocol(DirectHttpToolsProtocol):
    """One connection, knowing its phase and since when (the guard's sweep reads them), its
    headers bounded in size as they arrive."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        guard = getattr(config, "guard", None)
        self.guard: ConnectionGuard = guard if guard is not None else ConnectionGuard(
            Limits.for_this_process())
        self.phase = WAITING
        self.since = 0.0
        self.answered = 0  # requests answered on this connection
        self.header_bytes = 0
        self.cut = False
        self._keep_alive_timer: asyncio.TimerHandle | None = None
        # Set by the Listener: called once, when the connection is gone.
        self.on_closed: Callable[[], None] | None = None

    # --- the connection ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.since = self.loop.time()
        self.guard.track(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        self.guard.untrack(self)
        if self.on_closed is not None:
            closed, self.on_closed = self.on_closed, None
            closed()

    def data_received(self, data: bytes) -> None:
        if self.phase > HEADERS:
            if self.phase != LINGERING:
                super().data_received(data)
            return
        # httptools keeps a header until its end arrives: count what it may be keeping.
        self.header_bytes += len(data)
        super().data_received(data)
        if (self.phase <= HEADERS and self.header_bytes > self.guard.limits.max_header_bytes
                and not self.cut):
            self.refuse(431, "header-too-large",
                        f"the request's headers exceed {self.guard.limits.max_header_bytes} "
                        "bytes", self.guard.limits.max_header_bytes)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to what httptools cannot parse, as JSON like every other error.
        self.transport.write(_error_response(400, msg))
        self.transport.close()

    # --- httptools' callbacks: the phase --------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.phase != WAITING:  # pipelined behind a request still being answered
            self.since = self.loop.time()
        self.phase = HEADERS

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.phase = BODY
        self.since = self.loop.time()
        self.header_bytes = 0

    def on_message_complete(self) -> None:
        answered_early = self.answered_early()
        self.phase = ANSWERING  # a direct route answers within the call below
        super().on_message_complete()
        if answered_early and self.phase == ANSWERING:
            # Answered before its body was read (413 by content-length, 503): the rest of the
            # body is read and dropped, and the connection waits for its next request, idle
            # within the keep-alive's limit. (Reading the rest cancelled uvicorn's keep-alive
            # timer: without this the connection was held open for ever.)
            self.phase = WAITING
            self.since = self.loop.time()
            if not self.transport.is_closing():
                self._keep_alive()

    def on_response_complete(self) -> None:
        # uvicorn's, but for its keep-alive timer (`_keep_alive`).
        self.server_state.total_requests += 1
        self.answered += 1
        if self.phase == ANSWERING:
            self.phase = WAITING
            self.since = self.loop.time()
        # In BODY, the answer went out before the body was read (a 413 by Content-Length):
        # uvicorn reads the rest and drops it, within the body's deadline.
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self.phase == WAITING:
            self._keep_alive()

    # --- keep-alive -------------------------------------------------------------------------

    def _keep_alive(self) -> None:
        """Close the connection once it has waited `timeout_keep_alive` for its next request
        since `since`. uvicorn arms a timer after every answer and cancels it at the next
        request's first byte: 1.5 us a request, for a timer that almost never fires. One
        timer at a time here: when it fires it closes the connection if it has been waiting
        long enough, else it is armed again for the rest."""
        if self._keep_alive_timer is None:
            self._keep_alive_timer = self.loop.call_later(self.timeout_keep_alive,
                                                          self._keep_alive_due)

    def _keep_alive_due(self) -> None:
        self._keep_alive_timer = None
        if self.cut or self.transport.is_closing() or self.phase != WAITING:
            return  # closing, or busy: its next answer arms the timer again
        left = self.since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._keep_alive_timer = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.transport.close()

    # --- deadlines --------------------------------------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Cut the connection if its phase has lasted past its limit (the guard's sweep)."""
        if self.cut or self.phase == ANSWERING:
            return
        bounds = self.guard.limits
        waited = now - self.since
        if self.phase == WAITING:
            if self.answered == 0 and waited > bounds.first_request_seconds:
                self.close("idle", bounds.first_request_seconds)
            elif waited > bounds.keep_alive_seconds + bounds.tls_close_seconds + SWEEP_SECONDS:
                self.close(None, None)  # uvicorn's keep-alive timer missed it: not a refusal
        elif self.phase == HEADERS:
            if waited > bounds.header_seconds:
                self.refuse(408, "header-timeout",
                            f"the request's headers took over {bounds.header_seconds:g} s",
                            bounds.header_seconds)
        elif waited > bounds.body_seconds:
            if self.answering_started():
                # Answered already (its body was being dropped): nothing more to say.
                self.close("body-timeout", bounds.body_seconds)
            else:
                self.refuse(408, "body-timeout",
                            f"the request's body took over {bounds.body_seconds:g} s",
                            bounds.body_seconds)

    def refuse(self, status: int, reason: str, message: str, limit: float | None = None
               ) -> None:
        """Answer `status` with a JSON error, the request unserved; linger, then close."""
        self.cut = True
        self.phase = LINGERING
        limits.refused(reason, self.client[0] if self.client else None, limit)
        self.transport.write(_error_response(status, message))
        self.abandon_direct()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app, if it is reading this request, sees the client gone: it stops, and
            # sends nothing.
            cycle.keep_alive = False
            cycle.disconnected = True
            cycle.message_event.set()
        self.flow.resume_reading()
        self.loop.call_later(self.guard.limits.tls_close_seconds, self.close, None, None)

    def close(self, reason: str | None, limit: float | None) -> None:
        """Close (TLS close_notify first), then drop the connection if that takes longer than
        the TLS close's limit: a peer that does not read cannot hold it open."""
        self.cut = True
        if reason is not None:
            limits.refused(reason, self.client[0] if self.client else None, limit)
        self.transport.close()
        self.loop.call_later(self.guard.limits.tls_close_seconds + SWEEP_SECONDS,
                             self._drop)

    def _drop(self) -> None:
        if self.parser is not None:  # connection_lost not called yet
            self.transport.abort()


class Listener:
    """Accepts a worker's connections from a listening socket (shared by every worker of
    `serve --workers`): the connection limits before any TLS work, then the handshake within
    its deadline, with the serving certificate's current context (rotated without a restart).
    Quacks like the asyncio Server uvicorn keeps, for its shutdown."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], Any],
                 tls_context: Callable[[], ssl.SSLContext], guard: ConnectionGuard,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._protocol_factory = protocol_factory
        self._tls_context = tls_context
        self._guard = guard
        self._loop = loop
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._closed = False
        sock.setblocking(False)
        self._start_accepting()

    def _start_accepting(self) -> None:
        if not self._closed and not self._accepting:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._accepting = True

    def _stop_accepting(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _OUT_OF_DESCRIPTORS:
                    # Accepting again at once would spin: wait for connections to close.
                    limits.refused("no-file-descriptors", None,
                                   self._guard.limits.no_file_descriptor_pause_seconds)
                    self._stop_accepting()
                    self._loop.call_later(self._guard.limits.no_file_descriptor_pause_seconds,
                                          self._start_accepting)
                    return
                # The peer gave up between the kernel's accept and ours (ECONNABORTED, ...).
                continue
            peer = str(address[0]) if isinstance(address, tuple) else "local"
            refusal = self._guard.admit(peer)
            if refusal is not None:
                connection.close()
                limits.refused(refusal, peer, self._guard.limits.max_connections
                               if refusal == "capacity"
                               else self._guard.limits.max_connections_per_peer)
                continue
            task = self._loop.create_task(self._handshake(connection, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, connection: socket.socket, peer: str) -> None:
        protocol = self._protocol_factory()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._guard.release(peer)

        protocol.on_closed = release
        deadline = self._guard.limits.handshake_seconds
        started = self._loop.time()
        try:
            await self._loop.connect_accepted_socket(
                lambda: protocol, connection, ssl=self._tls_context(),
                ssl_handshake_timeout=deadline,
                ssl_shutdown_timeout=self._guard.limits.tls_close_seconds)
        except BaseException as error:
            if protocol.transport is None:  # no connection_made, so no connection_lost comes
                release()
                # Closes the socket unless the transport holds it (then the transport does).
                connection.close()
            if isinstance(error, asyncio.CancelledError):
                raise
            if self._loop.time() - started >= deadline:
                limits.refused("handshake-timeout", peer, deadline)
            else:
                # A client that does not trust us, a port scanner: nothing to act on.
                log.debug("TLS handshake with %s failed: %s", peer, error.__class__.__name__)

    # The asyncio Server interface uvicorn's shutdown uses.

    def close(self) -> None:
        # The guard's sweep goes on: while uvicorn drains, a connection that stalls is still
        # cut on its deadline rather than holding the shutdown for its 20 s.
        self._closed = True
        self._stop_accepting()
        for task in self._handshakes:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)


class GuardedServer(uvicorn.Server):
    """uvicorn's server, accepting through `Listener` (run it with `sockets=`)."""

    def __init__(self, config: GuardedConfig, tls_context: Callable[[], ssl.SSLContext]
                 ) -> None:
        super().__init__(config)
        self._guard = config.guard
        self._tls_context = tls_context

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not sockets:
            raise ValueError("GuardedServer serves the sockets it is given")
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)  # as uvicorn's own startup does
        config = self.config
        loop = asyncio.get_running_loop()

        def create_protocol() -> Any:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state,
                _loop=loop)

        self.servers = [Listener(sock, create_protocol, self._tls_context, self._guard,  # type: ignore[misc]
                                 loop) for sock in sockets]
        self.started = True
