"""uvicorn's httptools protocol, writing each response in one piece.

uvicorn writes a response's head as soon as the app starts the response, and its body when the
app sends it: two TLS records and two system calls per response, and the client woken twice.
Here the protocol's transport keeps what is written during one pass of the event loop and
writes it at the end of the pass, so a head and body sent together (every answer of this
service) leave in one record and one system call. Closing or aborting writes or drops what is
pending first, so nothing is reordered or lost.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """A transport whose writes of one loop pass reach the real one as a single write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:
        # A stand-in with the transport's interface, not a subclass: uvicorn only calls it.
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
