"""HTTP plumbing shared by the routes: bounded request bodies, JSON errors and their OpenAPI.

Bodies are read straight from ASGI `receive`, refused as soon as they are known to be too
large (by Content-Length, or while streaming) and before any parsing: the admission hot path
and the CA alike. What all the bodies being read at once may hold is bounded too (BODY_BUDGET).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi.responses import Response

from injector.server import limits


class TooLarge:
    """The marker `receive_body` returns for a body over its limit."""


class Busy:
    """The marker `receive_body` returns when the worker already holds as many request bodies
    in memory as it allows (BODY_BUDGET): the caller gets 503 and comes back later."""


TOO_LARGE = TooLarge()
BUSY = Busy()

# What a route answers for BUSY: retry in a second. The rest of the body is read and dropped
# (uvicorn's way with a body not read), within the body's deadline (injector.server.limits).
BUSY_STATUS = 503
BUSY_HEADERS = [(b"retry-after", b"1")]
BUSY_MESSAGE = "the server is reading too many request bodies at once; retry"


class BodyBudget:
    """The bytes of request bodies that a worker's routes may hold while reading them.

    Each body is bounded on its own (8 MiB for /inject), but forty slow 8 MiB bodies at once
    would hold 320 MiB: the budget bounds their sum. A body that arrives in one message (every
    ordinary request: uvicorn hands over up to 64 KiB at once) is already in memory and takes
    nothing from it; a longer one reserves its declared length up front, or its size as it
    grows when it has none.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        # When a body of a megabyte or more was last given back (time.monotonic()): the
        # memory it leaves behind is worth handing back to the system (injector.server.memory).
        self.last_big_body = -1.0

    def take(self, size: int) -> bool:
        if self.in_use + size > self.limit:
            return False
        self.in_use += size
        return True

    def give_back(self, size: int) -> None:
        self.in_use -= size
        if size >= BIG_BODY_BYTES:
            self.last_big_body = time.monotonic()


BIG_BODY_BYTES = 1024 * 1024
# Reserve in steps, not per chunk: a body without a length grows by up to 64 KiB a message.
RESERVE_STEP = 256 * 1024

BODY_BUDGET = BodyBudget(64 * 1024 * 1024)


async def receive_body(scope: Any, receive: Any, limit: int
                       ) -> bytes | TooLarge | Busy | None:
    """The whole body; TOO_LARGE past `limit` bytes; BUSY when BODY_BUDGET has no room for it;
    None if the client went away.

    Markers rather than exceptions: this runs for every admission.
    """
    declared = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit():
                declared = int(value)
                if declared > limit:
                    return TOO_LARGE
            break
    message = await receive()
    if message["type"] != "http.request":
        return None
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else TOO_LARGE
    return await _receive_rest(scope, receive, body, declared, limit)


async def _receive_rest(scope: Any, receive: Any, first: bytes, declared: int | None,
                        limit: int) -> bytes | TooLarge | Busy | None:
    """The rest of a body that did not come in one message, within BODY_BUDGET."""
    budget = BODY_BUDGET
    reserved = 0
    try:
        wanted = declared if declared is not None else len(first)
        if not budget.take(wanted):
            limits.refused("body-budget", _peer(scope), budget.limit)
            return BUSY
        reserved = wanted
        chunks = [first]
        size = len(first)
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                return TOO_LARGE
            if size > reserved:
                step = min(max(size - reserved, RESERVE_STEP), limit - reserved)
                if not budget.take(step):
                    limits.refused("body-budget", _peer(scope), budget.limit)
                    return BUSY
                reserved += step
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        budget.give_back(reserved)


def _peer(scope: Any) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def json_error(message: str) -> bytes:
    return orjson.dumps({"error": message})


def error_response(status: int, message: str,
                   headers: Mapping[str, str] | None = None) -> Response:
    return Response(json_error(message), status_code=status, media_type="application/json",
                    headers=headers)


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
}


def json_responses(described: dict[int, str], ok: dict[str, Any] | None = None
                   ) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses: the 200 document (if given) and JSON `{"error"}` for the others."""
    responses: dict[int | str, dict[str, Any]] = {
        status: {"description": text,
                 "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for status, text in described.items()
    }
    if ok is not None:
        responses[200] = {"description": "OK", "content": {"application/json": {"schema": ok}}}
    return responses
