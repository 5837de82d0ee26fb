"""Unary gRPC over HTTP/2 and TLS, served on the worker's own event loop: what the CA's one gRPC
method (injector.server.grpc_ca) needs, without grpcio's C core.

grpcio's server costs `serve` 14.3 MiB of idle RSS (its 17 MB shared library, its threads);
the CA serves one unary method, so this serves unary calls only, with `h2`'s HTTP/2 state machine
(pure Python, 1.35 MiB) on the event loop that serves HTTPS; each call's handler is a coroutine
on that loop (the CA's sends only what blocks, a TokenReview, to threads, as its HTTPS route
does). The limits grpcio was given, kept:

- TLS 1.2+ with the serving certificate's suites (injector.server.tls), ALPN `h2`; a handshake
  that has not finished within HANDSHAKE_TIMEOUT_SECONDS closes the connection;
- at most MAX_STREAMS_PER_CONNECTION calls at once on a connection (HTTP/2's
  SETTINGS_MAX_CONCURRENT_STREAMS) and MAX_CONCURRENT_CALLS in the server; past that,
  RESOURCE_EXHAUSTED at once;
- a message over `max_message_bytes` is RESOURCE_EXHAUSTED as soon as its length prefix says so,
  before it is read; metadata over `max_metadata_bytes` (HTTP/2's header list size) likewise;
- a connection with no call for MAX_CONNECTION_IDLE_SECONDS is closed (GOAWAY);
- on stop, new connections are refused, open ones are told GOAWAY, and calls in flight get
  their answers within the grace period.

gRPC's framing (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md): a call is a
POST to /<service>/<method> with `content-type: application/grpc`; its message is prefixed by
a compressed flag (1 byte) and a length (4 bytes, big-endian); the answer is HEADERS, DATA, then
trailers carrying `grpc-status` and `grpc-message`, or trailers only when it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

log = logging.getLogger("injector.ca")
# hpack logs every header it decodes at debug level, the bearer token among them: never, even
# under --log-level debug.
logging.getLogger("hpack").setLevel(logging.WARNING)
logging.getLogger("h2").setLevel(logging.WARNING)

HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0
MAX_CONNECTION_IDLE_SECONDS: Final = 300.0
MAX_STREAMS_PER_CONNECTION: Final = 16
MAX_CONCURRENT_CALLS: Final = 256
ACCEPT_PAUSE_SECONDS: Final = 0.5
# Streams a client may open and cancel on one connection before it is closed with GOAWAY
# ENHANCE_YOUR_CALM: HTTP/2's "rapid reset" (CVE-2023-44487) opens and cancels streams as fast
# as it can write them, each costing this event loop (the admissions' too) and the caller
# nothing. Istio's client cancels a call only on its deadline: a handful at most.
MAX_RESETS_PER_CONNECTION: Final = 64
# Frames that carry no call (PING, SETTINGS, WINDOW_UPDATE, PRIORITY, unknown ones) a
# connection may send in one second: a flood of them (each PING answered) would hold the event
# loop as rapid reset does. A client sends a few around each call.
MAX_CONTROL_FRAMES_PER_SECOND: Final = 256
_CONTROL_EVENTS: Final = (h2.events.PingReceived, h2.events.RemoteSettingsChanged,
                          h2.events.WindowUpdated, h2.events.PriorityUpdated,
                          h2.events.UnknownFrameReceived)
# What h2 is given to parse at a time, so that a read full of tiny frames (256 KiB of them is
# thousands of streams) is checked against the limits above between slices, not after.
_RECEIVE_SLICE_BYTES: Final = 16 * 1024
# Past this the header block is not even decoded: the connection is closed (hpack's bound).
_HEADER_LIST_HARD_LIMIT: Final = 64 * 1024
_PREFIX_BYTES: Final = 5


class Status(enum.IntEnum):
    """gRPC's status codes used here (their numbers are the protocol's)."""

    OK = 0
    INVALID_ARGUMENT = 3
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(frozen=True)
class Call:
    """What a handler gets: the request message's bytes, the call's metadata (text keys only,
    the first value of each, lower-case names) and the client's address (None if unknown)."""

    message: bytes
    metadata: Mapping[str, str]
    peer: str | None


