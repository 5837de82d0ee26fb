"""Callers that misbehave on purpose, over real sockets: connections that stall in every phase
of a request, bodies that trickle, headers without end. For the server's limits
(tests/server/test_connections.py) and the hostile-request benchmark (bench/bench_hostile.py).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def client_context(root_cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(root_cert))
    context.check_hostname = False
    return context


def tcp(port: int, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    """A TCP connection to the server on loopback, from `source` (any 127.x address)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def tls(port: int, root_cert: Path, source: str = "127.0.0.1",
        timeout: float = 10) -> ssl.SSLSocket:
    """A TLS connection to the server, handshake done."""
    return client_context(root_cert).wrap_socket(tcp(port, source, timeout),
                                                 server_hostname="localhost")


def status_of(response: bytes) -> int | None:
    """The status code of an HTTP/1.1 response's first line, if any."""
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


@dataclass
class Ending:
    """How a connection ended, seen by its client: after how long the server closed it (None:
    it never did, within the watch), and what it answered before."""

    closed_after: float | None = None
    response: bytes = b""
    error: str | None = None

    @property
    def status(self) -> int | None:
        return status_of(self.response)


class Stall(threading.Thread):
    """A connection scripted to stall: `open_connection` opens it (plain TCP or TLS), then
    `send` is called every `every` seconds with the count of calls so far and returns what to
    send (b"" for nothing); the thread records when the server closes the connection, and what
    it answered. It gives up after `watch_seconds`."""

    def __init__(self, open_connection: Callable[[], socket.socket],
                 send: Callable[[int], bytes] = lambda tick: b"", every: float = 0.5,
                 watch_seconds: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.open_connection = open_connection
        self.send = send
        self.every = every
        self.watch_seconds = watch_seconds
        self.ending = Ending()

    def run(self) -> None:
        started = time.monotonic()
        try:
            connection = self.open_connection()
        except OSError as error:
            self.ending.error = f"connect: {error}"
            self.ending.closed_after = time.monotonic() - started
            return
        with connection:
            connection.settimeout(self.every)
            tick = 0
            while time.monotonic() - started < self.watch_seconds:
                try:
                    data = self.send(tick)
                    if data:
                        connection.sendall(data)
                    tick += 1
                    chunk = connection.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                except OSError as error:  # reset, or a broken pipe while sending
                    self.ending.error = f"{type(error).__name__}: {error}"
                    self.ending.closed_after = time.monotonic() - started
                    return
                if not chunk:
                    self.ending.closed_after = time.monotonic() - started
                    return
                self.ending.response += chunk


def stream_until_answered(connection: ssl.SSLSocket, head: bytes, chunk: bytes,
                          total: int) -> tuple[bytes, int]:
    """Send `head`, then `chunk` again and again up to `total` bytes, stopping as soon as the
    server answers or closes; then read what it answered. The answer and the bytes sent."""
    connection.sendall(head)
    sent = len(head)
    answer = b""
    timeout = connection.gettimeout()
    while sent < total:
        readable, _, _ = select.select([connection], [], [], 0)
        if readable or connection.pending():
            # Maybe only TLS 1.3's session tickets: then there is nothing to read yet.
            connection.setblocking(False)
            try:
                answer = connection.recv(65536)
                break
            except ssl.SSLWantReadError:
                pass
            except OSError:
                break
            finally:
                connection.settimeout(timeout)
        try:
            connection.sendall(chunk)
        except OSError:
            break
        sent += len(chunk)
    connection.settimeout(10)
    with contextlib.suppress(OSError):
        while not (b"\r\n\r\n" in answer and _complete(answer)):
            data = connection.recv(65536)
            if not data:
                break
            answer += data
    return answer, sent


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0])
    return figures
