"""Connections within limits (injector.server.connections, SECURITY.md "Limits, and what a
caller sees"), against `injector serve` over real sockets: a caller that stalls in any phase
of a request is cut on that phase's deadline, one that opens connections by the hundred is
refused before TLS without locking others out, headers and bodies cannot pile up memory; each
with its counter in /metrics and a line in the log."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support import hostile
from tests.support.eventually import eventually
from tests.support.pods import pod, review
from tests.support.servers import Server, start_server, wait_until_serving

REFUSED = re.compile(rb'^injector_connections_refused_total\{reason="([a-z-]+)"\} (\S+)$', re.M)


def refusals(server: Server) -> dict[str, float]:
    with server.client() as client:
        text = client.get("/metrics").content
    return {reason.decode(): float(count) for reason, count in REFUSED.findall(text)}


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {reason: after[reason] - before.get(reason, 0.0) for reason in after
            if after[reason] > before.get(reason, 0.0)}


def limit_lines(server: Server) -> list[dict[str, object]]:
    lines = [orjson.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "injector.limits"]


def healthz(server: Server, source: str = "127.0.0.1", timeout: float = 5) -> int:
    transport = httpx.HTTPTransport(verify=server.ssl_context(), local_address=source)
    with httpx.Client(base_url=server.url, transport=transport, timeout=timeout) as client:
        return client.get("/healthz").status_code


def served(server: Server, source: str) -> bool:
    try:
        return healthz(server, source) == 200
    except (httpx.TransportError, ssl.SSLError):
        return False


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path)
    yield running
    running.stop()


def test_connections_that_stall_are_cut_at_each_phases_deadline(serve: Server) -> None:
    port, root = serve.port, serve.root_cert
    before = refusals(serve)
    request_head = b"POST /inject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    stalls = {
        # Never starts TLS, or sends half a ClientHello: 10 s for the handshake.
        "no-tls": hostile.Stall(lambda: hostile.tcp(port)),
        "half-hello": hostile.Stall(lambda: hostile.tcp(port),
                                    send=lambda tick: b"\x16\x03\x01\x02" if tick == 0 else b""),
        # TLS done, then nothing: 5 s for the first request's first byte.
        "silent": hostile.Stall(lambda: hostile.tls(port, root)),
        # Half a header, or a header that trickles on: 10 s for the request's headers.
        "half-header": hostile.Stall(lambda: hostile.tls(port, root),
                                     send=lambda tick: request_head if tick == 0 else b""),
        "trickled-header": hostile.Stall(
            lambda: hostile.tls(port, root), every=0.2,
            send=lambda tick: request_head if tick == 0 else b"x"),
        # Headers whole, then the body a byte at a time: 10 s for the body.
        "trickled-body": hostile.Stall(
            lambda: hostile.tls(port, root), every=0.2,
            send=lambda tick: request_head + b"content-length: 100000\r\n\r\n{" if tick == 0
            else b" "),
    }
    for stall in stalls.values():
        stall.start()
    # Meanwhile the service answers everyone else.
    assert healthz(serve) == 200
    for stall in stalls.values():
        stall.join(timeout=40)
    endings = {name: stall.ending for name, stall in stalls.items()}
    deadlines = {"no-tls": 10, "half-hello": 10, "silent": 5, "half-header": 10,
                 "trickled-header": 10, "trickled-body": 10}
    for name, deadline in deadlines.items():
        closed_after = endings[name].closed_after
        assert closed_after is not None, f"{name}: still open after 30 s"
        # The sweep runs once a second; the clients' own clocks start a little earlier.
        assert deadline - 1 <= closed_after <= deadline + 5, (name, closed_after)
    for name in ("half-header", "trickled-header", "trickled-body"):
        assert endings[name].status == 408, (name, endings[name].response[:200])
        assert b"connection: close" in endings[name].response
        assert "error" in orjson.loads(hostile.body_of(endings[name].response))
    for name in ("no-tls", "half-hello", "silent"):
        assert endings[name].response == b"", name

    counted = grown(before, refusals(serve))
    assert counted == {"handshake-timeout": 2, "idle": 1, "header-timeout": 2,
                       "body-timeout": 1}, counted
    logged = {line["reason"] for line in limit_lines(serve)}
    assert logged == {"handshake-timeout", "idle", "header-timeout", "body-timeout"}
    assert healthz(serve) == 200


def test_headers_without_end_get_431_and_are_not_kept(serve: Server) -> None:
    pid = serve.process.pid
    assert healthz(serve) == 200
    idle_kib = hostile.memory_kib(pid)["VmRSS"]
    before = refusals(serve)
    with hostile.tls(serve.port, serve.root_cert) as connection:
        answer, sent = hostile.stream_until_answered(
            connection, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: ",
            b"a" * 65536, total=200 * 1024 * 1024)
    assert hostile.status_of(answer) == 431, answer[:200]
    assert "65536 bytes" in orjson.loads(hostile.body_of(answer))["error"]
    assert sent < 16 * 1024 * 1024  # cut off early, not after the 200 MiB
    assert grown(before, refusals(serve)) == {"header-too-large": 1}
    assert hostile.memory_kib(pid)["VmHWM"] - idle_kib < 32 * 1024
    assert healthz(serve) == 200


@contextlib.contextmanager
def file_descriptor_limit(limit: int) -> Iterator[None]:
    """Processes started meanwhile inherit at most `limit` open files (serve's limits derive
    from it); this process's limit is back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def refused_at_once(connection: socket.socket, wait: float = 3) -> bool:
    """Whether the server closed this connection straight away (before any TLS)."""
    connection.settimeout(wait)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_flood_of_connections_is_refused_before_tls_and_locks_no_one_out(
        tmp_path: Path) -> None:
    # 128 files: 64 connections at most (the rest for the process), 32 from any one address.
    with file_descriptor_limit(128):
        server = start_server(tmp_path, wait_ready=False)
    try:
        wait_until_serving(server)
        before = refusals(server)
        held: list[socket.socket] = []
        try:
            # One address opens 100 connections and sends nothing: 32 are kept (until their
            # handshake's deadline), the others closed at once. (Not 127.0.0.1, whose
            # connections to /metrics may still be closing.)
            flood = [hostile.tcp(server.port, "127.0.0.5") for _ in range(100)]
            held += flood
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                closed = list(pool.map(refused_at_once, flood[32:]))
            assert all(closed), f"{closed.count(False)} of 68 were kept"
            # Another caller is served all the same.
            assert healthz(server, source="127.0.0.2") == 200
            # Others take the rest of the 64: then a newcomer is refused at once (not left
            # waiting for a file descriptor), and counted.
            held += [hostile.tcp(server.port, "127.0.0.3") for _ in range(32)]
            for _ in range(8):  # as many as the connections of the checks above still open
                newcomer = hostile.tcp(server.port, "127.0.0.4")
                held.append(newcomer)
                if refused_at_once(newcomer, wait=0.3):
                    break
            else:
                raise AssertionError("no connection refused with 64 open")
        finally:
            for connection in held:
                connection.close()
        # Once they are gone, everyone is served again.
        eventually(lambda: served(server, "127.0.0.2"), timeout=20,
                   what="served once the flood closed")
        counted = grown(before, refusals(server))
        assert counted.get("peer-capacity", 0) >= 68
        assert counted.get("capacity", 0) >= 1
        assert {"peer-capacity", "capacity"} <= {
            line["reason"] for line in limit_lines(server)}
    finally:
        server.stop()