@dataclass(frozen=True)
class Reply:
    """A handler's answer: the response message's bytes when OK; else the status and its
    details; `trailers`, more trailing metadata (`retry-after`, say)."""

    status: Status = Status.OK
    message: bytes = b""
    details: str = ""
    trailers: Sequence[tuple[str, str]] = ()


Handler = Callable[[Call], Awaitable[Reply]]


def _grpc_message(details: str) -> str:
    """grpc-message's percent-encoding: UTF-8, printable ASCII but '%' as is."""
    return urllib.parse.quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclass
class _Stream:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    answered: bool = False


class GrpcServer:
    """Unary methods by path ("/package.Service/Method"), served on `listener` (bound, not yet
    listening) once `serve()` runs on the event loop, until it is cancelled."""

    def __init__(self, listener: socket.socket, methods: Mapping[str, Handler],
                 tls_context: Callable[[], ssl.SSLContext], *, max_message_bytes: int,
                 max_metadata_bytes: int, stop_grace_seconds: float) -> None:
        self._listener = listener
        self._methods = dict(methods)
        self._tls_context = tls_context
        self.max_message_bytes = max_message_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self._stop_grace_seconds = stop_grace_seconds
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls: set[asyncio.Task[Reply]] = set()
        self.calls_in_flight = 0

    def start_call(self, handler: Handler, call: Call) -> asyncio.Task[Reply]:
        async def run() -> Reply:
            return await handler(call)

        task = asyncio.create_task(run())
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return task

    def method(self, path: str) -> Handler | None:
        return self._methods.get(path)

    async def serve(self) -> None:
        """Accept and serve until cancelled; then stop gracefully (see the module)."""
        loop = asyncio.get_running_loop()
        self._listener.listen(1024)
        self._listener.setblocking(False)
        try:
            while True:
                try:
                    connection, _ = await loop.sock_accept(self._listener)
                except OSError as error:
                    # No file descriptor left, say: accepting pauses, and goes on.
                    log.warning("gRPC accept failed (%s): pausing %.1f s", error,
                                ACCEPT_PAUSE_SECONDS)
                    await asyncio.sleep(ACCEPT_PAUSE_SECONDS)
                    continue
                task = asyncio.create_task(self._handshake(loop, connection))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self._listener.close()
            await asyncio.shield(self._stop())

    async def _handshake(self, loop: asyncio.AbstractEventLoop,
                         connection: socket.socket) -> None:
        protocol = _Connection(self)
        try:
            await loop.connect_accepted_socket(
                lambda: protocol, connection, ssl=self._tls_context(),
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS)
        except Exception as error:
            # A client that does not trust us, a port scanner, one that never says hello.
            log.debug("gRPC TLS handshake failed: %s", error.__class__.__name__)
            if protocol.transport is None:
                connection.close()

    async def _stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for connection in list(self._connections):
            connection.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._stop_grace_seconds
        while self.calls_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for call in list(self._calls):
            call.cancel()
        for connection in list(self._connections):
            connection.abort()

    def opened(self, connection: _Connection) -> None:
        self._connections.add(connection)

    def closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)


