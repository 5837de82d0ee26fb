"""Each response leaves in one piece: on the wire (TLS records) and at the transport."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl

from injector.server.coalesce import _CoalescingTransport
from tests.support.pods import pod, review
from tests.support.servers import Server

APPLICATION_DATA = 23


class Recorded:
    """The transport under the coalescing one: what reached it, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


def on_a_loop(steps: object) -> Recorded:
    under = Recorded()

    async def run() -> None:
        await steps(_CoalescingTransport(under, asyncio.get_running_loop()), under)  # type: ignore[operator]

    asyncio.run(run())
    return under


def test_writes_of_one_pass_reach_the_transport_as_one_write_after_it() -> None:
    async def steps(transport: _CoalescingTransport, under: Recorded) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"{}")
        assert transport.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\n{}")
        assert under.calls == []
        await asyncio.sleep(0)
        transport.write(b"next")
        await asyncio.sleep(0)

    assert on_a_loop(steps).calls == [("write", b"HTTP/1.1 200 OK\r\n\r\n{}"), ("write", b"next")]


def test_close_writes_what_is_pending_first_and_abort_drops_it() -> None:
    async def closing(transport: _CoalescingTransport, under: Recorded) -> None:
        transport.write(b"last answer")
        transport.close()

    assert on_a_loop(closing).calls == [("write", b"last answer"), ("close", b"")]

    async def aborting(transport: _CoalescingTransport, under: Recorded) -> None:
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)

    assert on_a_loop(aborting).calls == [("abort", b"")]


def test_nothing_is_written_to_a_transport_already_closing() -> None:
    async def steps(transport: _CoalescingTransport, under: Recorded) -> None:
        transport.write(b"too late")
        under.closing = True  # the peer went away meanwhile
        await asyncio.sleep(0)

    assert on_a_loop(steps).calls == []


class TlsWire:
    """A TLS 1.2 client over a plain socket that sees the server's records as sent."""

    def __init__(self, server: Server) -> None:
        context = server.ssl_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # record types in the clear
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.raw = bytearray()
        self.record_types: list[int] = []
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send()
                self._receive()
        self._send()
        self.record_types.clear()

    def _send(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        self.raw += data
        while len(self.raw) >= 5 and len(self.raw) >= 5 + int.from_bytes(self.raw[3:5], "big"):
            self.record_types.append(self.raw[0])
            del self.raw[:5 + int.from_bytes(self.raw[3:5], "big")]
        self.incoming.write(data)

    def exchange(self, request: bytes, answers: int = 1) -> list[bytes]:
        """Send `request`; the bodies of the next `answers` responses."""
        self.tls.write(request)
        self._send()
        received, bodies = b"", []
        while len(bodies) < answers:
            try:
                received += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._receive()
                continue
            while b"\r\n\r\n" in received:
                head, rest = received.split(b"\r\n\r\n", 1)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(rest) < length:
                    break
                bodies.append(rest[:length])
                received = rest[length:]
        return bodies

    def close(self) -> None:
        self.sock.close()


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_an_admission_answer_is_one_tls_record(server: Server) -> None:
    wire = TlsWire(server)
    try:
        for name in ("first", "second"):  # keep-alive: every answer, not just the first
            wire.record_types.clear()
            body = json.dumps(review(pod(name=name))).encode()
            (answer,) = wire.exchange(post("/inject", body))
            assert "patch" in json.loads(answer)["response"]
            assert wire.record_types == [APPLICATION_DATA]
    finally:
        wire.close()


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    wire = TlsWire(server)
    try:
        bodies = [json.dumps(review(pod(name=f"pod-{index}"))).encode() for index in range(3)]
        answers = wire.exchange(b"".join(post("/inject", body) for body in bodies), answers=3)
        assert [json.loads(answer)["response"]["uid"] for answer in answers] == [
            json.loads(body)["request"]["uid"] for body in bodies]
    finally:
        wire.close()
