"""HTTP plumbing shared by the routes: bounded request bodies, JSON errors and their OpenAPI.

Bodies are read straight from ASGI `receive`, refused as soon as they are known to be too
large (by Content-Length, or while streaming) and before any parsing: the admission hot path
and the CA alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi.responses import Response


class TooLarge:
    """The marker `receive_body` returns for a body over its limit."""


TOO_LARGE = TooLarge()


async def receive_body(scope: Any, receive: Any, limit: int) -> bytes | TooLarge | None:
    """The whole body; TOO_LARGE past `limit` bytes; None if the client went away.

    Markers rather than exceptions: this runs for every admission.
    """
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                return TOO_LARGE
            break
    message = await receive()
    if message["type"] != "http.request":
        return None
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else TOO_LARGE
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return TOO_LARGE
        chunks.append(chunk)
    return b"".join(chunks)


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