class _Connection(asyncio.Protocol):
    """One client's HTTP/2 connection: its calls, answered as their handlers finish."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self._streams: dict[int, _Stream] = {}
        self._peer: str | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._going_away = False
        self._resets = 0
        self._control_second = 0
        self._control_frames = 0

    # --- asyncio's callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's, not a subclass
        peername = self.transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self._peer = str(peername[0])
        self._server.opened(self)
        self._h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS_PER_CONNECTION,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _HEADER_LIST_HARD_LIMIT,
        })
        self._h2.initiate_connection()
        self._flush()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.closed(self)
        if self._idle is not None:
            self._idle.cancel()
        self._streams.clear()

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), _RECEIVE_SLICE_BYTES):
            try:
                events = self._h2.receive_data(bytes(view[start:start + _RECEIVE_SLICE_BYTES]))
            except h2.exceptions.ProtocolError as error:
                log.debug("gRPC connection from %s broke HTTP/2: %s", self._peer, error)
                self._flush()
                self.abort()
                return
            for event in events:
                self._on_event(event)
            flood = self._flood()
            if flood:
                log.info("gRPC connection from %s closed: %s", self._peer, flood)
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._h2.close_connection(
                        error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                self._flush()
                if self.transport is not None:
                    self.transport.close()  # reads no more; the GOAWAY still goes out
                return
            if self.transport is None or self.transport.is_closing():
                return
        self._flush()

    def _flood(self) -> str:
        """Why this connection is to be cut off as a flood, or "" when it is not."""
        if self._resets > MAX_RESETS_PER_CONNECTION:
            return f"more than {MAX_RESETS_PER_CONNECTION} streams cancelled"
        if self._control_frames > MAX_CONTROL_FRAMES_PER_SECOND:
            return f"more than {MAX_CONTROL_FRAMES_PER_SECOND} control frames in a second"
        return ""

    def _count_control_frame(self) -> None:
        second = int(time.monotonic())
        if second != self._control_second:
            self._control_second, self._control_frames = second, 0
        self._control_frames += 1

    # --- HTTP/2 events -----------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._on_end(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._streams.pop(event.stream_id, None)
            if event.remote_reset:
                self._resets += 1
            self._arm_idle()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.go_away()
        elif isinstance(event, _CONTROL_EVENTS):
            self._count_control_frame()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None and event.headers is not None
        stream = _Stream()
        self._streams[event.stream_id] = stream
        self._arm_idle()
        size = 0
        for name, value in event.headers:
            raw_name = name if isinstance(name, bytes) else name.encode()
            raw_value = value if isinstance(value, bytes) else value.encode()
            size += len(raw_name) + len(raw_value) + 32  # RFC 7540's header list size
            key = raw_name.decode("latin-1")
            if key.endswith("-bin"):
                continue  # binary metadata: none of it is read
            stream.headers.setdefault(key, raw_value.decode("utf-8", "replace"))
        headers = stream.headers
        if self._going_away:
            self._refuse(event.stream_id, stream, Status.UNAVAILABLE, "the server is stopping")
        elif headers.get(":method") != "POST" or not headers.get(
                "content-type", "").startswith("application/grpc"):
            self._answer_http(event.stream_id, stream, "415")
        elif size > self._server.max_metadata_bytes:
            self._refuse(event.stream_id, stream, Status.RESOURCE_EXHAUSTED,
                         f"metadata of {size} bytes is over {self._server.max_metadata_bytes}")
        elif self._server.method(headers.get(":path", "")) is None:
            self._refuse(event.stream_id, stream, Status.UNIMPLEMENTED,
                         f"no method {headers.get(':path', '')[:200]!r}")

    def _on_data(self, event: h2.events.DataReceived) -> None:
        assert event.stream_id is not None
        # The window is handed back for everything read, answered or not.
        self._h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.answered:
            return
        stream.body += event.data or b""
        if len(stream.body) >= _PREFIX_BYTES:
            length = int.from_bytes(stream.body[1:_PREFIX_BYTES], "big")
            if length > self._server.max_message_bytes:
                self._refuse(event.stream_id, stream, Status.RESOURCE_EXHAUSTED,
                             f"message of {length} bytes is over "
                             f"{self._server.max_message_bytes}")
            elif len(stream.body) > _PREFIX_BYTES + length:
                self._refuse(event.stream_id, stream, Status.UNIMPLEMENTED,
                             "more than one request message in a unary call")

    def _on_end(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.answered:
            return
        body = bytes(stream.body)
        if len(body) < _PREFIX_BYTES or len(body) != _PREFIX_BYTES + int.from_bytes(
                body[1:_PREFIX_BYTES], "big"):
            self._refuse(stream_id, stream, Status.INVALID_ARGUMENT,
                         "the call did not carry exactly one request message")
            return
        if body[0] != 0:
            self._refuse(stream_id, stream, Status.UNIMPLEMENTED,
                         "compressed messages are not accepted")
            return
        handler = self._server.method(stream.headers.get(":path", ""))
        if handler is None:  # answered when the headers came
            return
        if self._server.calls_in_flight >= MAX_CONCURRENT_CALLS:
            self._refuse(stream_id, stream, Status.RESOURCE_EXHAUSTED,
                         f"more than {MAX_CONCURRENT_CALLS} calls at once")
            return
        metadata = {key: value for key, value in stream.headers.items()
                    if not key.startswith(":")}
        call = Call(body[_PREFIX_BYTES:], metadata, self._peer)
        self._server.calls_in_flight += 1
        task = self._server.start_call(handler, call)
        task.add_done_callback(lambda done: self._handled(stream_id, done))

    def _handled(self, stream_id: int, done: asyncio.Future[Reply]) -> None:
        self._server.calls_in_flight -= 1
        error = None if done.cancelled() else done.exception()
        if error is not None:  # a bug: the CA's handler answers every refusal itself
            log.error("gRPC handler failed", exc_info=error)
        stream = self._streams.get(stream_id)
        if stream is None or stream.answered or self.transport is None \
                or self.transport.is_closing():
            return  # the client went away, or reset the call
        if done.cancelled() or error is not None:
            self._refuse(stream_id, stream, Status.INTERNAL, "internal error")
        else:
            self._reply(stream_id, stream, done.result())
        self._flush()

    # --- answers -----------------------------------------------------------------------------

    def _reply(self, stream_id: int, stream: _Stream, reply: Reply) -> None:
        if reply.status != Status.OK:
            self._refuse(stream_id, stream, reply.status, reply.details, reply.trailers)
            return
        stream.answered = True
        try:
            self._h2.send_headers(stream_id, [(":status", "200"),
                                              ("content-type", "application/grpc")])
            framed = b"\0" + len(reply.message).to_bytes(4, "big") + reply.message
            self._send_data(stream_id, framed)
            self._h2.send_headers(stream_id, [("grpc-status", "0"), *reply.trailers],
                                  end_stream=True)
        except h2.exceptions.H2Error as error:
            log.debug("gRPC answer not sent: %s", error)
        self._done(stream_id)

    def _send_data(self, stream_id: int, data: bytes) -> None:
        """The answer's bytes, within the frame size. An answer is a few KiB, well within the
        65,535 bytes every HTTP/2 window starts with; one that does not fit is cut short
        (the client sees the call fail) rather than held."""
        frame = self._h2.max_outbound_frame_size
        window = self._h2.local_flow_control_window(stream_id)
        if len(data) > window:
            raise h2.exceptions.FlowControlError(
                f"answer of {len(data)} bytes over the client's window of {window}")
        for start in range(0, len(data), frame):
            self._h2.send_data(stream_id, data[start:start + frame])

    def _refuse(self, stream_id: int, stream: _Stream, status: Status, details: str,
                trailers: Sequence[tuple[str, str]] = ()) -> None:
        """A trailers-only answer: the status, its details and `trailers`."""
        stream.answered = True
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.send_headers(stream_id, [
                (":status", "200"), ("content-type", "application/grpc"),
                ("grpc-status", str(int(status))), ("grpc-message", _grpc_message(details)),
                *trailers], end_stream=True)
        self._done(stream_id)

    def _answer_http(self, stream_id: int, stream: _Stream, status: str) -> None:
        """Not a gRPC call at all: an HTTP status, as gRPC's servers answer."""
        stream.answered = True
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.send_headers(stream_id, [(":status", status)], end_stream=True)
        self._done(stream_id)

    def _done(self, stream_id: int) -> None:
        """The answer is sent; what the client still sends on the stream is read and dropped
        (its flow-control window handed back), until it ends or resets it."""
        self._streams.pop(stream_id, None)
        self._arm_idle()
        if self._going_away and not self._busy():
            self._close()

    def _busy(self) -> bool:
        return any(not stream.answered for stream in self._streams.values())

    # --- the connection's life -----------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self._busy() and self.transport is not None:
            self._idle = asyncio.get_running_loop().call_later(
                MAX_CONNECTION_IDLE_SECONDS, self.go_away)

    def go_away(self) -> None:
        """No new calls on this connection (refused UNAVAILABLE, which clients retry); closed
        with a GOAWAY once the calls in flight are answered (h2 sends nothing after one)."""
        if self.transport is None or self.transport.is_closing():
            return
        self._going_away = True
        if not self._busy():
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.close_connection()
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