def slow_admission(port: int, root: Path, body: bytes) -> hostile.Ending:
    """An admission of `body`, all but its last KiB sent at once, the rest a byte every 0.2 s:
    it never completes unless the server waits for ever."""
    head = (b"POST /inject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    first, rest = body[:-1024], body[-1024:]
    stall = hostile.Stall(lambda: hostile.tls(port, root, timeout=30), every=0.2,
                          send=lambda tick: head + first if tick == 0
                          else rest[tick - 1:tick], watch_seconds=40)
    stall.run()
    return stall.ending


def test_forty_slow_8_mib_bodies_are_bounded_and_their_memory_returned(serve: Server) -> None:
    pid = serve.process.pid
    assert healthz(serve) == 200
    idle_kib = hostile.memory_kib(pid)["VmRSS"]
    before = refusals(serve)
    body = orjson.dumps(review(pod(annotations={"filler": "x" * 8_000_000})))
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        running = [pool.submit(slow_admission, serve.port, serve.root_cert, body)
                   for _ in range(40)]
        time.sleep(3)
        # While they trickle, the service answers.
        assert healthz(serve) == 200
        endings = [future.result() for future in running]
    statuses = sorted(ending.status or 0 for ending in endings)
    # As many as the 64 MiB for bodies in memory allow are read, then cut off when their
    # body does not complete in 10 s; the others get 503 with retry-after at once (and the
    # rest of their body is dropped as it comes, until the same deadline).
    assert set(statuses) == {408, 503}, statuses
    assert statuses.count(408) <= 8
    for ending in endings:
        if ending.status == 503:
            assert b"retry-after: 1" in ending.response
        assert ending.closed_after is not None and ending.closed_after < 20
    counted = grown(before, refusals(serve))
    assert counted["body-budget"] == statuses.count(503)
    assert counted["body-timeout"] == 40
    peak_kib = hostile.memory_kib(pid)["VmHWM"]
    assert peak_kib - idle_kib < 200 * 1024, f"peak {peak_kib} KiB, idle {idle_kib} KiB"
    # And the memory goes back once they are gone (main kept 350 MB).
    eventually(lambda: hostile.memory_kib(pid)["VmRSS"] - idle_kib < 48 * 1024, timeout=20,
               what=f"RSS back near idle ({idle_kib} KiB): {hostile.memory_kib(pid)}")


def test_a_connection_answered_before_its_body_is_closed_once_idle(serve: Server) -> None:
    # 413 by content-length, before the body is read; the client sends it all the same (it is
    # read and dropped), then nothing: the keep-alive's 5 s hold as after any answer. They
    # did not: reading the rest had stopped uvicorn's timer, and the connection stayed open.
    size = 9 * 1024 * 1024
    connection = hostile.tls(serve.port, serve.root_cert, timeout=30)
    with connection:
        connection.sendall(b"POST /inject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                           b"\r\ncontent-length: %d\r\n\r\n" % size)
        connection.sendall(b" " * size)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += connection.recv(65536)
        assert hostile.status_of(answer) == 413
        idle_since = time.monotonic()
        connection.settimeout(20)
        with contextlib.suppress(ConnectionError):
            while connection.recv(65536):
                pass
        assert time.monotonic() - idle_since < 8  # 5 s, and the sweep's own second


def test_keep_alive_closes_a_connection_idle_5_s_and_only_then(serve: Server) -> None:
    # A connection used once a second stays open past the keep-alive's 5 s; idle, it is
    # closed 5 s after its last answer.
    request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    with hostile.tls(serve.port, serve.root_cert, timeout=15) as connection:
        started = time.monotonic()
        while time.monotonic() - started < 7:
            connection.sendall(request)
            answer = b""
            while not (b"\r\n\r\n" in answer and answer.endswith(b"}")):
                chunk = connection.recv(65536)
                assert chunk, f"closed after {time.monotonic() - started:.1f} s in use"
                answer += chunk
            assert hostile.status_of(answer) == 200
            time.sleep(1)
        idle_since = time.monotonic() - 1
        with contextlib.suppress(ConnectionError):
            while connection.recv(65536):
                pass
        assert 4.5 < time.monotonic() - idle_since < 7


def test_a_stalled_request_does_not_hold_a_shutdown_past_its_deadline(serve: Server) -> None:
    head = (b"POST /inject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100000\r\n\r\n{")
    stall = hostile.Stall(lambda: hostile.tls(serve.port, serve.root_cert), every=0.2,
                          send=lambda tick: head if tick == 0 else b" ")
    stall.start()
    eventually(lambda: stall.ending.response == b"" and stall.is_alive(), timeout=5)
    time.sleep(1)  # the body is being trickled
    stopping = time.monotonic()
    serve.process.terminate()
    # uvicorn would wait 20 s for it; the body's own deadline (10 s) cuts it first.
    serve.process.wait(timeout=30)
    assert time.monotonic() - stopping < 15
    assert serve.process.returncode == 0
    stall.join(timeout=30)
    assert stall.ending.status == 408


def test_no_file_descriptor_left_pauses_accepting_and_says_so(serve: Server) -> None:
    before = refusals(serve)
    # Fewer files than the 1,000 connections serve allows: the kernel refuses before we do.
    soft, hard = resource.prlimit(serve.process.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(serve.process.pid, resource.RLIMIT_NOFILE, (48, hard))
    held: list[socket.socket] = []
    try:
        held += [hostile.tcp(serve.port, "127.0.0.6") for _ in range(64)]
        eventually(lambda: any(line["reason"] == "no-file-descriptors"
                               for line in limit_lines(serve)), timeout=10,
                   what="accepting paused, and said")
        assert serve.process.poll() is None
    finally:
        for connection in held:
            connection.close()
        resource.prlimit(serve.process.pid, resource.RLIMIT_NOFILE, (soft, hard))
    # Accepting resumes once files are free again.
    eventually(lambda: served(serve, "127.0.0.2"), timeout=20, what="served again")
    assert grown(before, refusals(serve)).get("no-file-descriptors", 0) >= 1
